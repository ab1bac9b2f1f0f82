//! The life of a build in the scheduler: queued on submit, handed out by
//! [`Scheduler::assign`], accepted or refused, finished (stored, then
//! acknowledged), cancelled, re-queued, and the watchers waiting for its end.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nightshift_proto::wire::{BuildId, BuildResult, BuildSource, MasterMessage, Outcome, StepSpec};
use tokio::sync::oneshot;

use super::timers::TimerSlot;
use super::{Event, Queued, Running, Scheduler, Waiting};
use crate::latent::Now;
use crate::metrics::{METRICS, RefusalReason, Refused, RetryReason};
use crate::store::StoreOutcome;

impl Scheduler {
    /// A committed new request joins the queue.
    pub(super) fn on_submitted(
        &mut self,
        id: BuildId,
        builder: String,
        properties: BTreeMap<String, String>,
        source: Option<BuildSource>,
    ) {
        tracing::debug!(target: nightshift_proto::log::HANDOFF, "build {id}: queued");
        self.collapse_into(id, &builder, source.as_ref());
        self.queue
            .insert(id, Queued::new(builder, properties, source));
        self.assign();
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
            if let Some(worker) = self.lock_waits.remove(&id) {
                self.touch(&worker);
            }
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

    pub(super) fn on_set_paused(&mut self, paused: bool) {
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

    /// Answers `reply` when build `id` is finished (at once if it is not
    /// pending).
    pub(super) fn on_watch(&mut self, id: BuildId, reply: oneshot::Sender<()>) {
        if self.is_pending(id) {
            let waiters = self.waiters.entry(id).or_default();
            // Long polls that timed out have gone away: forget them.
            waiters.retain(|waiter| !waiter.is_closed());
            waiters.push(reply);
        } else {
            let _ = reply.send(());
        }
    }

    fn is_pending(&self, id: BuildId) -> bool {
        self.queue.contains_key(&id)
            || self.running.contains_key(&id)
            || self.finishing.contains(&id)
    }

    pub(super) fn owns(&self, worker: &str, id: BuildId) -> bool {
        self.running
            .get(&id)
            .is_some_and(|run| run.worker == worker)
    }

    /// Refuses a frame about build `id` from a worker it is not handed to:
    /// logged with the reason and counted.
    pub(super) fn refuse(&self, worker: &str, id: BuildId, what: &str) {
        let why = if self.running.contains_key(&id) || self.queue.contains_key(&id) {
            RefusalReason::NotHandedToIt
        } else {
            RefusalReason::UnknownOrFinished
        };
        self.refuse_because(worker, id, what, Refused::Frame, why);
    }

    /// Refuses what `worker` tried (`what`, e.g. "delivered a result for")
    /// on build `id`, logging and counting `kind` and `why`.
    pub(super) fn refuse_because(
        &self,
        worker: &str,
        id: BuildId,
        what: &str,
        kind: Refused,
        why: RefusalReason,
    ) {
        let because = refusal_text(why);
        tracing::warn!(
            "worker {worker} {what} build {id}, which is not assigned to it ({because}); refused"
        );
        METRICS.refused(kind, why);
    }

    /// Refuses a result (a cancelled one too) that `worker` delivered for
    /// `id`, and tells the agent with the reason: the refusal is final, so
    /// the agent drops the result from its spool instead of sending it
    /// again after every reconnect.
    pub(super) fn refuse_result(
        &self,
        worker: &str,
        id: BuildId,
        what: &str,
        kind: Refused,
        why: RefusalReason,
    ) {
        self.refuse_because(worker, id, what, kind, why);
        self.send(
            worker,
            MasterMessage::ResultRefused {
                build_id: id,
                reason: format!("not assigned to this worker: {}", refusal_text(why)),
            },
        );
    }

    /// Whether `worker` may act on (adopt, finish) the queued build
    /// `queued`: it was handed to that worker, and its builder lists it.
    pub(super) fn may_act_on_queued(
        &self,
        worker: &str,
        queued: &Queued,
    ) -> Result<(), RefusalReason> {
        if !self.builder_lists(&queued.builder, worker) {
            return Err(RefusalReason::BuilderDoesNotListIt);
        }
        if queued.handed_to.as_deref() != Some(worker) {
            return Err(RefusalReason::NotHandedToIt);
        }
        Ok(())
    }

    /// The agent turned a handed-out build down: it goes back to the queue
    /// and, until the worker's presence changes, to other workers.
    pub(super) fn on_build_refused(&mut self, worker: &str, build_id: BuildId, reason: &str) {
        if !self.owns(worker, build_id) {
            return self.refuse(worker, build_id, "refused");
        }
        if self.running.get(&build_id).is_some_and(|run| run.accepted) {
            // It accepted the build, so it ran (an older agent hands a
            // build back this way when it stops at once): a retry, with why.
            let why = format!("worker {worker} handed it back after starting it: {reason}");
            self.requeue(worker, build_id, &why, RetryReason::CancelledOnWorker);
            self.maybe_release(worker);
            self.assign();
            return;
        }
        tracing::info!("build {build_id}: worker {worker} refused it ({reason}); re-queued");
        if let Some(run) = self.running.remove(&build_id) {
            if let Some(slot) = self.workers.get_mut(worker) {
                slot.running.remove(&build_id);
                slot.refused.insert(build_id);
            }
            self.touch(worker);
            let granted = self.locks.release_build(build_id);
            self.on_lock_grants(granted);
            let actions = self.latent.build_finished(worker, Now::system());
            self.run_latent(worker, actions);
            self.store.requeue(build_id, None);
            self.timers.cancel(&TimerSlot::StepLease(build_id));
            self.queue.insert(
                build_id,
                Queued {
                    refused: true,
                    ..Queued::handed_back(
                        run.builder,
                        run.properties,
                        run.source,
                        Some(worker.to_owned()),
                    )
                },
            );
        }
        self.maybe_release(worker);
        self.assign();
    }

    pub(super) fn on_build_finished(&mut self, worker: &str, result: BuildResult) {
        let id = result.build_id;
        if self.finishing.contains(&id) {
            return; // the first delivery is being stored; it will be acknowledged
        }
        // Only the worker it was handed to may end it (nor consume the
        // admin's cancel meant for that worker).
        let cancelled = result.outcome == Outcome::Cancelled;
        let kind = if cancelled {
            Refused::Cancel
        } else {
            Refused::Result
        };
        let what = if cancelled {
            "sent a cancelled result for"
        } else {
            "delivered a result for"
        };
        match self.running.get(&id) {
            Some(run) if run.worker != worker => {
                return self.refuse_result(worker, id, what, kind, RefusalReason::NotHandedToIt);
            }
            Some(_) => {}
            None => {
                if let Some(queued) = self.queue.get(&id)
                    && let Err(why) = self.may_act_on_queued(worker, queued)
                {
                    return self.refuse_result(worker, id, what, kind, why);
                }
            }
        }
        if cancelled && !self.cancel_requested.remove(&id) {
            // Cancelled on the worker's side (a stop deadline, a second
            // SIGTERM, the owner): the request is not done, it runs elsewhere.
            return self.on_worker_cancelled(worker, &result);
        }
        match self.running.get(&id) {
            Some(run) if run.worker != worker => {
                return self.refuse_result(
                    worker,
                    id,
                    "delivered a result for",
                    Refused::Result,
                    RefusalReason::NotHandedToIt,
                );
            }
            Some(run) => {
                // Hand-out to end: what the owner's window sees, and what
                // admission counts from (see `estimate.rs`).
                if result.outcome == Outcome::Success
                    && let Some(handed_out) = run.handed_out
                {
                    let took = result.finished_at.duration_since(handed_out);
                    self.estimates.record(&run.builder, took);
                }
                self.running.remove(&id);
                if let Some(slot) = self.workers.get_mut(worker) {
                    slot.running.remove(&id);
                    slot.unconfirmed.remove(&id);
                }
                self.touch(worker);
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
        let waited_on = self.lock_waits.remove(&id);
        if let Some(other) = &waited_on {
            self.touch(other);
        }
        self.timers.cancel(&TimerSlot::StepLease(id));
        let granted = self.locks.release_build(id);
        self.on_lock_grants(granted);
        self.finishing.insert(id);
        let store = self.store.clone();
        let events = self.events.clone();
        let owner = worker.to_owned();
        tokio::spawn(async move {
            let stored = store.finish(owner.clone(), result).await;
            let _ = events.send(Event::ResultCommitted {
                worker: owner,
                id,
                stored,
            });
        });
        // Only two workers can have become idle here (never a scan of all
        // of them on a per-build path): the one that ran the build, and
        // the one whose slot a lock wait of the build kept.
        self.maybe_release(worker);
        if let Some(other) = waited_on.filter(|other| other != worker) {
            self.maybe_release(&other);
        }
        self.assign();
    }

    /// A build the worker cancelled by itself goes back to the queue.
    fn on_worker_cancelled(&mut self, worker: &str, result: &BuildResult) {
        let id = result.build_id;
        let owned = self.owns(worker, id);
        if !owned && !self.queue.contains_key(&id) {
            return self.refuse_result(
                worker,
                id,
                "sent a cancelled result for",
                Refused::Cancel,
                RefusalReason::UnknownOrFinished,
            );
        }
        if owned {
            let reason = format!(
                "cancelled on worker {worker}: {}",
                result.reason.as_deref().unwrap_or("no reason given")
            );
            self.requeue(worker, id, &reason, RetryReason::CancelledOnWorker);
        }
        // Nothing to store: the agent may forget its result.
        self.send(worker, MasterMessage::ResultStored { build_id: id });
        self.maybe_release(worker);
        self.assign();
    }

    pub(super) fn on_result_committed(
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
                self.refuse_result(
                    worker,
                    id,
                    "delivered a result for",
                    Refused::Result,
                    RefusalReason::UnknownOrFinished,
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

    /// Moves a running build back to the queue as a retry. It remembers
    /// `worker`, which may still deliver its result or adopt it again.
    pub(super) fn requeue(&mut self, worker: &str, id: BuildId, reason: &str, kind: RetryReason) {
        if let Some(slot) = self.workers.get_mut(worker) {
            slot.running.remove(&id);
        }
        self.touch(worker);
        self.timers.cancel(&TimerSlot::StepLease(id));
        let granted = self.locks.release_build(id);
        self.on_lock_grants(granted);
        if let Some(run) = self.running.remove(&id) {
            tracing::warn!("build {id} re-queued: {reason}");
            METRICS.retried(kind);
            let actions = self.latent.build_finished(worker, Now::system());
            self.run_latent(worker, actions);
            self.store.requeue(id, Some(reason.to_owned()));
            self.queue.insert(
                id,
                Queued::handed_back(
                    run.builder,
                    run.properties,
                    run.source,
                    Some(worker.to_owned()),
                ),
            );
        }
    }

    pub(super) fn on_cancel(&mut self, id: BuildId, reason: String) -> Result<(), String> {
        if self.queue.remove(&id).is_some() {
            if let Some(worker) = self.lock_waits.remove(&id) {
                self.touch(&worker);
            }
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

    /// Hands out every queued build that a worker can take now, oldest first.
    pub(super) fn assign(&mut self) {
        if self.batching {
            self.assign_due = true;
            return;
        }
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
                self.note_waiting(id, Waiting::Because(why));
                continue;
            }
            let decision = if self.paused {
                Err(Waiting::Because("master is paused".to_owned()))
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

    /// Records what a queued build waits for (shown by `master builds`; the
    /// store keeps the kind of wait, the words are built when it is shown).
    pub(super) fn note_waiting(&mut self, id: BuildId, why: Waiting) {
        if let Some(queued) = self.queue.get_mut(&id)
            && queued.waiting_for.as_ref() != Some(&why)
        {
            let stored = match &why {
                Waiting::Because(text) => text.clone(),
                Waiting::NoWorker { latent: None } => "a worker that can take it".to_owned(),
                Waiting::NoWorker {
                    latent: Some(latent),
                } => format!("a worker that can take it; latent: {latent}"),
            };
            queued.waiting_for = Some(why);
            self.store.set_waiting_for(id, Some(stored));
        }
    }

    /// Hands queued build `id` to `worker` (its builder-level locks held).
    pub(super) fn start_build(&mut self, id: BuildId, worker: String) {
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
        // A builder with a source starts with the checkout (no locks: see
        // `lock_plan`), so step indexes agree with `step_locks`.
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
            upload: None,
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
                    upload: None,
                })
            }))
            .chain(def.and_then(|b| upload_step(b, &self.config.artifacts)))
            .collect();
        self.assignments += 1;
        if let Some(slot) = self.workers.get_mut(&worker) {
            slot.running.insert(id);
            slot.last_assigned = self.assignments;
        }
        self.touch(&worker);
        self.latent.build_started(&worker, Now::system());
        self.timers.cancel(&TimerSlot::CoolOff(id));
        if let Some(queued_at) = queued.queued_at {
            METRICS.waited_before_start(queued_at.elapsed());
        }
        tracing::info!("build {id} ({}) handed to {worker}", queued.builder);
        // Committed before the agent hears of it: a master killed in
        // between must not restore as queued a build an agent runs (it
        // would hand it out again, and the agent's hello would then be
        // told to cancel a build that already ran).
        let handed_out = self.clock.now();
        let committed = self.store.mark_started(id, worker.clone(), handed_out);
        let holds_locks = !self.builder_locks(&queued.builder).is_empty();
        self.send_after_commit(
            &worker,
            committed,
            MasterMessage::StartBuild {
                build_id: id,
                builder: queued.builder.clone(),
                steps,
                properties: queued.properties.clone(),
                source,
                holds_locks,
                max_log_bytes: Some(self.config.max_log_bytes),
            },
        );
        tracing::debug!(target: nightshift_proto::log::HANDOFF, "build {id}: handed out");
        self.running.insert(
            id,
            Running {
                worker,
                builder: queued.builder,
                properties: queued.properties,
                source: queued.source,
                accepted: false,
                step_locks,
                leased_step: None,
                waiting_step: None,
                handed_out: Some(handed_out),
            },
        );
    }
}

/// Why something a worker tried on a build was refused, in words.
fn refusal_text(why: RefusalReason) -> &'static str {
    match why {
        RefusalReason::NotHandedToIt => "it was not handed to it",
        RefusalReason::BuilderDoesNotListIt => "its builder does not list it",
        RefusalReason::UnknownOrFinished => "it is unknown or finished",
    }
}

/// The step a builder with `artifacts` ends with: the agent uploads the
/// matching files (it runs only when every step before it succeeded).
pub(crate) fn upload_step(
    builder: &crate::config::BuilderDef,
    settings: &crate::config::ArtifactSettings,
) -> Option<StepSpec> {
    (!builder.artifacts.is_empty()).then(|| StepSpec {
        name: ARTIFACT_STEP.into(),
        command: format!("upload artifacts {}", builder.artifacts.join(" ")),
        timeout_secs: None,
        env: BTreeMap::new(),
        workdir: None,
        needs_grant: false,
        checkout: false,
        upload: Some(nightshift_proto::wire::ArtifactUpload {
            patterns: builder.artifacts.clone(),
            max_file_bytes: settings.max_file_bytes,
            max_build_bytes: settings.max_build_bytes,
        }),
    })
}

/// Name of the artifact upload step.
pub(crate) const ARTIFACT_STEP: &str = "artifacts";

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use nightshift_policy::PresenceState;
    use nightshift_proto::wire::AgentMessage;

    use super::super::Outbound;
    use super::super::test_harness::{Harness, presence, released, started};
    use super::*;

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
                outlook: None,
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

    /// Soak, seed 20261130: a master SIGKILLed between a hand-out and its
    /// commit restored the build as queued, handed it to another worker,
    /// and told the first one, still running it, to cancel it: the build
    /// ran twice with no retry counted. The agent now hears of a hand-out
    /// only once it is committed, so a restart keeps the build on it.
    #[tokio::test]
    async fn a_hand_out_reaches_the_agent_only_once_committed_and_survives_a_restart() {
        let mut h = Harness::new();
        let (_, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        let mut barrier = None;
        let mut start = false;
        while let Ok(out) = a.try_recv() {
            match out {
                Outbound::AfterCommit(committed) => barrier = Some(committed),
                Outbound::Message(MasterMessage::StartBuild { build_id, .. }) => {
                    assert_eq!(build_id, id);
                    assert!(
                        barrier.is_some(),
                        "StartBuild came before its commit barrier"
                    );
                    start = true;
                }
                _ => {}
            }
        }
        assert!(start, "build {id} was not handed to a");
        // What the connection task does before it writes StartBuild.
        barrier.expect("a commit barrier").wait().await;
        assert_eq!(
            h.stored(id).await,
            (nightshift_proto::api::BuildState::Running, Some("a".into())),
            "the hand-out is committed before the agent can hear of it"
        );
        // The master dies and comes back: the build waits for a, it is
        // not handed to b, and a's hello keeps it.
        h.restart().await;
        let (_, mut b) = h.connect("b", PresenceState::Available, vec![]);
        assert!(started(&mut b).is_empty(), "handed out a second time");
        let (_, mut a2) = h.connect("a", PresenceState::Available, vec![id]);
        match a2.try_recv() {
            Ok(Outbound::Message(MasterMessage::Welcome { cancel, .. })) => {
                assert!(cancel.is_empty(), "a was told to cancel {cancel:?}")
            }
            other => panic!("expected the welcome, got {other:?}"),
        }
        assert_eq!(h.scheduler.snapshot().running[&id], "a");
    }

    /// A worker that hands back a build it accepted (an older agent
    /// stopping at once) gets it re-queued as a retry with the reason: it
    /// ran there.
    #[tokio::test]
    async fn a_build_handed_back_after_it_was_accepted_counts_as_a_retry() {
        let mut h = Harness::new();
        let (ca, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        for message in [
            AgentMessage::BuildAccepted { build_id: id },
            AgentMessage::BuildRefused {
                build_id: id,
                reason: "the worker is stopping".into(),
            },
        ] {
            h.scheduler.handle(Event::Agent {
                worker: "a".into(),
                conn: ca,
                message,
            });
        }
        assert_eq!(started(&mut a), vec![id], "re-queued and handed out again");
        // The store's queue is FIFO: a read queued after the write sees it.
        let build = h.store.get_build(id).await.unwrap().unwrap();
        assert_eq!(build.retries, 1);
        let reason = build.retry_reason.unwrap_or_default();
        assert!(
            reason.contains("worker a handed it back after starting it"),
            "{reason}"
        );
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

    /// The estimate measures what the owner's window sees and admission
    /// counts: hand-out (the scheduler's clock) to the end, not the first
    /// step's start — in memory and when re-seeded from the store.
    #[tokio::test]
    async fn the_estimate_spans_the_hand_out_to_the_end_in_memory_and_in_the_store() {
        let mut h = Harness::new();
        let (ca, mut a) = h.connect("a", PresenceState::Available, vec![]);
        // The harness's clock reads the epoch: every hand-out happens then.
        let at = |secs: i64| Timestamp::from_second(secs).unwrap();
        for _ in 0..3 {
            let id = h.submit().await;
            assert_eq!(started(&mut a), vec![id]);
            // The first step starts 30 s after the hand-out (a slow
            // checkout of the agent's, a lock) and the build ends at 90 s.
            h.scheduler.handle(Event::Agent {
                worker: "a".into(),
                conn: ca,
                message: AgentMessage::BuildFinished {
                    result: BuildResult {
                        build_id: id,
                        outcome: Outcome::Success,
                        steps: vec![nightshift_proto::wire::StepResult {
                            step: 0,
                            outcome: Outcome::Success,
                            exit_code: Some(0),
                            signal: None,
                            started_at: at(30),
                            finished_at: at(90),
                        }],
                        reason: None,
                        log: String::new(),
                        finished_at: at(90),
                    },
                },
            });
        }
        let span = jiff::SignedDuration::from_secs(90);
        let expected = super::super::estimate::bound(&std::iter::repeat_n(span, 3).collect());
        assert_eq!(h.scheduler.estimates.get("app"), expected);
        assert!(expected.is_some_and(|e| e > span), "{expected:?}");
        // What a restarted master seeds from: the same span.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let stored = loop {
            let stored = h.store().recent_durations(20).await.unwrap();
            if stored.len() == 3 || std::time::Instant::now() > deadline {
                break stored;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(stored, vec![("app".to_owned(), span); 3]);
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
                outlook: None,
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
                outlook: None,
            },
        });
        assert_eq!(started(&mut b), vec![id]);
    }
}
