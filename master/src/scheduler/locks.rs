//! The scheduler's glue to the lock table: which locks a build and each of
//! its steps take, waiting for builder-level locks with the chosen worker's
//! slot kept, acting on grants, and step grants.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use nightshift_proto::wire::{BuildId, MasterMessage};

use super::timers::TimerSlot;
use super::{Event, Scheduler, Waiting};
use crate::locks::{Claim, LockHolder, split_locks};
use crate::metrics::{LockLevel, METRICS, RetryReason};
use crate::store::StepGrant;

/// How long past its step's timeout a lock grant lasts: the agent kills the
/// step at its timeout and reports it; a grant still held after this grace
/// is taken back (the agent is broken or lying).
pub const LEASE_GRACE: Duration = Duration::from_secs(10);
/// How long a build whose lease ended is not handed back to the worker that
/// held it, when the builder lists another worker.
pub const LEASE_COOL_OFF: Duration = Duration::from_secs(300);

/// Queued builds whose worker is chosen and whose builder-level locks are
/// being waited for (the worker's slot is kept for them), by build and by
/// worker, so a worker's count costs O(1) on the pick's path.
#[derive(Debug, Default)]
pub(super) struct LockWaits {
    by_build: BTreeMap<BuildId, String>,
    by_worker: HashMap<String, BTreeSet<BuildId>>,
}

impl LockWaits {
    /// The worker build `id` waits on.
    pub fn get(&self, id: &BuildId) -> Option<&String> {
        self.by_build.get(id)
    }

    pub fn insert(&mut self, id: BuildId, worker: String) {
        if let Some(old) = self.by_build.insert(id, worker.clone()) {
            self.forget(&old, id);
        }
        self.by_worker.entry(worker).or_default().insert(id);
    }

    /// Ends build `id`'s wait; answers the worker it waited on.
    pub fn remove(&mut self, id: &BuildId) -> Option<String> {
        let worker = self.by_build.remove(id)?;
        self.forget(&worker, *id);
        Some(worker)
    }

