//! The scheduler's glue to the latent (on-demand) worker pool: configuring
//! it, carrying out its actions, starting an instance for a build no
//! connected worker can take, its events, and stopping all at shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;

use nightshift_proto::wire::BuildId;
use tokio::sync::oneshot;

use super::{Event, Scheduler, Waiting};
use crate::latent::{LatentAction, LatentChoice, LatentEvent, LatentTokens, MasterAccess, Now};

impl Scheduler {
    /// Sets up (or, after a reconfig, updates) the latent workers of the
    /// config. A provider is replaced only while its instance is stopped.
    pub(super) fn configure_latent(&mut self) {
        let now = Now::system();
        let data_dir = self.config.data_dir.clone();
        // Relative provider paths are relative to master.toml's directory.
        let config_dir = self
            .config
            .source
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .map_or_else(
                || std::path::PathBuf::from("."),
                std::path::Path::to_path_buf,
            );
        self.latent
            .set_master(self.latent_master(), self.config.max_starting as usize);
        for def in &self.config.workers {
            let Some(settings) = crate::latent::settings_from_config(def, &data_dir, &config_dir)
            else {
                continue;
            };
            let stopped = self
                .latent
                .state(&def.name)
                .is_none_or(|s| s == crate::latent::LatentState::Stopped);
            if stopped || !self.latent_providers.contains_key(&def.name) {
                self.latent_providers.insert(
                    def.name.clone(),
                    crate::latent::build_provider(&settings.provider),
                );
            }
            self.latent.configure(&def.name, settings, now);
        }
    }

    fn latent_master(&self) -> MasterAccess {
        self.latent_access.clone()
    }

    /// How latent instances reach the master and the token table the
    /// connection handler checks (set by `master run` once it is bound).
    pub fn set_latent_access(&mut self, master: MasterAccess, tokens: LatentTokens) {
        self.latent_access = master;
        self.latent_tokens = tokens;
        self.latent
            .set_master(self.latent_master(), self.config.max_starting as usize);
    }

    /// Carries out what the latent pool asked for `worker`, and publishes
    /// the token its instance may present.
    pub(super) fn run_latent(&mut self, worker: &str, actions: Vec<LatentAction>) {
        // A worker no longer latent (removed) has no token any more.
        self.latent_tokens.set(worker, self.latent.token(worker));
        if actions.is_empty() {
            return;
        }
        let events = self.events.clone();
        let report: Arc<dyn Fn(LatentEvent) + Send + Sync> = Arc::new(move |event| {
            let _ = events.send(Event::Latent(event));
        });
        for action in actions {
            crate::latent::spawn_action(action, &self.latent_providers, Arc::clone(&report));
        }
    }

    /// A latent provider call or timer ended.
    pub(super) fn on_latent_event(&mut self, event: LatentEvent) {
        let worker = match &event {
            LatentEvent::StartDone { worker, .. }
            | LatentEvent::StopDone { worker, .. }
            | LatentEvent::Timer { worker, .. } => worker.clone(),
        };
        let actions = self.latent.handle(event, Now::system());
        self.run_latent(&worker, actions);
        self.answer_latent_stopped();
        self.assign();
    }

    /// The master shuts down: stop every latent instance and start none;
    /// `reply` is answered once all are stopped.
    pub(super) fn on_stop_latent(&mut self, reply: oneshot::Sender<()>) {
        self.latent_shutdown = true;
        for (worker, actions) in self
            .latent
            .stop_all("the master is shutting down", Now::system())
        {
            self.run_latent(&worker, actions);
        }
        self.latent_stopped.push(reply);
        self.answer_latent_stopped();
    }

    /// No connected worker can take queued build `id`: count on a latent
    /// instance that is starting, or start one (within `max_starting`).
    /// Returns what the build waits for.
    pub(super) fn try_latent(
        &mut self,
        id: BuildId,
        counted_on: &mut BTreeSet<String>,
        why: Waiting,
    ) -> Waiting {
        if self.latent_shutdown {
            return why;
        }
        let candidates: Vec<String> = match self.queue.get(&id) {
            Some(queued) => self
                .eligible
                .latent_of(&queued.builder)
                .iter()
                .filter(|w| self.latent.is_latent(w))
                .filter(|w| self.workers.get(*w).is_none_or(|s| s.conn.is_none()))
                // Not while its master-side schedule keeps it away.
                .filter(|w| {
                    self.schedule_verdict(w)
                        .is_none_or(|p| p.state.takes_builds())
                })
                .cloned()
                .collect(),
            None => return why,
        };
        if candidates.is_empty() {
            return why;
        }
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        match self
            .latent
            .serve(&refs, counted_on, &format!("build {id}"), Now::system())
        {
            LatentChoice::AlreadyStarting(worker) => {
                Waiting::Because(format!("latent worker {worker} to start"))
            }
            LatentChoice::Start { worker, actions } => {
                tracing::info!("build {id}: starting latent worker {worker}");
                self.run_latent(&worker, actions);
                Waiting::Because(format!(
                    "latent worker {worker} to start (started for this build)"
                ))
            }
            LatentChoice::Wait(reason) => match why {
                Waiting::Because(why) => Waiting::Because(format!("{why}; latent: {reason}")),
                Waiting::NoWorker { .. } => Waiting::NoWorker {
                    latent: Some(reason),
                },
            },
        }
    }

    /// Answers shutdown waiters once every latent instance is stopped.
    fn answer_latent_stopped(&mut self) {
        if !self.latent_stopped.is_empty() && self.latent.all_stopped() {
            for reply in self.latent_stopped.drain(..) {
                let _ = reply.send(());
            }
        }
    }
}
