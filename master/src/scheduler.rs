//! The scheduler: ONE task that owns the queue, the running builds and every
//! worker's connection and presence, driven by ONE closed [`Event`] enum.
//!
//! Nothing here polls: a new request, a presence change, a finished build, a
//! connection or a timer each arrive as an event and the scheduler reacts in
//! the same turn. Durable state goes to the [`Store`]; a request reaches the
//! scheduler only after its row is committed, and a result is acknowledged to
//! the agent (`ResultStored`) only after its row is committed.
//!
//! The decision "which worker gets this request" lives in one function,
//! [`Scheduler::pick_worker`], where lock acquisition and latent starts plug in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use nightshift_policy::{Presence, PresenceState, Source};
use nightshift_proto::api::{LatentInfo, WorkerInfo, WorkerList};
use nightshift_proto::wire::{
    AgentMessage, BuildId, BuildResult, BuildSource, HEARTBEAT_SECS, MasterMessage, Outcome,
    PROTOCOL_VERSION, StepSpec,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::MasterConfig;
use crate::latent::{
    LatentAction, LatentChoice, LatentEvent, LatentPool, LatentProvider, LatentTokens,
    MasterAccess, Now,
};
use crate::locks::{BuildLocks, Claim, LockHolder, split_locks};
use crate::master_schedule::{MasterSchedules, ScheduleSpec, combine};
use crate::store::{Store, StoreOutcome, UnfinishedBuild};

/// Identity of one agent connection, unique for the master's lifetime.
pub type ConnId = u64;

/// The source of "now" for presence timestamps (injected in tests).
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// After a reconnect, how long the agent has to deliver the results of
/// builds the master expected it to run but that its hello did not list.
pub const RECONCILE_GRACE: Duration = Duration::from_secs(2 * HEARTBEAT_SECS);

/// What the scheduler sends a connection task.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    Message(MasterMessage),
    /// Close the connection, logging the reason.
    Close(String),
}

/// The parts of an agent's hello the scheduler uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub agent_version: String,
    pub max_builds: u32,
    pub presence: Presence,
    pub running: Vec<BuildId>,
}

/// A read-only view for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub workers: WorkerList,
    /// What each queued build waits for.
    pub waiting_for: BTreeMap<BuildId, String>,
    /// Builds handed out, with their worker.
    pub running: BTreeMap<BuildId, String>,
}

