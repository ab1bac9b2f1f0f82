//! The scheduler's glue to the lock table: which locks a build and each of
//! its steps take, waiting for builder-level locks with the chosen worker's
//! slot kept, acting on grants, and step grants.

use std::collections::BTreeSet;

use nightshift_proto::wire::{BuildId, MasterMessage};

use super::Scheduler;
use crate::locks::{Claim, LockHolder, split_locks};

impl Scheduler {
    /// The builder's build-level locks as the current config has them.
    pub(super) fn builder_locks(&self, builder: &str) -> Vec<Claim> {
        self.lock_plan(builder).0
    }

    /// Each step's locks as the current config has them.
    pub(super) fn step_locks(&self, builder: &str) -> Vec<Vec<Claim>> {
        self.lock_plan(builder).1
    }

    /// What a build of `builder` takes before it starts, and what each of
    /// its steps takes, such that build- and step-level locks cannot
    /// deadlock ([`split_locks`]).
    fn lock_plan(&self, builder: &str) -> (Vec<Claim>, Vec<Vec<Claim>>) {
        let Some(def) = self.config.builder(builder) else {
            return (Vec::new(), Vec::new());
        };
        let build_level: BTreeSet<String> = self
            .config
            .builders
            .iter()
            .flat_map(|b| b.locks.iter().map(|c| c.name.clone()))
            .collect();
        let steps: Vec<Vec<Claim>> = def.steps.iter().map(|s| s.locks.clone()).collect();
        let (build, mut per_step) = split_locks(&def.locks, &steps, &build_level);
        if def.source.is_some() {
            // The checkout step comes first and takes no lock.
            per_step.insert(0, Vec::new());
        }
        (build, per_step)
    }

    /// `worker` is chosen for queued build `id`: start it when its whole
    /// builder-level lock set is held, else keep the worker's slot for it
    /// until a release grants the set ([`Scheduler::on_lock_grants`]).
    pub(super) fn start_or_wait_for_locks(&mut self, id: BuildId, worker: String) {
        let claims = match self.queue.get(&id) {
            Some(queued) => self.builder_locks(&queued.builder),
            None => return,
        };
        match self.locks.request(LockHolder::Build(id), &worker, &claims) {
            Ok(true) => self.start_build(id, worker),
            Ok(false) => {
                let why = self
                    .locks
                    .waiting_text(id)
                    .unwrap_or_else(|| "locks".into());
                tracing::info!("build {id}: waiting for {why} (on {worker})");
                self.note_waiting(id, format!("{why} (on {worker})"));
                self.lock_waits.insert(id, worker);
            }
            Err(e) => {
                // The config was validated as a whole; a lock it names exists.
                tracing::error!("build {id}: {e}; started without that lock");
                self.start_build(id, worker);
            }
        }
    }

    /// Acts on lock sets that a release granted: a step may start
    /// (`StepGranted`), a build waiting for its builder-level locks starts on
    /// its chosen worker, or, when that worker can no longer take it, gives
    /// the locks back and goes back to the queue.
    pub(super) fn on_lock_grants(&mut self, granted: Vec<LockHolder>) {
        let mut reassign = false;
        for holder in granted {
            match holder {
                LockHolder::Step(id, step) => {
                    if let Some(run) = self.running.get(&id) {
                        let worker = run.worker.clone();
                        tracing::info!("build {id} step {step}: locks granted");
                        self.send(&worker, MasterMessage::StepGranted { build_id: id, step });
                    }
                }
                LockHolder::Build(id) => {
                    let Some(worker) = self.lock_waits.remove(&id) else {
                        continue; // a running build re-taking its locks after a restart
                    };
                    let can_take = !self.paused
                        && self.queue.contains_key(&id)
                        && self.workers.get(&worker).is_some_and(|s| {
                            s.conn.is_some()
                                && self
                                    .effective_presence(&worker, &s.presence)
                                    .state
                                    .takes_builds()
                        });
                    if can_take {
                        self.start_build(id, worker);
                    } else {
                        let more = self.locks.release(LockHolder::Build(id));
                        self.on_lock_grants(more);
                        reassign = true;
                    }
                }
            }
        }
        if reassign {
            self.assign();
        }
    }