    fn forget(&mut self, worker: &str, id: BuildId) {
        if let Some(ids) = self.by_worker.get_mut(worker) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_worker.remove(worker);
            }
        }
    }

    /// How many builds wait on `worker`.
    pub fn count(&self, worker: &str) -> usize {
        self.by_worker.get(worker).map_or(0, BTreeSet::len)
    }

    /// The builds waiting on `worker`.
    pub fn of(&self, worker: &str) -> Vec<BuildId> {
        self.by_worker
            .get(worker)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }
}

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
                METRICS.lock_wait(LockLevel::Build);
                self.note_waiting(id, Waiting::Because(format!("{why} (on {worker})")));
                self.lock_waits.insert(id, worker.clone());
                self.touch(&worker);
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
                        self.grant_step(&worker, id, step);
                    }
                }
                LockHolder::Build(id) => {
                    let Some(worker) = self.lock_waits.remove(&id) else {
                        continue; // a running build re-taking its locks after a restart
                    };
                    self.touch(&worker);
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
            Ok(true) => self.grant_step(worker, build_id, step),
            Ok(false) => {
                if let Some(run) = self.running.get_mut(&build_id) {
                    run.waiting_step = Some(step);
                }
                let why = self.locks.waiting_text(build_id).unwrap_or_default();
                tracing::info!("build {build_id} step {step}: waiting for {why}");
                METRICS.lock_wait(LockLevel::Step);
            }
            Err(e) => {
                tracing::error!("build {build_id} step {step}: {e}; started without that lock");
                self.send(worker, MasterMessage::StepGranted { build_id, step });
            }
        }
    }

    /// `step` of `build_id` holds its locks: persist the grant (a restarted
    /// master takes it again), arm its lease (the step's timeout plus
    /// [`LEASE_GRACE`]), and only after the commit tell the agent. A
    /// repeated request (after a reconnect) is answered again; it does not
    /// extend the lease.
    pub(super) fn grant_step(&mut self, worker: &str, build_id: BuildId, step: u32) {
        let Some(run) = self.running.get_mut(&build_id) else {
            return;
        };
        run.waiting_step = None;
        if run.leased_step != Some(step) {
            self.grant_lease_only(build_id, step);
        }
        // Persisted, then sent in order with everything else for this
        // connection: a grant can never reach the agent after a later
        // frame (a re-queue's new StartBuild of the same build).
        let committed = self
            .store
            .save_step_grant(build_id, step, worker.to_owned());
        self.send_after_commit(
            worker,
            committed,
            MasterMessage::StepGranted { build_id, step },
        );
    }

    /// The agent finished `step`: its locks go to the next waiter.
    pub(super) fn release_step(&mut self, build_id: BuildId, step: u32) {
        if let Some(run) = self.running.get_mut(&build_id)
            && run.leased_step == Some(step)
        {
            run.leased_step = None;
            self.timers.cancel(&TimerSlot::StepLease(build_id));
        }
        self.store.drop_step_grant(build_id, step);
        let granted = self.locks.release(LockHolder::Step(build_id, step));
        self.on_lock_grants(granted);
    }

    /// A step's lease ended while it still held its locks: the master takes
    /// the locks back, cancels the build on its worker and re-queues it as a
    /// retry; that worker's result for it is no longer accepted.
    pub(super) fn on_lease_ended(&mut self, build_id: BuildId, step: u32) {
        let Some(run) = self.running.get(&build_id) else {
            return;
        };
        if run.leased_step != Some(step) {
            return;
        }
        let worker = run.worker.clone();
        let timeout = self
            .config
            .builder(&run.builder)
            .and_then(|b| b.steps.get(step as usize))
            .and_then(|s| s.timeout)
            .unwrap_or_default();
        let reason = format!(
            "step {step} held its locks {}s past its timeout ({}s) on worker {worker}; lease ended",
            LEASE_GRACE.as_secs(),
            timeout.as_secs()
        );
        self.send(
            &worker,
            MasterMessage::CancelBuild {
                build_id,
                reason: reason.clone(),
            },
        );
        self.requeue(&worker, build_id, &reason, RetryReason::LockLeaseEnded);
        // Taken back: nothing more from that worker is accepted for it, and
        // it does not get it straight back (unless nobody else could).
        if let Some(queued) = self.queue.get_mut(&build_id) {
            queued.handed_to = None;
            let others = self
                .config
                .builder(&queued.builder)
                .is_some_and(|def| def.workers.iter().any(|name| *name != worker));
            if others {
                tracing::info!(
                    "build {build_id}: not handed to {worker} again for {} s",
                    LEASE_COOL_OFF.as_secs()
                );
                queued.avoid = Some(worker.clone());
                self.timers.set(
                    TimerSlot::CoolOff(build_id),
                    LEASE_COOL_OFF,
                    Event::CoolOffEnded { build_id },
                );
                let until = self.clock.now() + LEASE_COOL_OFF;
                self.store
                    .set_cool_off(build_id, Some((worker.clone(), until)));
            }
        }
        self.store.forget_handed_to(build_id);
        self.maybe_release(&worker);
        self.assign();
    }

    /// After a restart: the step grants persisted before it are held again
    /// (before any agent connects), with a fresh lease.
    pub fn restore_step_grants(&mut self, grants: Vec<StepGrant>) {
        for grant in grants {
            let Some(run) = self.running.get(&grant.build_id) else {
                continue;
            };
            if run.worker != grant.worker {
                continue;
            }
            let claims = run
                .step_locks
                .get(grant.step as usize)
                .cloned()
                .unwrap_or_default();
            let holder = LockHolder::Step(grant.build_id, grant.step);
            match self.locks.request(holder, &grant.worker, &claims) {
                Ok(true) => {
                    tracing::info!(
                        "build {} step {}: holds its locks again after the restart",
                        grant.build_id,
                        grant.step
                    );
                    // Re-arm the lease; the agent's repeated request is
                    // answered without extending it.
                    self.grant_lease_only(grant.build_id, grant.step);
                }
                Ok(false) => tracing::warn!(
                    "build {} step {}: its locks are held by others after the restart; it waits",
                    grant.build_id,
                    grant.step
                ),
                Err(e) => tracing::warn!("build {} step {}: {e}", grant.build_id, grant.step),
            }
        }
    }

    /// Arms the lease of `step`'s grant (the step's timeout plus
    /// [`LEASE_GRACE`]) without telling the agent: for a new grant (told
    /// after its commit) and a restored one (the agent asks again when it
    /// reconnects).
    fn grant_lease_only(&mut self, build_id: BuildId, step: u32) {
        let Some(run) = self.running.get_mut(&build_id) else {
            return;
        };
        run.leased_step = Some(step);
        let timeout = self
            .config
            .builder(&run.builder)
            .and_then(|b| b.steps.get(step as usize))
            .and_then(|s| s.timeout);
        if let Some(timeout) = timeout {
            self.timers.set(
                TimerSlot::StepLease(build_id),
                timeout + LEASE_GRACE,
                Event::LeaseEnded { build_id, step },
            );
        }
    }

    /// `worker`'s connection ended: the step waits its builds asked for on
    /// it are withdrawn (the agent asks again after it reconnects, if it
    /// still runs them). A grant is never given to a wait nobody listens to.
    pub(super) fn drop_step_waits(&mut self, worker: &str) {
        let ids: Vec<BuildId> = self
            .workers
            .get(worker)
            .map(|slot| slot.running.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            let Some(step) = self
                .running
                .get_mut(&id)
                .filter(|run| run.worker == worker)
                .and_then(|run| run.waiting_step.take())
            else {
                continue;
            };
            let granted = self.locks.release(LockHolder::Step(id, step));
            self.on_lock_grants(granted);
        }
    }

    /// `worker` went away or offline: builds waiting for locks on it give
    /// their place back and return to the queue. Returns whether any did.
    pub(super) fn unbind_lock_waits(&mut self, worker: &str) -> bool {
        let ids = self.lock_waits.of(worker);
        for id in &ids {
            self.lock_waits.remove(id);
            self.touch(worker);
            let granted = self.locks.release(LockHolder::Build(*id));
            self.on_lock_grants(granted);
        }
        !ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use nightshift_policy::PresenceState;
    use nightshift_proto::wire::{AgentMessage, BuildResult, MasterMessage};

    use super::super::test_harness::{Harness, MasterToml, presence, started};
    use super::super::{Event, Outbound};

    /// The claim of the lock `db` for sole use.
    const DB_EXCLUSIVE: &str = r#"{ name = "db", access = "exclusive" }"#;

    /// Soak, seed 20261130: an agent SIGKILLed while build X held a step
    /// lock and build Y waited for it comes back without them. At the
    /// reconcile deadline X's re-queue released the lock to Y's stale wait,
    /// and that grant reached the restarted agent after Y was handed to it
    /// again: Y ran its locked step beside the lock's real next holder.
    /// Now a connection's end withdraws its step waits, and grants travel
    /// in order with the other frames.
    #[tokio::test]
    async fn a_step_wait_of_a_lost_connection_is_never_granted_to_a_later_run() {
        let config = MasterToml::new()
            .lock("db", "master", 1)
            .worker_with_slots("a", 2)
            .worker("b")
            .builder_with("app", &["a"], &[], &[&[DB_EXCLUSIVE]])
            .builder_with("other", &["b"], &[], &[&[DB_EXCLUSIVE]])
            .parse();
        let mut h = Harness::with_config(config);
        let (ca, mut a) = h.connect_with_slots("a", PresenceState::Available, vec![], 2);
        let (cb, mut b) = h.connect("b", PresenceState::Available, vec![]);
        let x = h.submit_to("app").await;
        let y = h.submit_to("app").await;
        assert_eq!(started(&mut a), vec![x, y]);
        let agent = |h: &mut Harness, worker: &str, conn, message| {
            h.scheduler.handle(Event::Agent {
                worker: worker.into(),
                conn,
                message,
            })
        };
        for id in [x, y] {
            agent(
                &mut h,
                "a",
                ca,
                AgentMessage::StepWaiting {
                    build_id: id,
                    step: 0,
                },
            );
        }
        let z = h.submit_to("other").await;
        assert_eq!(started(&mut b), vec![z]);
        agent(
            &mut h,
            "b",
            cb,
            AgentMessage::StepWaiting {
                build_id: z,
                step: 0,
            },
        );
        // a is SIGKILLed and restarted: it runs neither X nor Y any more.
        h.scheduler.handle(Event::Disconnected {
            worker: "a".into(),
            conn: ca,
            reason: "killed".into(),
        });
        let (ca2, mut a2) = h.connect_with_slots("a", PresenceState::Available, vec![], 2);
        h.scheduler.handle(Event::ReconcileDeadline {
            worker: "a".into(),
            conn: ca2,
        });
        // X and Y are handed to the new agent again; nothing grants Y's old
        // wait, and the lock went to Z, which asked first of the live waits.
        let mut frames = Vec::new();
        while let Ok(out) = a2.try_recv() {
            if let Outbound::Message(message) = out {
                frames.push(message);
            }
        }
        assert!(
            !frames
                .iter()
                .any(|m| matches!(m, MasterMessage::StepGranted { .. })),
            "a stale grant reached the restarted agent: {frames:?}"
        );
        let restarted: Vec<_> = frames
            .iter()
            .filter_map(|m| match m {
                MasterMessage::StartBuild { build_id, .. } => Some(*build_id),
                _ => None,
            })
            .collect();
        assert_eq!(restarted, vec![x, y]);
        let mut granted_z = false;
        while let Ok(out) = b.try_recv() {
            granted_z |= matches!(out, Outbound::Message(MasterMessage::StepGranted { build_id, .. }) if build_id == z);
        }
        assert!(granted_z, "the lock's next live waiter gets it");
    }

    /// Issue 5: a build waiting for its builder-level lock keeps its chosen
    /// worker's slot; if that worker turns away the build gives the slot
    /// back (and its place for the lock), and a release starts it.
    #[tokio::test]
    async fn a_lock_wait_follows_its_worker_and_a_release_starts_the_build() {
        let config = MasterToml::new()
            .lock("db", "master", 1)
            .worker("a")
            .worker("b")
            .builder_with("app", &["a", "b"], &[DB_EXCLUSIVE], &[&[]])
            .parse();
        let mut h = Harness::with_config(config);
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