/// Everything the scheduler reacts to.
#[derive(Debug)]
pub enum Event {
    /// An authenticated agent said hello.
    Connected {
        worker: String,
        conn: ConnId,
        hello: Hello,
        out: mpsc::UnboundedSender<Outbound>,
    },
    /// A frame from an agent (heartbeats are answered by the connection).
    Agent {
        worker: String,
        conn: ConnId,
        message: AgentMessage,
    },
    /// The connection ended.
    Disconnected {
        worker: String,
        conn: ConnId,
        reason: String,
    },
    /// `missing_timeout` passed since the worker's disconnect `epoch`.
    MissingTimeout {
        worker: String,
        epoch: u64,
    },
    /// The grace after a reconnect ended for builds the hello did not list.
    ReconcileDeadline {
        worker: String,
        conn: ConnId,
    },
    /// A committed new request.
    Submitted {
        id: BuildId,
        builder: String,
        properties: BTreeMap<String, String>,
        source: Option<BuildSource>,
    },
    /// A result's store write finished.
    ResultCommitted {
        worker: String,
        id: BuildId,
        stored: anyhow::Result<StoreOutcome>,
    },
    /// The pause flag changed (already committed).
    SetPaused {
        paused: bool,
    },
    /// Cancel a queued or running build.
    Cancel {
        id: BuildId,
        reason: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Answer when `id` is finished (at once if it is not pending).
    Watch {
        id: BuildId,
        reply: oneshot::Sender<()>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    /// A latent provider call or timer ended.
    Latent(LatentEvent),
    /// The master is shutting down: stop every latent instance, answer once
    /// all are stopped; no new instance is started from now on.
    StopLatent {
        reply: oneshot::Sender<()>,
    },
    /// A master-side schedule may have changed a verdict (armed for the next
    /// boundary; `epoch` tells stale timers apart).
    ScheduleTick {
        epoch: u64,
    },
    /// A new config, validated and checked by `reconfig::reload`: apply it
    /// without interrupting running builds, then answer.
    Reconfig {
        config: Arc<MasterConfig>,
        reply: oneshot::Sender<()>,
    },
}

/// A worker's live state as the scheduler sees it.
struct WorkerSlot {
    conn: Option<(ConnId, mpsc::UnboundedSender<Outbound>)>,
    presence: Presence,
    agent_max_builds: u32,
    running: BTreeSet<BuildId>,
    /// `Released` was sent since it last took builds.
    released: bool,
    /// Bumped on every connect and disconnect; stale timers compare it.
    epoch: u64,
    /// Builds the agent refused since its last presence change.
    refused: BTreeSet<BuildId>,
    /// Builds the master expects but the last hello did not list.
    unconfirmed: BTreeSet<BuildId>,
    /// Order of the last hand-out, to spread builds among equals.
    last_assigned: u64,
}

struct Queued {
    builder: String,
    properties: BTreeMap<String, String>,
    waiting_for: Option<String>,
    source: Option<BuildSource>,
}

struct Running {
    worker: String,
    builder: String,
    properties: BTreeMap<String, String>,
    source: Option<BuildSource>,
    accepted: bool,
    /// Each step's locks as configured when the build started (a reconfig
    /// does not change a running build).
    step_locks: Vec<Vec<Claim>>,
}

/// The scheduler's state; [`Scheduler::run`] is its event loop.
pub struct Scheduler {
    config: Arc<MasterConfig>,
    store: Store,
    clock: Arc<dyn Clock>,
    events: mpsc::UnboundedSender<Event>,
    workers: BTreeMap<String, WorkerSlot>,
    queue: BTreeMap<BuildId, Queued>,
    running: HashMap<BuildId, Running>,
    /// Results being committed.
    finishing: BTreeSet<BuildId>,
    /// Running builds the master asked to cancel: their `cancelled` result
    /// is final (a cancel the worker decided alone re-queues the build).
    cancel_requested: BTreeSet<BuildId>,
    waiters: HashMap<BuildId, Vec<oneshot::Sender<()>>>,
    paused: bool,
    assignments: u64,
    /// Builder- and step-level locks held or waited for.
    locks: BuildLocks,
    /// Queued builds whose worker is chosen and whose builder-level locks
    /// are being waited for (the worker's slot is kept for them).
    lock_waits: BTreeMap<BuildId, String>,
    /// Latent (on-demand) workers: their life cycle, providers and tokens.
    latent: LatentPool,
    latent_providers: BTreeMap<String, Arc<dyn LatentProvider>>,
    latent_tokens: LatentTokens,
    latent_access: MasterAccess,
    /// Master-side schedules of workers (`schedule` in `[[worker]]`).
    schedules: MasterSchedules,
    schedule_epoch: u64,
    /// Shutting down: no latent instance is started any more.
    latent_shutdown: bool,
    /// Who waits for every latent instance to be stopped.
    latent_stopped: Vec<oneshot::Sender<()>>,
}

impl Scheduler {
    /// Builds the scheduler from the config and the store's unfinished
    /// builds. `events` is the sender of the channel [`Scheduler::run`] reads.
    pub fn new(
        config: Arc<MasterConfig>,
        store: Store,
        clock: Arc<dyn Clock>,
        events: mpsc::UnboundedSender<Event>,
        unfinished: Vec<UnfinishedBuild>,
        last_seen: BTreeMap<String, Presence>,
        paused: bool,
    ) -> Scheduler {
        let now = clock.now();
        let not_connected = |name: &str| match last_seen.get(name) {
            Some(last) => offline(
                now,
                &format!(
                    "not connected since the master started (last seen {}: {})",
                    last.state, last.reason
                ),
            ),
            None => offline(now, "not connected yet"),
        };
        let workers = config
            .workers
            .iter()
            .map(|w| {
                (
                    w.name.clone(),
                    WorkerSlot {
                        conn: None,
                        presence: not_connected(&w.name),
                        agent_max_builds: w.max_builds,
                        running: BTreeSet::new(),
                        released: false,
                        epoch: 0,
                        refused: BTreeSet::new(),
                        unconfirmed: BTreeSet::new(),
                        last_assigned: 0,
                    },
                )
            })
            .collect();
        let mut scheduler = Scheduler {
            config,
            store,
            clock,
            events,
            workers,
            queue: BTreeMap::new(),
            running: HashMap::new(),
            finishing: BTreeSet::new(),
            cancel_requested: BTreeSet::new(),
            waiters: HashMap::new(),
            paused,
            assignments: 0,
            locks: BuildLocks::default(),
            lock_waits: BTreeMap::new(),
            latent: LatentPool::new(MasterAccess::default(), 1),
            latent_providers: BTreeMap::new(),
            latent_tokens: LatentTokens::default(),
            latent_access: MasterAccess::default(),
            schedules: MasterSchedules::default(),
            schedule_epoch: 0,
            latent_shutdown: false,
            latent_stopped: Vec::new(),
        };
        scheduler.locks = BuildLocks::new(scheduler.config.locks.clone());
        scheduler.configure_latent();
        scheduler.schedules = scheduler.compile_schedules();
        for build in unfinished {
            let worker = build.worker.filter(|w| scheduler.workers.contains_key(w));
            match (build.state, worker) {
                (nightshift_proto::api::BuildState::Running, Some(worker)) => {
                    // Handed out before the restart: wait for that worker to
                    // come back (its result is accepted) or to stay missing.
                    if let Some(slot) = scheduler.workers.get_mut(&worker) {
                        slot.running.insert(build.id);
                    }
                    // It held its builder-level locks before the restart:
                    // take them again (nothing else holds any yet).
                    let claims = scheduler.builder_locks(&build.builder);
                    if let Err(e) =
                        scheduler
                            .locks
                            .request(LockHolder::Build(build.id), &worker, &claims)
                    {
                        tracing::warn!("build {}: {e}", build.id);
                    }
                    let step_locks = scheduler.step_locks(&build.builder);
                    scheduler.running.insert(
                        build.id,
                        Running {
                            worker,
                            builder: build.builder,
                            properties: build.properties,
                            source: build.source,
                            accepted: true,
                            step_locks,
                        },
                    );
                }
                (nightshift_proto::api::BuildState::Running, None) => {
                    scheduler.store.requeue(
                        build.id,
                        Some("its worker is no longer in master.toml".into()),
                    );
                    scheduler.queue.insert(
                        build.id,
                        Queued {
                            builder: build.builder,
                            properties: build.properties,
                            waiting_for: None,
                            source: build.source,
                        },
                    );
                }
                _ => {
                    scheduler.queue.insert(
                        build.id,
                        Queued {
                            builder: build.builder,
                            properties: build.properties,
                            waiting_for: None,
                            source: build.source,
                        },
                    );
                }
            }
        }
        let with_builds: Vec<String> = scheduler
            .workers
            .iter()
            .filter(|(_, slot)| !slot.running.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        for worker in with_builds {
            scheduler.start_missing_timer(&worker);
        }
        scheduler
    }

    /// The event loop: runs until every sender is gone.
    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Event>) {
        self.refresh_schedules();
        self.assign();
        while let Some(event) = inbox.recv().await {
            self.handle(event);
        }
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Connected {
                worker,
                conn,
                hello,
                out,
            } => self.on_connected(worker, conn, hello, out),
            Event::Agent {
                worker,
                conn,
                message,
            } => {
                if self.is_current(&worker, conn) {
                    self.on_agent(&worker, message);
                }
            }
            Event::Disconnected {
                worker,
                conn,
                reason,
            } => self.on_disconnected(&worker, conn, &reason),
            Event::MissingTimeout { worker, epoch } => self.on_missing(&worker, epoch),
            Event::ReconcileDeadline { worker, conn } => self.on_reconcile_deadline(&worker, conn),
            Event::Submitted {
                id,
                builder,
                properties,
                source,
            } => {
                self.collapse_into(id, &builder, source.as_ref());
                self.queue.insert(
                    id,
                    Queued {
                        builder,
                        properties,
                        waiting_for: None,
                        source,
                    },
                );
                self.assign();
            }
            Event::ResultCommitted { worker, id, stored } => {
                self.on_result_committed(&worker, id, stored)
            }
            Event::SetPaused { paused } => {
                self.paused = paused;
                tracing::info!(
                    "master {}",
                    if paused {
                        "paused: no new builds handed out"
                    } else {
                        "resumed"
                    }
                );
                self.assign();
            }
            Event::Cancel { id, reason, reply } => {
                let _ = reply.send(self.on_cancel(id, reason));
            }
            Event::Watch { id, reply } => {
                if self.is_pending(id) {
                    let waiters = self.waiters.entry(id).or_default();
                    // Long polls that timed out have gone away: forget them.
                    waiters.retain(|waiter| !waiter.is_closed());
                    waiters.push(reply);
                } else {
                    let _ = reply.send(());
                }
            }
            Event::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Event::StopLatent { reply } => {
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
            Event::ScheduleTick { epoch } => {
                if epoch == self.schedule_epoch {
                    self.refresh_schedules();
                    self.assign();
                }
            }
            Event::Reconfig { config, reply } => {
                self.apply_config(config);
                let _ = reply.send(());
            }
            Event::Latent(event) => {
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
        }
    }

    fn is_current(&self, worker: &str, conn: ConnId) -> bool {
        self.workers
            .get(worker)
            .and_then(|slot| slot.conn.as_ref())
            .is_some_and(|(id, _)| *id == conn)
    }

    fn is_pending(&self, id: BuildId) -> bool {
        self.queue.contains_key(&id)
            || self.running.contains_key(&id)
            || self.finishing.contains(&id)
    }

    fn send(&self, worker: &str, message: MasterMessage) {
        if let Some((_, out)) = self.workers.get(worker).and_then(|s| s.conn.as_ref()) {
            let _ = out.send(Outbound::Message(message));
        }
    }

    fn on_connected(
        &mut self,
        worker: String,
        conn: ConnId,
        hello: Hello,
        out: mpsc::UnboundedSender<Outbound>,
    ) {
        if self.workers.contains_key(&worker) && self.latent.is_latent(&worker) {
            match self.latent.agent_connected(&worker, Now::system()) {
                Ok(actions) => self.run_latent(&worker, actions),
                Err(reason) => {
                    tracing::warn!("latent worker {worker} refused: {reason}");
                    let _ = out.send(Outbound::Message(MasterMessage::Refused { reason }));
                    let _ = out.send(Outbound::Close("latent instance not expected".into()));
                    return;
                }
            }
        }
        let Some(slot) = self.workers.get(&worker) else {
            let _ = out.send(Outbound::Message(MasterMessage::Refused {
                reason: format!("no worker `{worker}` in master.toml"),
            }));
            let _ = out.send(Outbound::Close("unknown worker".into()));
            return;
        };
        if let Some((_, old)) = &slot.conn {
            let _ = old.send(Outbound::Close(
                "replaced by a newer connection of the same worker".into(),
            ));
        }
        let listed: BTreeSet<BuildId> = hello.running.iter().copied().collect();
        let mut cancel = Vec::new();
        let mut adopted = Vec::new();
        for &id in &listed {
            match self.running.get(&id) {
                Some(run) if run.worker == worker => {}
                Some(_) => cancel.push(id),
                None if self.queue.contains_key(&id) => adopted.push(id),
                None => cancel.push(id),
            }
        }
        let now = self.clock.now();
        for id in adopted {
            // Re-queued while the worker was away, but it is still running
            // it and nobody else took it: let it carry on.
            if let Some(queued) = self.queue.remove(&id) {
                tracing::info!(
                    "build {id}: worker {worker} came back still running it; kept there"
                );
                // It runs whatever its locks: drop a wait for them elsewhere
                // and hold them here.
                self.lock_waits.remove(&id);
                let granted = self.locks.release_build(id);
                self.on_lock_grants(granted);
                let claims = self.builder_locks(&queued.builder);
                if let Err(e) = self.locks.request(LockHolder::Build(id), &worker, &claims) {
                    tracing::warn!("build {id}: {e}");
                }
                let step_locks = self.step_locks(&queued.builder);
                self.running.insert(
                    id,
                    Running {
                        worker: worker.clone(),
                        builder: queued.builder,
                        properties: queued.properties,
                        source: queued.source,
                        accepted: true,
                        step_locks,
                    },
                );
                self.store.mark_started(id, worker.clone(), now);
                if let Some(slot) = self.workers.get_mut(&worker) {
                    slot.running.insert(id);
                }
            }
        }
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        slot.epoch += 1;
        slot.conn = Some((conn, out));
        slot.presence = hello.presence.clone();
        slot.agent_max_builds = hello.max_builds.max(1);
        slot.released = false;
        slot.refused.clear();
        slot.unconfirmed = slot
            .running
            .iter()
            .copied()
            .filter(|id| !listed.contains(id) && !self.finishing.contains(id))
            .collect();
        let unconfirmed = !slot.unconfirmed.is_empty();
        tracing::info!(
            "worker {worker} connected (agent {}, {}: {}){}",
            hello.agent_version,
            hello.presence.state,
            hello.presence.reason,
            if cancel.is_empty() {
                String::new()
            } else {
                format!("; it cancels builds {cancel:?}, re-queued while it was gone")
            }
        );
        self.send(
            &worker,
            MasterMessage::Welcome {
                protocol: PROTOCOL_VERSION,
                master_version: env!("CARGO_PKG_VERSION").into(),
                heartbeat_secs: HEARTBEAT_SECS,
                cancel,
            },
        );
        if let Some(verdict) = self.schedules.verdict(&worker) {
            self.send(
                &worker,
                MasterMessage::MasterOverride {
                    presence: Some(verdict.clone()),
                },
            );
        }
        if unconfirmed {
            let events = self.events.clone();
            let name = worker.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RECONCILE_GRACE).await;
                let _ = events.send(Event::ReconcileDeadline { worker: name, conn });
            });
        }
        self.store.save_presence(worker.clone(), hello.presence);
        self.maybe_release(&worker);
        self.assign();
    }

