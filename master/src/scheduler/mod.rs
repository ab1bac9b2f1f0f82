//! The scheduler: ONE task that owns the queue, the running builds and every
//! worker's connection and presence, driven by ONE closed [`Event`] enum.
//!
//! Nothing here polls: a new request, a presence change, a finished build, a
//! connection or a timer each arrive as an event and the scheduler reacts in
//! the same turn. Durable state goes to the [`Store`]; a request reaches the
//! scheduler only after its row is committed, and a result is acknowledged to
//! the agent (`ResultStored`) only after its row is committed.
//!
//! This file holds the state and the dispatch; each event family lives in its
//! own module: [`connections`] (hello, disconnect, missing, reconcile,
//! release), [`builds`] (queue, hand-out, finish, cancel, re-queue, watchers),
//! [`locks`] (lock grants and step waits), [`latent`] (on-demand workers),
//! [`schedules`] (master-side schedules and effective presence),
//! [`reconfig`] (applying a new config), [`snapshot`] (the API's view),
//! [`timers`] (the one timer queue). The decision "which worker gets this
//! request" is the pure function [`pick::pick_worker`].

mod admission;
mod builds;
pub(crate) use builds::ARTIFACT_STEP;
mod connections;
mod eligible;
mod enrolment;
pub mod estimate;
mod latent;
mod locks;
pub mod pick;
mod reconfig;
mod schedules;
mod shown;
mod snapshot;
mod timers;

#[cfg(test)]
mod lock_stress;
#[cfg(test)]
mod test_harness;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use nightshift_policy::{Presence, PresenceState, Source};
use nightshift_proto::api::{WorkerPage, WorkerQuery};
use nightshift_proto::clock::Clock;
use nightshift_proto::wire::{
    AgentMessage, BuildId, BuildSource, HEARTBEAT_SECS, MasterMessage, Outlook,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::MasterConfig;
use crate::latent::{LatentEvent, LatentPool, LatentProvider, LatentTokens, MasterAccess};
use crate::locks::{BuildLocks, Claim, LockHolder};
use crate::master_schedule::MasterSchedules;
use crate::outbox::{AgentOutbox, Committed, Outbound};
use crate::snapshot::{BuildWaits, Snapshot};
use crate::store::{Store, StoreOutcome, UnfinishedBuild};
use crate::worker_groups::Member;

use eligible::Eligible;
use estimate::Estimates;
use locks::LockWaits;
use shown::ShownStates;
use timers::Timers;

/// Identity of one agent connection, unique for the master's lifetime.
pub type ConnId = u64;

/// After a reconnect, how long the agent has to deliver the results of
/// builds the master expected it to run but that its hello did not list.
pub const RECONCILE_GRACE: Duration = Duration::from_secs(2 * HEARTBEAT_SECS);

/// Agent connection events (connect, frames, disconnect) waiting for the
/// scheduler; connection tasks wait (and stop reading their sockets) when
/// this many are queued. Each connection is also rate-limited, so one agent
/// cannot fill it for long.
pub const AGENT_INBOX: usize = 1024;

/// Most agent events handled in one turn of the loop before one hand-out
/// pass (see [`Scheduler::run`]).
pub const AGENT_BATCH: usize = 64;

/// The parts of an agent's hello the scheduler uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub agent_version: String,
    pub max_builds: u32,
    pub presence: Presence,
    pub running: Vec<BuildId>,
    /// The time ahead as the agent sees it (window-aware admission).
    pub outlook: Option<Outlook>,
}