    /// The agent waits to start `step`: grant it when the step's locks are
    /// held (at once, or when a release grants them).
    pub(super) fn on_step_waiting(&mut self, worker: &str, build_id: BuildId, step: u32) {
        let claims = self
            .running
            .get(&build_id)
            .and_then(|run| run.step_locks.get(step as usize))
            .cloned()
            .unwrap_or_default();
        match self
            .locks
            .request(LockHolder::Step(build_id, step), worker, &claims)
        {
            Ok(true) => self.send(worker, MasterMessage::StepGranted { build_id, step }),
            Ok(false) => {
                let why = self.locks.waiting_text(build_id).unwrap_or_default();
                tracing::info!("build {build_id} step {step}: waiting for {why}");
            }
            Err(e) => {
                tracing::error!("build {build_id} step {step}: {e}; started without that lock");
                self.send(worker, MasterMessage::StepGranted { build_id, step });
            }
        }
    }

    /// `worker` went away or offline: builds waiting for locks on it give
    /// their place back and return to the queue. Returns whether any did.
    pub(super) fn unbind_lock_waits(&mut self, worker: &str) -> bool {
        let ids: Vec<BuildId> = self
            .lock_waits
            .iter()
            .filter(|(_, w)| *w == worker)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.lock_waits.remove(id);
            let granted = self.locks.release(LockHolder::Build(*id));
            self.on_lock_grants(granted);
        }
        !ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use jiff::Timestamp;
    use nightshift_policy::PresenceState;
    use nightshift_proto::wire::{AgentMessage, BuildResult};

    use super::super::Event;
    use super::super::test_harness::{HASH, Harness, presence, started};
    use crate::config::MasterConfig;

    /// Issue 5: a build waiting for its builder-level lock keeps its chosen
    /// worker's slot; if that worker turns away the build gives the slot
    /// back (and its place for the lock), and a release starts it.
    #[tokio::test]
    async fn a_lock_wait_follows_its_worker_and_a_release_starts_the_build() {
        let text = format!(
            r#"
[[lock]]
name = "db"
scope = "master"
max_count = 1
[[worker]]
name = "a"
token_sha256 = "{HASH}"
[[worker]]
name = "b"
token_sha256 = "{HASH}"
[[builder]]
name = "app"
workers = ["a", "b"]
locks = [{{ name = "db", access = "exclusive" }}]
steps = [{{ name = "s", command = "true", locks = [] }}]
"#
        );
        let config =
            MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/tmp")).unwrap();
        let mut h = Harness::with_config(Arc::new(config));
        let (ca, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let (cb, mut b) = h.connect("b", PresenceState::Available, vec![]);
        let first = h.submit().await;
        let mut on_a = started(&mut a);
        on_a.extend(started(&mut b));
        assert_eq!(on_a, vec![first]);
        let holder_is_a = h.scheduler.snapshot().running[&first] == "a";
        let (holder, holder_conn, other, other_conn) = if holder_is_a {
            ("a", ca, "b", cb)
        } else {
            ("b", cb, "a", ca)
        };
        let second = h.submit().await;
        assert_eq!(
            h.scheduler.snapshot().waiting_for[&second],
            format!("lock db (on {other})")
        );
        // The chosen worker turns away: the build is unbound.
        let turn = |state| Event::Agent {
            worker: other.into(),
            conn: other_conn,
            message: AgentMessage::Presence {
                presence: presence(state),
                outlook: None,
            },
        };
        h.scheduler.handle(turn(PresenceState::Away));
        let why = h.scheduler.snapshot().waiting_for[&second].clone();
        assert!(why.contains(&format!("{other} away")), "{why}");
        h.scheduler.handle(turn(PresenceState::Available));
        assert_eq!(
            h.scheduler.snapshot().waiting_for[&second],
            format!("lock db (on {other})")
        );
        // The holder finishes: the lock goes to the waiting build at once.
        h.scheduler.handle(Event::Agent {
            worker: holder.into(),
            conn: holder_conn,
            message: AgentMessage::BuildFinished {
                result: BuildResult {
                    build_id: first,
                    outcome: nightshift_proto::wire::Outcome::Success,
                    steps: vec![],
                    reason: None,
                    log: String::new(),
                    finished_at: Timestamp::UNIX_EPOCH,
                },
            },
        });
        let mut other_rx = if holder_is_a { b } else { a };
        assert_eq!(started(&mut other_rx), vec![second]);
    }
}