    fn on_agent(&mut self, worker: &str, message: AgentMessage) {
        match message {
            AgentMessage::Hello { .. } => {
                tracing::warn!("worker {worker}: a second hello on one connection is ignored");
            }
            AgentMessage::Presence { presence } => {
                tracing::info!(
                    "worker {worker} is {} ({}: {})",
                    presence.state,
                    presence.source,
                    presence.reason
                );
                if let Some(slot) = self.workers.get_mut(worker) {
                    if presence.state.takes_builds() {
                        slot.released = false;
                    }
                    slot.refused.clear();
                    slot.presence = presence.clone();
                }
                let takes_builds = presence.state.takes_builds();
                let why = format!("{}: {}", presence.source, presence.reason);
                self.store.save_presence(worker.to_owned(), presence);
                if !takes_builds {
                    self.unbind_lock_waits(worker);
                }
                let actions =
                    self.latent
                        .presence_changed(worker, takes_builds, &why, Now::system());
                self.run_latent(worker, actions);
                self.maybe_release(worker);
                self.assign();
            }
            AgentMessage::BuildAccepted { build_id } => match self.running.get_mut(&build_id) {
                Some(run) if run.worker == worker => run.accepted = true,
                _ => self.refuse(worker, build_id, "accepted"),
            },
            AgentMessage::BuildRefused { build_id, reason } => {
                if !self.owns(worker, build_id) {
                    return self.refuse(worker, build_id, "refused");
                }
                tracing::info!(
                    "build {build_id}: worker {worker} refused it ({reason}); re-queued"
                );
                if let Some(run) = self.running.remove(&build_id) {
                    if let Some(slot) = self.workers.get_mut(worker) {
                        slot.running.remove(&build_id);
                        slot.refused.insert(build_id);
                    }
                    let granted = self.locks.release_build(build_id);
                    self.on_lock_grants(granted);
                    let actions = self.latent.build_finished(worker, Now::system());
                    self.run_latent(worker, actions);
                    self.store.requeue(build_id, None);
                    self.queue.insert(
                        build_id,
                        Queued {
                            builder: run.builder,
                            properties: run.properties,
                            waiting_for: None,
                            source: run.source,
                        },
                    );
                }
                self.maybe_release(worker);
                self.assign();
            }
            AgentMessage::StepWaiting { build_id, step } => {
                if !self.owns(worker, build_id) {
                    return self.refuse(worker, build_id, "asked for a step grant of");
                }
                self.on_step_waiting(worker, build_id, step);
            }
            AgentMessage::StepStarted { build_id, .. } => {
                if !self.owns(worker, build_id) {
                    self.refuse(worker, build_id, "started a step of");
                }
            }
            AgentMessage::Output {
                build_id,
                step,
                data,
            } => {
                if self.owns(worker, build_id) {
                    self.store.append_log(build_id, step, data);
                } else {
                    self.refuse(worker, build_id, "sent output for");
                }
            }
            AgentMessage::StepFinished { build_id, result } => {
                if self.owns(worker, build_id) {
                    let step = result.step;
                    self.store.store_step(build_id, result);
                    let granted = self.locks.release(LockHolder::Step(build_id, step));
                    self.on_lock_grants(granted);
                } else {
                    self.refuse(worker, build_id, "finished a step of");
                }
            }
            AgentMessage::BuildFinished { result } => self.on_build_finished(worker, result),
            AgentMessage::Goodbye { reason } => {
                tracing::info!("worker {worker} says goodbye: {reason}");
            }
            AgentMessage::Ping { .. } | AgentMessage::Pong { .. } => {}
        }
    }