/// Everything the scheduler reacts to.
#[derive(Debug)]
pub enum Event {
    /// An authenticated agent said hello.
    Connected {
        worker: String,
        conn: ConnId,
        hello: Hello,
        /// The heartbeat period its connection keeps (told in the welcome).
        heartbeat_secs: u64,
        out: AgentOutbox,
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
    /// One page of the workers, in name order (`master workers`, the
    /// dashboard): rows are built for the page only.
    WorkersPage {
        query: WorkerQuery,
        limit: usize,
        reply: oneshot::Sender<WorkerPage>,
    },
    /// What each of these builds waits for, for those that wait (the part
    /// of a [`Snapshot`] one build's answer needs, without the workers).
    WaitingFor {
        ids: Vec<BuildId>,
        reply: oneshot::Sender<BuildWaits>,
    },
    /// A latent provider call or timer ended.
    Latent(LatentEvent),
    /// The master is shutting down: stop every latent instance, answer once
    /// all are stopped; no new instance is started from now on.
    StopLatent {
        reply: oneshot::Sender<()>,
    },
    /// The next boundary of a master-side schedule is due (one timer, reset
    /// by every refresh).
    ScheduleTick,
    /// A step's lock grant outlived its lease (the step's timeout plus
    /// grace) while the build still held it.
    LeaseEnded {
        build_id: BuildId,
        step: u32,
    },
    /// A worker enrolled (committed, and in the server's roster).
    Enrolled {
        member: Member,
    },
    /// An enrolled worker was revoked (committed, and out of the server's
    /// roster); answers whether the scheduler knew it.
    Revoked {
        name: String,
        reply: oneshot::Sender<bool>,
    },
    /// The worker whose lease of this build ended may be given it again.
    CoolOffEnded {
        build_id: BuildId,
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
    conn: Option<(ConnId, AgentOutbox)>,
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
    /// The time ahead its agent last sent (when it stops taking builds,
    /// its next window, its overrun grace).
    outlook: Option<Outlook>,
}

impl WorkerSlot {
    /// A configured worker that has not connected.
    fn new(presence: Presence, max_builds: u32) -> WorkerSlot {
        WorkerSlot {
            conn: None,
            presence,
            agent_max_builds: max_builds,
            running: BTreeSet::new(),
            released: false,
            epoch: 0,
            refused: BTreeSet::new(),
            unconfirmed: BTreeSet::new(),
            last_assigned: 0,
            outlook: None,
        }
    }
}

/// A build waiting in the queue.
struct Queued {
    builder: String,
    properties: BTreeMap<String, String>,
    waiting_for: Option<Waiting>,
    /// A worker refused it since it was queued: its pick is decided on its
    /// own, not from the builder's cached "no worker" of the pass.
    refused: bool,
    /// The worker it was last handed to, kept across a re-queue: the only
    /// one whose result or adoption of it is accepted.
    handed_to: Option<String>,
    /// A worker it is not handed to again until [`LEASE_COOL_OFF`] ends:
    /// the one whose step held its locks past the lease.
    avoid: Option<String>,
    /// When it (re-)joined the queue, for the wait-before-start histogram;
    /// `None` for a build restored at a master restart (its wait began
    /// before this process and is not measured).
    queued_at: Option<std::time::Instant>,
    /// The revision it builds (builders with a `source`).
    source: Option<BuildSource>,
}

impl Queued {
    fn new(
        builder: String,
        properties: BTreeMap<String, String>,
        source: Option<BuildSource>,
    ) -> Queued {
        Queued {
            builder,
            properties,
            waiting_for: None,
            refused: false,
            source,
            handed_to: None,
            avoid: None,
            queued_at: Some(std::time::Instant::now()),
        }
    }

    /// A build restored from the store at a master restart.
    fn restored(
        builder: String,
        properties: BTreeMap<String, String>,
        source: Option<BuildSource>,
        worker: Option<String>,
    ) -> Queued {
        Queued {
            queued_at: None,
            ..Queued::handed_back(builder, properties, source, worker)
        }
    }

    /// A build back in the queue that was handed to `worker`.
    fn handed_back(
        builder: String,
        properties: BTreeMap<String, String>,
        source: Option<BuildSource>,
        worker: Option<String>,
    ) -> Queued {
        Queued {
            handed_to: worker,
            ..Queued::new(builder, properties, source)
        }
    }
}

/// What a queued build waits for.
#[derive(Debug, Clone, PartialEq)]
enum Waiting {
    /// Said in words when it was decided (locks, pause, admission, latent).
    Because(String),
    /// No worker the builder lists can take it now. The words (each
    /// worker's state) are put together only when the build is shown, not
    /// on every pick: building them visits every listed worker.
    NoWorker {
        /// What the latent pool said, when it was asked.
        latent: Option<String>,
    },
}

/// A build handed out to a worker.
struct Running {
    worker: String,
    builder: String,
    properties: BTreeMap<String, String>,
    source: Option<BuildSource>,
    accepted: bool,
    /// Each step's locks as configured when the build started (a reconfig
    /// does not change a running build).
    step_locks: Vec<Vec<Claim>>,
    /// The step whose locks are granted (its lease runs), if any.
    leased_step: Option<u32>,
    /// The step waiting for its locks on the current connection, if any.
    waiting_step: Option<u32>,
    /// When it was handed out, by the scheduler's clock (the start of the
    /// span its builder's estimate measures); `None` for a build adopted
    /// from a worker that came back with it, whose hand-out is not known.
    handed_out: Option<jiff::Timestamp>,
}

/// What the store held at start, for [`Scheduler::new`].
#[derive(Debug, Default)]
pub struct Restored {
    /// Builds not finished before the restart.
    pub unfinished: Vec<UnfinishedBuild>,
    /// Each worker's last known presence.
    pub last_seen: BTreeMap<String, Presence>,
    pub paused: bool,
    /// The workers enrolled through a `[[worker_group]]`.
    pub enrolled: Vec<Member>,
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
    lock_waits: LockWaits,
    /// Latent (on-demand) workers: their life cycle, providers and tokens.
    latent: LatentPool,
    latent_providers: BTreeMap<String, Arc<dyn LatentProvider>>,
    latent_tokens: LatentTokens,
    latent_access: MasterAccess,
    /// Master-side schedules of workers (`schedule` in `[[worker]]`).
    schedules: MasterSchedules,
    /// Shutting down: no latent instance is started any more.
    latent_shutdown: bool,
    /// Who waits for every latent instance to be stopped.
    latent_stopped: Vec<oneshot::Sender<()>>,
    /// Missing-worker timers, reconcile deadlines and the schedule tick.
    timers: Timers,
    /// Each builder's estimated build duration (window-aware admission).
    estimates: Estimates,
    /// Per builder, the workers that could take a build now, in pick order
    /// (kept up to date by [`Scheduler::touch`]).
    eligible: Eligible,
    /// Every worker under the state it is shown in (pages by state).
    shown: ShownStates,
    /// Handling a batch of agent events: a hand-out pass waits for its end.
    batching: bool,
    /// A hand-out pass was asked for during the batch.
    assign_due: bool,
    /// Enrolled workers (`[[worker_group]]` members) → their group.
    members: HashMap<String, String>,
    /// Worker group → its enrolled members, by name.
    group_members: HashMap<String, BTreeSet<String>>,
}

impl Scheduler {
    /// Builds the scheduler from the config and the store's unfinished
    /// builds. `events` is the sender of the channel [`Scheduler::run`] reads.
    /// Seeds the builders' duration estimates with `(builder, duration)`
    /// of past successful builds, oldest first (from the store at start).
    pub fn seed_estimates(&mut self, history: Vec<(String, jiff::SignedDuration)>) {
        for (builder, took) in history {
            self.estimates.record(&builder, took);
        }
    }

    pub fn new(
        config: Arc<MasterConfig>,
        store: Store,
        clock: Arc<dyn Clock>,
        events: mpsc::UnboundedSender<Event>,
        restored: Restored,
    ) -> Scheduler {
        let Restored {
            unfinished,
            last_seen,
            paused,
            enrolled,
        } = restored;
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
                    WorkerSlot::new(not_connected(&w.name), w.max_builds),
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
            lock_waits: LockWaits::default(),
            latent: LatentPool::new(MasterAccess::default(), 1),
            latent_providers: BTreeMap::new(),
            latent_tokens: LatentTokens::default(),
            latent_access: MasterAccess::default(),
            schedules: MasterSchedules::default(),
            latent_shutdown: false,
            latent_stopped: Vec::new(),
            timers: Timers::default(),
            estimates: Estimates::default(),
            eligible: Eligible::default(),
            shown: ShownStates::default(),
            batching: false,
            assign_due: false,
            members: HashMap::new(),
            group_members: HashMap::new(),
        };
        for member in enrolled {
            scheduler.add_member(member);
        }
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
                            leased_step: None,
                            waiting_step: None,
                            handed_out: build.started_at,
                        },
                    );
                }
                (nightshift_proto::api::BuildState::Running, None) => {
                    scheduler.store.requeue(
                        build.id,
                        Some("its worker is no longer in master.toml".into()),
                    );
                    crate::metrics::METRICS.retried(crate::metrics::RetryReason::WorkerRemoved);
                    scheduler.queue.insert(
                        build.id,
                        Queued::restored(
                            build.builder,
                            build.properties,
                            build.source,
                            build.handed_to,
                        ),
                    );
                }
                _ => {
                    let mut queued = Queued::restored(
                        build.builder,
                        build.properties,
                        build.source,
                        build.handed_to,
                    );
                    // A cool-off that began before the restart runs on.
                    if let Some((worker, until)) = build.cool_off
                        && let Ok(left) = std::time::Duration::try_from(until.duration_since(now))
                        && !left.is_zero()
                    {
                        queued.avoid = Some(worker);
                        scheduler.timers.set(
                            timers::TimerSlot::CoolOff(build.id),
                            left,
                            Event::CoolOffEnded { build_id: build.id },
                        );
                    }
                    scheduler.queue.insert(build.id, queued);
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
        scheduler.rebuild_eligible();
        scheduler
    }

    /// The event loop: runs until every sender is gone. Timers are polled
    /// here, in the same loop, so a timer is an event like any other.
    /// `agent_inbox` is the bounded channel of agent connection events
    /// ([`AGENT_INBOX`]); `inbox` carries the API's, timers' and tasks'.
    pub async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Event>,
        mut agent_inbox: mpsc::Receiver<Event>,
    ) {
        self.refresh_schedules();
        self.assign();
        loop {
            tokio::select! {
                event = inbox.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                Some(event) = agent_inbox.recv() => {
                    self.handle_agent_batch(event, &mut agent_inbox);
                    self.handle_api_turn(&mut inbox);
                }
                Some(event) = self.timers.next_expired() => self.handle(event),
            }
        }
    }

    /// After each batch of agent events, the other inbox gets its turn (at
    /// most [`AGENT_BATCH`] of its events), so a submit or an API question
    /// waits for at most one batch even while a farm-wide flip keeps the
    /// agent inbox full, and agents wait for at most one turn of the API.
    fn handle_api_turn(&mut self, inbox: &mut mpsc::UnboundedReceiver<Event>) {
        for _ in 0..AGENT_BATCH {
            match inbox.try_recv() {
                Ok(event) => self.handle(event),
                Err(_) => break,
            }
        }
    }

    /// Handles `first` and the agent events queued behind it (at most
    /// [`AGENT_BATCH`]) with one hand-out pass at the end instead of one per
    /// event: a farm-wide flip is 10,000 presences, and each pass visits the
    /// queue. The other inbox is served between batches.
    fn handle_agent_batch(&mut self, first: Event, agent_inbox: &mut mpsc::Receiver<Event>) {
        self.batching = true;
        self.handle(first);
        for _ in 1..AGENT_BATCH {
            match agent_inbox.try_recv() {
                Ok(event) => self.handle(event),
                Err(_) => break,
            }
        }
        self.batching = false;
        if std::mem::take(&mut self.assign_due) {
            self.assign();
        }
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Connected {
                worker,
                conn,
                hello,
                heartbeat_secs,
                out,
            } => self.on_connected(worker, conn, hello, heartbeat_secs, out),
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
            } => self.on_submitted(id, builder, properties, source),
            Event::ResultCommitted { worker, id, stored } => {
                self.on_result_committed(&worker, id, stored)
            }
            Event::SetPaused { paused } => self.on_set_paused(paused),
            Event::Cancel { id, reason, reply } => {
                let _ = reply.send(self.on_cancel(id, reason));
            }
            Event::Watch { id, reply } => self.on_watch(id, reply),
            Event::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Event::WorkersPage {
                query,
                limit,
                reply,
            } => {
                let _ = reply.send(self.workers_page(&query, limit));
            }
            Event::WaitingFor { ids, reply } => {
                let _ = reply.send(self.waiting_for(&ids));
            }
            Event::StopLatent { reply } => self.on_stop_latent(reply),
            Event::ScheduleTick => {
                self.refresh_schedules();
                self.assign();
            }
            Event::LeaseEnded { build_id, step } => self.on_lease_ended(build_id, step),
            Event::CoolOffEnded { build_id } => {
                if let Some(queued) = self.queue.get_mut(&build_id) {
                    queued.avoid = None;
                }
                self.store.set_cool_off(build_id, None);
                self.assign();
            }
            Event::Reconfig { config, reply } => {
                self.apply_config(config);
                let _ = reply.send(());
            }
            Event::Latent(event) => self.on_latent_event(event),
            Event::Enrolled { member } => self.on_enrolled(member),
            Event::Revoked { name, reply } => {
                let _ = reply.send(self.on_revoked(&name));
            }
        }
        #[cfg(test)]
        self.check_eligible();
    }

    /// Reacts to one frame from the current connection of `worker`.
    fn on_agent(&mut self, worker: &str, message: AgentMessage) {
        match message {
            AgentMessage::Hello { .. } => {
                tracing::warn!("worker {worker}: a second hello on one connection is ignored");
            }
            AgentMessage::Presence { presence, outlook } => {
                self.on_presence(worker, presence, outlook)
            }
            AgentMessage::BuildAccepted { build_id } => match self.running.get_mut(&build_id) {
                Some(run) if run.worker == worker => run.accepted = true,
                _ => self.refuse(worker, build_id, "accepted"),
            },
            AgentMessage::BuildRefused { build_id, reason } => {
                self.on_build_refused(worker, build_id, &reason)
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
                    crate::metrics::METRICS.output_received(data.len() as u64);
                    self.store.append_log(build_id, step, data);
                } else {
                    self.refuse(worker, build_id, "sent output for");
                }
            }
            AgentMessage::StepFinished { build_id, result } => {
                if self.owns(worker, build_id) {
                    let step = result.step;
                    self.store.store_step(build_id, result);
                    self.release_step(build_id, step);
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

    /// Whether `conn` is the connection `worker` currently uses.
    fn is_current(&self, worker: &str, conn: ConnId) -> bool {
        self.workers
            .get(worker)
            .and_then(|slot| slot.conn.as_ref())
            .is_some_and(|(id, _)| *id == conn)
    }

    /// Sends `message` to `worker` if it is connected.
    fn send(&self, worker: &str, message: MasterMessage) {
        if let Some((_, out)) = self.workers.get(worker).and_then(|s| s.conn.as_ref()) {
            let _ = out.send(Outbound::Message(message));
        }
    }

    /// Sends `message` to `worker` once `committed` is (its later frames
    /// wait too, so they keep their order).
    fn send_after_commit(&self, worker: &str, committed: Committed, message: MasterMessage) {
        if let Some((_, out)) = self.workers.get(worker).and_then(|s| s.conn.as_ref())
            && out.send(Outbound::AfterCommit(committed)).is_ok()
        {
            let _ = out.send(Outbound::Message(message));
        }
    }
}

/// The presence of a worker that is not connected.
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
    use nightshift_policy::PresenceState;
    use tokio::sync::oneshot;

    use super::test_harness::{Harness, presence};
    use super::*;

    /// A question to the API asked while the agent inbox is full (a
    /// farm-wide flip) is answered after at most one batch of agent events.
    /// Tried a dozen times: an unordered choice between the inboxes would
    /// let it wait several batches in most of the tries.
    #[tokio::test]
    async fn the_api_waits_for_at_most_one_batch_of_a_full_agent_inbox() {
        for _ in 0..12 {
            let mut h = Harness::new();
            let (conn, _outbox) = h.connect("a", PresenceState::Available, vec![]);
            let (api_tx, api_rx) = mpsc::unbounded_channel();
            let (agent_tx, agent_rx) = mpsc::channel(AGENT_INBOX);
            // Each presence names its place in the inbox; the snapshot
            // shows the last one handled.
            for i in 0..AGENT_INBOX {
                let state = if i % 2 == 0 {
                    PresenceState::Away
                } else {
                    PresenceState::Available
                };
                let message = AgentMessage::Presence {
                    presence: Presence {
                        reason: format!("event {}", i + 1),
                        ..presence(state)
                    },
                    outlook: None,
                };
                agent_tx
                    .try_send(Event::Agent {
                        worker: "a".into(),
                        conn,
                        message,
                    })
                    .unwrap();
            }
            let (reply, answer) = oneshot::channel();
            api_tx.send(Event::Snapshot { reply }).unwrap();
            let scheduler = std::mem::replace(&mut h.scheduler, Harness::new().scheduler);
            let running = tokio::spawn(scheduler.run(api_rx, agent_rx));
            let snapshot = answer.await.unwrap();
            let reason = &snapshot.workers.workers[0].reason;
            let handled: usize = match reason.strip_prefix("event ") {
                Some(n) => n.parse().unwrap(),
                None => 0,
            };
            assert!(
                handled <= AGENT_BATCH,
                "{handled} agent events were handled before the API's question ({reason})"
            );
            drop((api_tx, agent_tx));
            running.await.unwrap();
        }
    }
}