    fn owns(&self, worker: &str, id: BuildId) -> bool {
        self.running
            .get(&id)
            .is_some_and(|run| run.worker == worker)
    }

    fn refuse(&self, worker: &str, id: BuildId, what: &str) {
        tracing::warn!("worker {worker} {what} build {id}, which is not assigned to it; ignored");
    }

    fn on_build_finished(&mut self, worker: &str, result: BuildResult) {
        let id = result.build_id;
        if self.finishing.contains(&id) {
            return; // the first delivery is being stored; it will be acknowledged
        }
        if result.outcome == Outcome::Cancelled && !self.cancel_requested.remove(&id) {
            // Cancelled on the worker's side (a stop deadline, a second
            // SIGTERM, the owner): the request is not done, it runs elsewhere.
            return self.on_worker_cancelled(worker, &result);
        }
        match self.running.get(&id) {
            Some(run) if run.worker != worker => {
                return self.refuse(worker, id, "delivered a result for");
            }
            Some(_) => {
                self.running.remove(&id);
                if let Some(slot) = self.workers.get_mut(worker) {
                    slot.running.remove(&id);
                    slot.unconfirmed.remove(&id);
                }
                let actions = self.latent.build_finished(worker, Now::system());
                self.run_latent(worker, actions);
            }
            None => {
                // Re-queued after this worker went missing, and nobody took it
                // since: the result is still the one we want.
                if self.queue.remove(&id).is_some() {
                    tracing::info!(
                        "build {id}: result from {worker} arrived while re-queued; taken"
                    );
                }
                // Otherwise unknown to the scheduler: finished already (the
                // store answers idempotently) or never existed.
            }
        }
        tracing::info!("build {id} finished on {worker}: {}", result.outcome);
        self.lock_waits.remove(&id);
        let granted = self.locks.release_build(id);
        self.on_lock_grants(granted);
        self.finishing.insert(id);
        let store = self.store.clone();
        let events = self.events.clone();
        let worker = worker.to_owned();
        tokio::spawn(async move {
            let stored = store.finish(worker.clone(), result).await;
            let _ = events.send(Event::ResultCommitted { worker, id, stored });
        });
        self.maybe_release_all();
        self.assign();
    }

    /// A build the worker cancelled by itself goes back to the queue.
    fn on_worker_cancelled(&mut self, worker: &str, result: &BuildResult) {
        let id = result.build_id;
        let owned = self.owns(worker, id);
        if !owned && !self.queue.contains_key(&id) {
            return self.refuse(worker, id, "cancelled");
        }
        if owned {
            let reason = format!(
                "cancelled on worker {worker}: {}",
                result.reason.as_deref().unwrap_or("no reason given")
            );
            self.requeue(worker, id, &reason);
        }
        // Nothing to store: the agent may forget its result.
        self.send(worker, MasterMessage::ResultStored { build_id: id });
        self.maybe_release(worker);
        self.assign();
    }

    fn on_result_committed(
        &mut self,
        worker: &str,
        id: BuildId,
        stored: anyhow::Result<StoreOutcome>,
    ) {
        self.finishing.remove(&id);
        match stored {
            Ok(StoreOutcome::Stored | StoreOutcome::AlreadyStored) => {
                self.send(worker, MasterMessage::ResultStored { build_id: id });
                self.notify_finished(id);
            }
            Ok(StoreOutcome::NotYours) => {
                tracing::warn!(
                    "worker {worker} delivered a result for build {id}, which is unknown or \
                     finished by another worker; ignored"
                );
            }
            Err(e) => {
                // Not acknowledged: the agent delivers it again on reconnect.
                tracing::error!("build {id}: cannot store the result from {worker}: {e:#}");
            }
        }
    }

    fn notify_finished(&mut self, id: BuildId) {
        if let Some(waiters) = self.waiters.remove(&id) {
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
    }

    fn on_disconnected(&mut self, worker: &str, conn: ConnId, reason: &str) {
        if !self.is_current(worker, conn) {
            return;
        }
        let now = self.clock.now();
        let timeout = self.config.missing_timeout;
        let Some(slot) = self.workers.get_mut(worker) else {
            return;
        };
        slot.conn = None;
        slot.epoch += 1;
        slot.presence = offline(now, &format!("disconnected: {reason}"));
        slot.unconfirmed.clear();
        let busy = !slot.running.is_empty();
        tracing::info!(
            "worker {worker} disconnected ({reason}){}",
            if busy {
                format!("; its builds are re-queued unless it is back within {timeout:?}")
            } else {
                String::new()
            }
        );
        if busy {
            self.start_missing_timer(worker);
        }
        let actions = self
            .latent
            .agent_disconnected(worker, reason, Now::system());
        self.run_latent(worker, actions);
        if self.unbind_lock_waits(worker) {
            self.assign();
        }
    }

    fn start_missing_timer(&self, worker: &str) {
        let Some(slot) = self.workers.get(worker) else {
            return;
        };
        let epoch = slot.epoch;
        let events = self.events.clone();
        let timeout = self.config.missing_timeout;
        let worker = worker.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = events.send(Event::MissingTimeout { worker, epoch });
        });
    }

    fn on_missing(&mut self, worker: &str, epoch: u64) {
        let Some(slot) = self.workers.get(worker) else {
            return;
        };
        if slot.epoch != epoch || slot.conn.is_some() {
            return;
        }
        let ids: Vec<BuildId> = slot.running.iter().copied().collect();
        let reason = format!(
            "worker {worker} was missing for more than {}s",
            self.config.missing_timeout.as_secs()
        );
        for id in ids {
            self.requeue(worker, id, &reason);
        }
        if self.config.worker(worker).is_none() {
            self.drop_if_drained(worker);
        }
        self.assign();
    }

    fn on_reconcile_deadline(&mut self, worker: &str, conn: ConnId) {
        if !self.is_current(worker, conn) {
            return;
        }
        let Some(slot) = self.workers.get_mut(worker) else {
            return;
        };
        let ids: Vec<BuildId> = std::mem::take(&mut slot.unconfirmed)
            .into_iter()
            .filter(|id| slot.running.contains(id) && !self.finishing.contains(id))
            .collect();
        let reason = format!("worker {worker} reconnected without it and delivered no result");
        for id in ids {
            self.requeue(worker, id, &reason);
        }
        self.maybe_release(worker);
        self.assign();
    }

    /// Moves a running build back to the queue as a retry.
    fn requeue(&mut self, worker: &str, id: BuildId, reason: &str) {
        if let Some(slot) = self.workers.get_mut(worker) {
            slot.running.remove(&id);
        }
        let granted = self.locks.release_build(id);
        self.on_lock_grants(granted);
        if let Some(run) = self.running.remove(&id) {
            tracing::warn!("build {id} re-queued: {reason}");
            let actions = self.latent.build_finished(worker, Now::system());
            self.run_latent(worker, actions);
            self.store.requeue(id, Some(reason.to_owned()));
            self.queue.insert(
                id,
                Queued {
                    builder: run.builder,
                    properties: run.properties,
                    waiting_for: None,
                    source: run.source,
                },
            );
        }
    }

    /// `collapse = true`: waiting requests for the same builder and branch
    /// end unrun, recorded as collapsed into the newer request `into`.
    fn collapse_into(&mut self, into: BuildId, builder: &str, source: Option<&BuildSource>) {
        let Some(source) = source else { return };
        if !self.config.builder(builder).is_some_and(|b| b.collapse) {
            return;
        }
        let older: Vec<BuildId> = self
            .queue
            .range(..into)
            .filter(|(_, q)| {
                q.builder == builder && q.source.as_ref().is_some_and(|s| s.branch == source.branch)
            })
            .map(|(id, _)| *id)
            .collect();
        if older.is_empty() {
            return;
        }
        tracing::info!("builds {older:?} of {builder} collapsed into build {into}");
        for &id in &older {
            self.queue.remove(&id);
            self.lock_waits.remove(&id);
            let granted = self.locks.release_build(id);
            self.on_lock_grants(granted);
            self.finishing.insert(id);
        }
        let (store, events, now) = (self.store.clone(), self.events.clone(), self.clock.now());
        tokio::spawn(async move {
            if let Err(e) = store.collapse(older.clone(), into, now).await {
                tracing::error!("builds {older:?}: cannot store their collapse: {e:#}");
            }
            for id in older {
                let _ = events.send(Event::ResultCommitted {
                    worker: String::new(),
                    id,
                    stored: Ok(StoreOutcome::AlreadyStored),
                });
            }
        });
    }

    fn on_cancel(&mut self, id: BuildId, reason: String) -> Result<(), String> {
        if self.queue.remove(&id).is_some() {
            self.lock_waits.remove(&id);
            let granted = self.locks.release_build(id);
            self.on_lock_grants(granted);
            let store = self.store.clone();
            let events = self.events.clone();
            let now = self.clock.now();
            self.finishing.insert(id);
            tokio::spawn(async move {
                if let Err(e) = store.cancel_queued(id, reason, now).await {
                    tracing::error!("build {id}: cannot store its cancellation: {e:#}");
                }
                let _ = events.send(Event::ResultCommitted {
                    worker: String::new(),
                    id,
                    stored: Ok(StoreOutcome::AlreadyStored),
                });
            });
            return Ok(());
        }
        match self.running.get(&id) {
            Some(run) => {
                let worker = run.worker.clone();
                if self.workers.get(&worker).is_some_and(|s| s.conn.is_some()) {
                    self.cancel_requested.insert(id);
                    self.send(
                        &worker,
                        MasterMessage::CancelBuild {
                            build_id: id,
                            reason,
                        },
                    );
                    Ok(())
                } else {
                    Err(format!(
                        "build {id} runs on {worker}, which is not connected; it is cancelled when it comes back or re-queued"
                    ))
                }
            }
            None => Err(format!("build {id} is not queued or running")),
        }
    }

    /// Sends `Released` to an idle worker that takes no builds.
    fn maybe_release(&mut self, worker: &str) {
        if self.config.worker(worker).is_none() {
            self.drop_if_drained(worker);
            return;
        }
        let Some(slot) = self.workers.get_mut(worker) else {
            return;
        };
        if slot.conn.is_some()
            && !slot.presence.state.takes_builds()
            && slot.running.is_empty()
            && !slot.released
        {
            slot.released = true;
            let reason = format!(
                "{} and idle ({}: {})",
                slot.presence.state, slot.presence.source, slot.presence.reason
            );
            tracing::info!("worker {worker} released: {reason}");
            self.send(worker, MasterMessage::Released { reason });
        }
    }

    fn maybe_release_all(&mut self) {
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for name in names {
            self.maybe_release(&name);
        }
    }

    /// Hands out every queued build that a worker can take now, oldest first.
    fn assign(&mut self) {
        let ids: Vec<BuildId> = self.queue.keys().copied().collect();
        // Latent instances starting already, each counted on by one build.
        let mut counted_on = BTreeSet::new();
        // Builders no connected worker can take in this pass.
        let mut no_worker = HashMap::new();
        for id in ids {
            if let Some(worker) = self.lock_waits.get(&id) {
                // Its worker is chosen; the release of a lock starts it.
                let why = match self.locks.waiting_text(id) {
                    Some(text) => format!("{text} (on {worker})"),
                    None => format!("locks (on {worker})"),
                };
                self.note_waiting(id, why);
                continue;
            }
            let decision = if self.paused {
                Err("master is paused".to_owned())
            } else {
                self.pick_worker_cached(id, &mut no_worker)
            };
            match decision {
                Ok(worker) => self.start_or_wait_for_locks(id, worker),
                Err(why) if self.paused => self.note_waiting(id, why),
                Err(why) => {
                    let why = self.try_latent(id, &mut counted_on, why);
                    self.note_waiting(id, why);
                }
            }
        }
    }

    /// Records what a queued build waits for (shown by `master builds`).
    fn note_waiting(&mut self, id: BuildId, why: String) {
        if let Some(queued) = self.queue.get_mut(&id)
            && queued.waiting_for.as_deref() != Some(why.as_str())
        {
            queued.waiting_for = Some(why.clone());
            self.store.set_waiting_for(id, Some(why));
        }
    }

    /// The builder's build-level locks as the current config has them.
    fn builder_locks(&self, builder: &str) -> Vec<Claim> {
        self.lock_plan(builder).0
    }

    /// Each step's locks as the current config has them.
    fn step_locks(&self, builder: &str) -> Vec<Vec<Claim>> {
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
    fn start_or_wait_for_locks(&mut self, id: BuildId, worker: String) {
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
    fn on_lock_grants(&mut self, granted: Vec<LockHolder>) {
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
    fn on_step_waiting(&mut self, worker: &str, build_id: BuildId, step: u32) {
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

    /// Switches to a new config (reconfig). Running builds keep the steps and
    /// locks they started with; new and changed builders apply to builds
    /// handed out from now on; a removed worker gets no new build and is
    /// released once its running builds end; lock counts change for new
    /// acquisitions (holders are never evicted).
    fn apply_config(&mut self, config: Arc<MasterConfig>) {
        let now = self.clock.now();
        self.config = config;
        for def in &self.config.workers {
            self.workers
                .entry(def.name.clone())
                .or_insert_with(|| WorkerSlot {
                    conn: None,
                    presence: offline(now, "added by reconfig; not connected yet"),
                    agent_max_builds: def.max_builds,
                    running: BTreeSet::new(),
                    released: false,
                    epoch: 0,
                    refused: BTreeSet::new(),
                    unconfirmed: BTreeSet::new(),
                    last_assigned: 0,
                });
        }
        let removed: Vec<String> = self
            .workers
            .keys()
            .filter(|name| self.config.worker(name).is_none())
            .cloned()
            .collect();
        for name in &removed {
            tracing::info!("worker {name} removed from master.toml: drained, then released");
            self.unbind_lock_waits(name);
            if self.latent.is_latent(name) {
                let actions = self.latent.remove(name, Now::system());
                self.run_latent(name, actions);
                if !self.latent.is_latent(name) {
                    self.latent_tokens.set(name, None);
                    self.latent_providers.remove(name);
                }
            }
            self.drop_if_drained(name);
        }
        let granted = self.locks.set_definitions(self.config.locks.clone());
        self.on_lock_grants(granted);
        self.configure_latent();
        let before: Vec<String> = self
            .workers
            .keys()
            .filter(|w| self.schedules.verdict(w).is_some())
            .cloned()
            .collect();
        let schedules = self.compile_schedules();
        self.schedules.replace(schedules);
        for worker in self.schedules.dropped_since(&before) {
            self.send(&worker, MasterMessage::MasterOverride { presence: None });
        }
        self.refresh_schedules();
        self.assign();
    }

    /// The master-side schedules of the current config (validated with it).
    fn compile_schedules(&self) -> MasterSchedules {
        let specs = self
            .config
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| ScheduleSpec {
                worker: w.name.clone(),
                path: format!("worker[{i}]"),
                timezone: w.timezone.clone(),
                windows: w.schedule.clone(),
            });
        match MasterSchedules::compile(specs, jiff::tz::TimeZone::system()) {
            Ok(schedules) => schedules,
            Err(errors) => {
                // The config check compiles the same schedules; not reached.
                tracing::error!("master-side schedules ignored: {}", errors.join("; "));
                MasterSchedules::default()
            }
        }
    }

    /// The presence the scheduler acts on: the worker's own, unless its
    /// master-side schedule is more restrictive.
    fn effective_presence(&self, worker: &str, pushed: &Presence) -> Presence {
        combine(pushed, self.schedules.verdict(worker))
    }

    /// Re-evaluates the master-side schedules now: tells each agent whose
    /// verdict changed (`MasterOverride`), lets a latent worker the schedule
    /// sends away stop after its builds, and arms one timer for the next
    /// boundary (capped, so a clock jump or suspend is caught up).
    fn refresh_schedules(&mut self) {
        let now = self.clock.now();
        for (worker, verdict) in self.schedules.refresh(now) {
            tracing::info!(
                "worker {worker}: master schedule {}",
                match &verdict {
                    Some(p) => format!("says {} ({})", p.state, p.reason),
                    None => "does not restrict it".to_owned(),
                }
            );
            self.send(
                &worker,
                MasterMessage::MasterOverride {
                    presence: verdict.clone(),
                },
            );
            let takes = self
                .workers
                .get(&worker)
                .map(|slot| self.effective_presence(&worker, &slot.presence))
                .is_some_and(|p| p.state.takes_builds() || p.state == PresenceState::Offline);
            let why = verdict.map(|p| p.reason).unwrap_or_default();
            if !takes {
                self.unbind_lock_waits(&worker);
            }
            let actions = self
                .latent
                .presence_changed(&worker, takes, &why, Now::system());
            self.run_latent(&worker, actions);
        }
        self.schedule_epoch += 1;
        let Some(next) = self.schedules.next_change(now) else {
            return;
        };
        let wait = next
            .duration_since(now)
            .unsigned_abs()
            .min(Duration::from_secs(3600));
        let events = self.events.clone();
        let epoch = self.schedule_epoch;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = events.send(Event::ScheduleTick { epoch });
        });
    }

    /// A worker removed by reconfig leaves once it runs nothing: it is
    /// released (a connected agent is told why) and forgotten.
    fn drop_if_drained(&mut self, worker: &str) {
        let Some(slot) = self.workers.get(worker) else {
            return;
        };
        if !slot.running.is_empty() || self.lock_waits.values().any(|w| w == worker) {
            return;
        }
        if let Some((_, out)) = &slot.conn {
            let _ = out.send(Outbound::Message(MasterMessage::Released {
                reason: "removed from master.toml".into(),
            }));
            let _ = out.send(Outbound::Close("worker removed from master.toml".into()));
        }
        self.workers.remove(worker);
    }

    /// Sets up (or, after a reconfig, updates) the latent workers of the
    /// config. A provider is replaced only while its instance is stopped.
    fn configure_latent(&mut self) {
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
    fn run_latent(&mut self, worker: &str, actions: Vec<LatentAction>) {
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

    /// No connected worker can take queued build `id`: count on a latent
    /// instance that is starting, or start one (within `max_starting`).
    /// Returns what the build waits for.
    fn try_latent(
        &mut self,
        id: BuildId,
        counted_on: &mut BTreeSet<String>,
        why: String,
    ) -> String {
        if self.latent_shutdown {
            return why;
        }
        let candidates: Vec<String> = match self
            .queue
            .get(&id)
            .and_then(|q| self.config.builder(&q.builder))
        {
            Some(builder) => builder
                .workers
                .iter()
                .filter(|w| self.latent.is_latent(w))
                .filter(|w| self.workers.get(*w).is_none_or(|s| s.conn.is_none()))
                // Not while its master-side schedule keeps it away.
                .filter(|w| {
                    self.schedules
                        .verdict(w)
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
            LatentChoice::AlreadyStarting(worker) => format!("latent worker {worker} to start"),
            LatentChoice::Start { worker, actions } => {
                tracing::info!("build {id}: starting latent worker {worker}");
                self.run_latent(&worker, actions);
                format!("latent worker {worker} to start (started for this build)")
            }
            LatentChoice::Wait(reason) => format!("{why}; latent: {reason}"),
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

    /// `worker` went away or offline: builds waiting for locks on it give
    /// their place back and return to the queue. Returns whether any did.
    fn unbind_lock_waits(&mut self, worker: &str) -> bool {
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

    /// [`Scheduler::pick_worker`], remembering within one pass of
    /// [`Scheduler::assign`] which builders no worker can take: hand-outs in
    /// the pass only use capacity up, so a "no" stays a "no", and a long
    /// queue costs one decision per builder instead of one per build.
    fn pick_worker_cached(
        &self,
        id: BuildId,
        no_worker: &mut HashMap<String, String>,
    ) -> Result<String, String> {
        let Some(builder) = self.queue.get(&id).map(|q| q.builder.as_str()) else {
            return Err("not queued".into());
        };
        // A build some worker refused is decided on its own.
        let refused = self.workers.values().any(|slot| slot.refused.contains(&id));
        if !refused && let Some(why) = no_worker.get(builder) {
            return Err(why.clone());
        }
        let decision = self.pick_worker(id);
        if let Err(why) = &decision
            && !refused
        {
            no_worker.insert(builder.to_owned(), why.clone());
        }
        decision
    }

    /// THE decision: which connected worker gets queued build `id` now.
    /// `available` workers first (fewest running builds, then least recently
    /// given one), `reluctant` ones only when no available one can take it,
    /// never `away`/`offline` or full ones. `Err` says what the build waits for.
    pub fn pick_worker(&self, id: BuildId) -> Result<String, String> {
        let Some(queued) = self.queue.get(&id) else {
            return Err("not queued".into());
        };
        let Some(builder) = self.config.builder(&queued.builder) else {
            return Err(format!(
                "builder `{}` is not in master.toml",
                queued.builder
            ));
        };
        let mut best: Option<(PresenceState, usize, u64, &str)> = None;
        let mut why = Vec::new();
        for name in &builder.workers {
            let Some(slot) = self.workers.get(name) else {
                why.push(format!("{name} not configured"));
                continue;
            };
            if slot.conn.is_none() {
                why.push(format!("{name} offline"));
                continue;
            }
            let state = self.effective_presence(name, &slot.presence).state;
            if !state.takes_builds() {
                why.push(format!("{name} {state}"));
                continue;
            }
            let capacity = self
                .config
                .worker(name)
                .map_or(1, |w| w.max_builds)
                .min(slot.agent_max_builds) as usize;
            let busy = slot.running.len() + self.lock_waits.values().filter(|w| *w == name).count();
            if busy >= capacity {
                why.push(format!("{name} busy ({busy}/{capacity})"));
                continue;
            }
            if slot.refused.contains(&id) {
                why.push(format!("{name} refused it"));
                continue;
            }
            let key = (state, slot.running.len(), slot.last_assigned, name.as_str());
            if best.is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2)) {
                best = Some(key);
            }
        }
        match best {
            Some((_, _, _, name)) => Ok(name.to_owned()),
            None => Err(format!("a worker: {}", why.join(", "))),
        }
    }

    fn start_build(&mut self, id: BuildId, worker: String) {
        let Some(queued) = self.queue.remove(&id) else {
            return;
        };
        let step_locks = self.step_locks(&queued.builder);
        let def = self.config.builder(&queued.builder);
        // Mode and depth as the builder says now, like its steps.
        let source = queued.source.clone().map(|mut source| {
            if let Some(configured) = def.and_then(|b| b.source.as_ref()) {
                source.mode = configured.mode;
                source.shallow = configured.shallow;
            }
            source
        });
        let checkout = def.filter(|b| b.source.is_some()).map(|_| StepSpec {
            name: "checkout".into(),
            command: match &source {
                Some(s) => format!("git checkout {} ({})", s.revision, s.mode.as_str()),
                None => "git checkout (no revision)".into(),
            },
            timeout_secs: None,
            env: BTreeMap::new(),
            workdir: None,
            needs_grant: false,
            checkout: true,
        });
        let offset = usize::from(checkout.is_some());
        let steps: Vec<StepSpec> = checkout
            .into_iter()
            .chain(def.into_iter().flat_map(|b| {
                b.steps.iter().enumerate().map(|(i, s)| StepSpec {
                    name: s.name.clone(),
                    command: s.command.clone(),
                    timeout_secs: s.timeout.map(|t| t.as_secs().max(1)),
                    env: s.env.clone(),
                    workdir: s.workdir.clone(),
                    needs_grant: step_locks.get(i + offset).is_some_and(|l| !l.is_empty()),
                    checkout: false,
                })
            }))
            .collect();
        self.assignments += 1;
        if let Some(slot) = self.workers.get_mut(&worker) {
            slot.running.insert(id);
            slot.last_assigned = self.assignments;
        }
        self.latent.build_started(&worker, Now::system());
        tracing::info!("build {id} ({}) handed to {worker}", queued.builder);
        self.send(
            &worker,
            MasterMessage::StartBuild {
                build_id: id,
                builder: queued.builder.clone(),
                steps,
                properties: queued.properties.clone(),
                source,
            },
        );
        self.store
            .mark_started(id, worker.clone(), self.clock.now());
        self.running.insert(
            id,
            Running {
                worker,
                builder: queued.builder,
                properties: queued.properties,
                source: queued.source,
                accepted: false,
                step_locks,
            },
        );
    }

    fn snapshot(&self) -> Snapshot {
        let workers = self
            .config
            .workers
            .iter()
            .filter_map(|def| {
                let slot = self.workers.get(&def.name)?;
                let presence = self.effective_presence(&def.name, &slot.presence);
                Some(WorkerInfo {
                    name: def.name.clone(),
                    state: presence.state,
                    reason: presence.reason.clone(),
                    source: Some(presence.source.clone()),
                    since: Some(presence.since),
                    until: presence.until,
                    connected: slot.conn.is_some(),
                    max_builds: def.max_builds.min(slot.agent_max_builds),
                    running: slot.running.iter().copied().collect(),
                    latent: self.latent.status(&def.name).map(|s| LatentInfo {
                        state: s.state.as_str().to_owned(),
                        reason: s.reason,
                        since: s.since,
                        retry_after: s.retry_after,
                        provider: s.provider.to_owned(),
                    }),
                })
            })
            // Workers removed by a reconfig that still run builds.
            .chain(
                self.workers
                    .iter()
                    .filter(|(name, _)| self.config.worker(name).is_none())
                    .map(|(name, slot)| WorkerInfo {
                        name: name.clone(),
                        state: slot.presence.state,
                        reason: format!(
                            "removed from master.toml; released after its running builds ({})",
                            slot.presence.reason
                        ),
                        source: Some(Source::Master),
                        since: Some(slot.presence.since),
                        until: None,
                        connected: slot.conn.is_some(),
                        max_builds: slot.agent_max_builds,
                        running: slot.running.iter().copied().collect(),
                        latent: None,
                    }),
            )
            .collect();
        Snapshot {
            workers: WorkerList {
                paused: self.paused,
                workers,
            },
            waiting_for: self
                .queue
                .iter()
                .filter_map(|(id, q)| Some((*id, q.waiting_for.clone()?)))
                // Running builds whose next step waits for a lock.
                .chain(
                    self.running
                        .keys()
                        .filter_map(|id| Some((*id, self.locks.waiting_text(*id)?))),
                )
                .collect(),
            running: self
                .running
                .iter()
                .map(|(id, run)| (*id, run.worker.clone()))
                .collect(),
        }
    }
}

fn offline(now: Timestamp, reason: &str) -> Presence {
    Presence {
        state: PresenceState::Offline,
        reason: reason.to_owned(),
        source: Source::Master,
        since: now,
        until: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MasterConfig;
    use std::path::Path;

    const HASH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    struct FixedClock(Timestamp);
    impl Clock for FixedClock {
        fn now(&self) -> Timestamp {
            self.0
        }
    }

    struct Harness {
        scheduler: Scheduler,
        _events: mpsc::UnboundedReceiver<Event>,
        _dir: tempfile::TempDir,
        store: Store,
        next_conn: ConnId,
    }

    fn config(missing: &str) -> Arc<MasterConfig> {
        let text = format!(
            r#"
missing_timeout = "{missing}"
[[worker]]
name = "a"
token_sha256 = "{HASH}"
[[worker]]
name = "b"
token_sha256 = "{HASH}"
[[worker]]
name = "r"
token_sha256 = "{HASH}"
[[builder]]
name = "app"
workers = ["a", "b", "r"]
steps = [{{ name = "s", command = "true" }}]
"#
        );
        Arc::new(MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/tmp")).unwrap())
    }

    fn presence(state: PresenceState) -> Presence {
        Presence {
            state,
            reason: "test".into(),
            source: Source::Manual,
            since: Timestamp::UNIX_EPOCH,
            until: None,
        }
    }

    impl Harness {
        fn new() -> Harness {
            Harness::with_config(config("60s"))
        }

        fn with_config(config: Arc<MasterConfig>) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("m.db")).unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            let scheduler = Scheduler::new(
                config,
                store.clone(),
                Arc::new(FixedClock(Timestamp::UNIX_EPOCH)),
                tx,
                Vec::new(),
                BTreeMap::new(),
                false,
            );
            Harness {
                scheduler,
                _events: rx,
                _dir: dir,
                store,
                next_conn: 1,
            }
        }

        fn connect(
            &mut self,
            worker: &str,
            state: PresenceState,
            running: Vec<BuildId>,
        ) -> (ConnId, mpsc::UnboundedReceiver<Outbound>) {
            let (out, rx) = mpsc::unbounded_channel();
            let conn = self.next_conn;
            self.next_conn += 1;
            self.scheduler.handle(Event::Connected {
                worker: worker.into(),
                conn,
                hello: Hello {
                    agent_version: "test".into(),
                    max_builds: 1,
                    presence: presence(state),
                    running,
                },
                out,
            });
            (conn, rx)
        }

        async fn submit(&mut self) -> BuildId {
            let id = self
                .store
                .insert_build("app".into(), BTreeMap::new(), Timestamp::UNIX_EPOCH)
                .await
                .unwrap();
            self.scheduler.handle(Event::Submitted {
                id,
                builder: "app".into(),
                properties: BTreeMap::new(),
                source: None,
            });
            id
        }
    }

    fn started(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> Vec<BuildId> {
        let mut ids = Vec::new();
        while let Ok(out) = rx.try_recv() {
            if let Outbound::Message(MasterMessage::StartBuild { build_id, .. }) = out {
                ids.push(build_id);
            }
        }
        ids
    }

    fn released(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> bool {
        let mut seen = false;
        while let Ok(out) = rx.try_recv() {
            seen |= matches!(out, Outbound::Message(MasterMessage::Released { .. }));
        }
        seen
    }

    #[tokio::test]
    async fn available_first_reluctant_only_when_available_ones_are_busy() {
        let mut h = Harness::new();
        let (_, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let (_, mut r) = h.connect("r", PresenceState::Reluctant, vec![]);
        let first = h.submit().await;
        assert_eq!(started(&mut a), vec![first]);
        assert!(started(&mut r).is_empty());
        let second = h.submit().await;
        assert_eq!(
            started(&mut r),
            vec![second],
            "a is full, so the reluctant one gets it"
        );
    }

    #[tokio::test]
    async fn away_and_offline_get_nothing_and_the_build_waits() {
        let mut h = Harness::new();
        let (_, mut a) = h.connect("a", PresenceState::Away, vec![]);
        assert!(released(&mut a), "an away idle worker is released");
        let id = h.submit().await;
        let snapshot = h.scheduler.snapshot();
        let why = &snapshot.waiting_for[&id];
        assert!(why.contains("a away") && why.contains("b offline"), "{why}");
        let (conn, _) = (1, ());
        h.scheduler.handle(Event::Agent {
            worker: "a".into(),
            conn,
            message: AgentMessage::Presence {
                presence: presence(PresenceState::Available),
            },
        });
        assert_eq!(started(&mut a), vec![id]);
    }

    #[tokio::test]
    async fn refused_build_is_requeued_and_goes_elsewhere() {
        let mut h = Harness::new();
        let (ca, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        let (_, mut b) = h.connect("b", PresenceState::Available, vec![]);
        h.scheduler.handle(Event::Agent {
            worker: "a".into(),
            conn: ca,
            message: AgentMessage::BuildRefused {
                build_id: id,
                reason: "turned away".into(),
            },
        });
        assert_eq!(started(&mut b), vec![id]);
        assert!(started(&mut a).is_empty());
    }

    #[tokio::test]
    async fn pause_holds_new_builds_and_resume_hands_them_out() {
        let mut h = Harness::new();
        let (_, mut a) = h.connect("a", PresenceState::Available, vec![]);
        h.scheduler.handle(Event::SetPaused { paused: true });
        let id = h.submit().await;
        assert!(started(&mut a).is_empty());
        assert_eq!(h.scheduler.snapshot().waiting_for[&id], "master is paused");
        h.scheduler.handle(Event::SetPaused { paused: false });
        assert_eq!(started(&mut a), vec![id]);
    }

    #[tokio::test]
    async fn a_worker_cannot_finish_another_workers_build() {
        let mut h = Harness::new();
        let (_, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let (cb, _b) = h.connect("b", PresenceState::Away, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        h.scheduler.handle(Event::Agent {
            worker: "b".into(),
            conn: cb,
            message: AgentMessage::BuildFinished {
                result: BuildResult {
                    build_id: id,
                    outcome: nightshift_proto::wire::Outcome::Success,
                    steps: vec![],
                    reason: None,
                    log: String::new(),
                    finished_at: Timestamp::UNIX_EPOCH,
                },
            },
        });
        assert_eq!(h.scheduler.snapshot().running[&id], "a");
    }

    #[tokio::test]
    async fn reconnect_cancels_builds_moved_elsewhere_and_missing_requeues() {
        let mut h = Harness::new();
        let (ca, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        h.scheduler.handle(Event::Disconnected {
            worker: "a".into(),
            conn: ca,
            reason: "test".into(),
        });
        let epoch = h.scheduler.workers["a"].epoch;
        h.scheduler.handle(Event::MissingTimeout {
            worker: "a".into(),
            epoch,
        });
        let (_, mut b) = h.connect("b", PresenceState::Available, vec![]);
        assert_eq!(started(&mut b), vec![id], "re-queued and handed to b");
        let (_, mut a2) = h.connect("a", PresenceState::Available, vec![id]);
        let welcome = a2.try_recv().unwrap();
        assert!(
            matches!(welcome, Outbound::Message(MasterMessage::Welcome { ref cancel, .. }) if cancel == &vec![id]),
            "{welcome:?}"
        );
    }

    #[tokio::test]
    async fn a_build_the_worker_cancelled_by_itself_is_requeued_and_runs_elsewhere() {
        let mut h = Harness::new();
        let (ca, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        let (_, mut b) = h.connect("b", PresenceState::Away, vec![]);
        h.scheduler.handle(Event::Agent {
            worker: "a".into(),
            conn: ca,
            message: AgentMessage::Presence {
                presence: presence(PresenceState::Away),
            },
        });
        h.scheduler.handle(Event::Agent {
            worker: "a".into(),
            conn: ca,
            message: AgentMessage::BuildFinished {
                result: BuildResult {
                    build_id: id,
                    outcome: Outcome::Cancelled,
                    steps: vec![],
                    reason: Some("stop deadline".into()),
                    log: String::new(),
                    finished_at: Timestamp::UNIX_EPOCH,
                },
            },
        });
        let mut acked = false;
        while let Ok(out) = a.try_recv() {
            acked |= matches!(out, Outbound::Message(MasterMessage::ResultStored { build_id }) if build_id == id);
        }
        assert!(acked, "the agent may forget its cancelled result");
        assert!(
            h.scheduler.queue.contains_key(&id),
            "back in the queue, not finished"
        );
        h.scheduler.handle(Event::Agent {
            worker: "b".into(),
            conn: 2,
            message: AgentMessage::Presence {
                presence: presence(PresenceState::Available),
            },
        });
        assert_eq!(started(&mut b), vec![id]);
    }

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
