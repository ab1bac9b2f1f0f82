//! Worker connections: hello (adopting builds it still runs, cancelling ones
//! moved elsewhere), presence pushes, disconnects, the missing-worker timeout,
//! the reconcile deadline after a reconnect, and releasing idle workers.

use std::collections::BTreeSet;

use nightshift_policy::Presence;
use nightshift_proto::wire::{BuildId, MasterMessage, Outlook, PROTOCOL_VERSION};

use super::timers::TimerSlot;
use super::{ConnId, Event, Hello, Outbound, RECONCILE_GRACE, Running, Scheduler, offline};
use crate::latent::Now;
use crate::locks::LockHolder;
use crate::metrics::{Refused, RetryReason};
use crate::outbox::AgentOutbox;

impl Scheduler {
    pub(super) fn on_connected(
        &mut self,
        worker: String,
        conn: ConnId,
        hello: Hello,
        heartbeat_secs: u64,
        out: AgentOutbox,
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
        // Step waits asked for on an earlier connection are stale: the
        // agent asks again for the steps it still runs.
        self.drop_step_waits(&worker);
        let listed: BTreeSet<BuildId> = hello.running.iter().copied().collect();
        let mut cancel = Vec::new();
        let mut adopted = Vec::new();
        for &id in &listed {
            match self.running.get(&id) {
                Some(run) if run.worker == worker => {}
                Some(_) => cancel.push(id),
                None => match self.queue.get(&id) {
                    // Only the worker it was handed to, still listed by its
                    // builder, may carry on with a re-queued build.
                    Some(queued) => match self.may_act_on_queued(&worker, queued) {
                        Ok(()) => adopted.push(id),
                        Err(why) => {
                            self.refuse_because(
                                &worker,
                                id,
                                "listed in its hello",
                                Refused::Adoption,
                                why,
                            );
                            cancel.push(id);
                        }
                    },
                    None => cancel.push(id),
                },
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
                if let Some(other) = self.lock_waits.remove(&id) {
                    self.touch(&other);
                }
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
                        leased_step: None,
                        waiting_step: None,
                        handed_out: None,
                    },
                );
                // The agent runs it already: nothing waits for the commit.
                let _ = self.store.mark_started(id, worker.clone(), now);
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
        slot.outlook = hello.outlook.clone();
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
        self.touch(&worker);
        // Back in time: its missing timer is moot.
        self.timers.cancel(&TimerSlot::Missing(worker.clone()));
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
                heartbeat_secs,
                cancel,
                missing_timeout_secs: Some(self.config.missing_timeout.as_secs()),
            },
        );
        if let Some(verdict) = self.schedule_verdict(&worker) {
            self.send(
                &worker,
                MasterMessage::MasterOverride {
                    presence: Some(verdict.clone()),
                },
            );
        }
        let reconcile = TimerSlot::Reconcile(worker.clone());
        if unconfirmed {
            self.timers.set(
                reconcile,
                RECONCILE_GRACE,
                Event::ReconcileDeadline {
                    worker: worker.clone(),
                    conn,
                },
            );
        } else {
            // A deadline of an earlier connection has nothing left to check.
            self.timers.cancel(&reconcile);
        }
        self.store.save_presence(worker.clone(), hello.presence);
        self.maybe_release(&worker);
        self.assign();
    }

    /// The agent pushed a new presence.
    pub(super) fn on_presence(
        &mut self,
        worker: &str,
        presence: Presence,
        outlook: Option<Outlook>,
    ) {
        // Debug, not info: a farm-wide flip at 19:00 is 10,000 of these
        // (the dashboard, `master workers` and the metrics show the states).
        tracing::debug!(
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
            slot.outlook = outlook;
        }
        self.touch(worker);
        let takes_builds = presence.state.takes_builds();
        let why = format!("{}: {}", presence.source, presence.reason);
        self.store.save_presence(worker.to_owned(), presence);
        if !takes_builds {
            self.unbind_lock_waits(worker);
        }
        let actions = self
            .latent
            .presence_changed(worker, takes_builds, &why, Now::system());
        self.run_latent(worker, actions);
        self.maybe_release(worker);
        self.assign();
    }

    pub(super) fn on_disconnected(&mut self, worker: &str, conn: ConnId, reason: &str) {
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
        self.touch(worker);
        // Its connection's reconcile deadline has nothing left to check.
        self.timers.cancel(&TimerSlot::Reconcile(worker.to_owned()));
        // Nobody listens for its step grants until it is back (and asks
        // again): a grant now could reach a later run of the same build.
        self.drop_step_waits(worker);
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

    /// Arms (or re-arms) the worker's one missing timer: `missing_timeout`
    /// from now, for its current epoch.
    pub(super) fn start_missing_timer(&mut self, worker: &str) {
        let Some(slot) = self.workers.get(worker) else {
            return;
        };
        let event = Event::MissingTimeout {
            worker: worker.to_owned(),
            epoch: slot.epoch,
        };
        self.timers.set(
            TimerSlot::Missing(worker.to_owned()),
            self.config.missing_timeout,
            event,
        );
    }

    pub(super) fn on_missing(&mut self, worker: &str, epoch: u64) {
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
            self.requeue(worker, id, &reason, RetryReason::WorkerMissing);
        }
        if !self.is_known(worker) {
            self.drop_if_drained(worker);
        }
        self.assign();
    }

    pub(super) fn on_reconcile_deadline(&mut self, worker: &str, conn: ConnId) {
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
            self.requeue(worker, id, &reason, RetryReason::ReconnectedWithoutIt);
        }
        self.maybe_release(worker);
        self.assign();
    }

    /// Sends `Released` to an idle worker that takes no builds.
    pub(super) fn maybe_release(&mut self, worker: &str) {
        if !self.is_known(worker) {
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
            tracing::debug!("worker {worker} released: {reason}");
            self.send(worker, MasterMessage::Released { reason });
        }
    }

    /// A worker removed by reconfig leaves once it runs nothing: it is
    /// released (a connected agent is told why) and forgotten.
    pub(super) fn drop_if_drained(&mut self, worker: &str) {
        let Some(slot) = self.workers.get(worker) else {
            return;
        };
        if !slot.running.is_empty() || self.lock_waits.count(worker) > 0 {
            return;
        }
        if let Some((_, out)) = &slot.conn {
            let _ = out.send(Outbound::Message(MasterMessage::Released {
                reason: "removed from master.toml".into(),
            }));
            let _ = out.send(Outbound::Close("worker removed from master.toml".into()));
        }
        self.workers.remove(worker);
        self.touch(worker);
        self.timers.cancel(&TimerSlot::Missing(worker.to_owned()));
        self.timers.cancel(&TimerSlot::Reconcile(worker.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nightshift_policy::PresenceState;

    use super::super::test_harness::{Harness, started};
    use super::*;

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

    /// A connection that flaps keeps one missing timer for its worker (no
    /// pile of sleeping tasks), and the timer of the last disconnect is the
    /// one that re-queues the build.
    #[tokio::test(start_paused = true)]
    async fn a_flapping_worker_keeps_one_missing_timer_and_the_last_one_counts() {
        let mut h = Harness::new(); // missing_timeout = 60 s
        let (mut conn, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        for _ in 0..1000 {
            h.scheduler.handle(Event::Disconnected {
                worker: "a".into(),
                conn,
                reason: "flap".into(),
            });
            assert_eq!(h.scheduler.timers.len(), 1, "one missing timer");
            tokio::time::advance(Duration::from_secs(1)).await;
            (conn, _) = h.connect("a", PresenceState::Available, vec![id]);
            assert_eq!(h.scheduler.timers.len(), 0, "cancelled on reconnect");
        }
        h.scheduler.handle(Event::Disconnected {
            worker: "a".into(),
            conn,
            reason: "gone".into(),
        });
        let start = tokio::time::Instant::now();
        let event = h.scheduler.timers.next_expired().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        h.scheduler.handle(event);
        assert!(
            h.scheduler.queue.contains_key(&id),
            "re-queued once missing"
        );
        assert!(h.scheduler.timers.next_expired().await.is_none());
    }

    /// A reconnect whose hello does not list a running build gives the agent
    /// the grace to deliver its result; then the build is re-queued.
    #[tokio::test(start_paused = true)]
    async fn an_unlisted_build_is_requeued_at_the_reconcile_deadline() {
        let mut h = Harness::new();
        let (conn, mut a) = h.connect("a", PresenceState::Available, vec![]);
        let id = h.submit().await;
        assert_eq!(started(&mut a), vec![id]);
        h.scheduler.handle(Event::Disconnected {
            worker: "a".into(),
            conn,
            reason: "blip".into(),
        });
        let (_, mut a2) = h.connect("a", PresenceState::Available, vec![]);
        assert_eq!(h.scheduler.timers.len(), 1, "only the reconcile deadline");
        assert!(started(&mut a2).is_empty(), "still counted as running on a");
        let start = tokio::time::Instant::now();
        let event = h.scheduler.timers.next_expired().await.unwrap();
        assert_eq!(start.elapsed(), RECONCILE_GRACE);
        h.scheduler.handle(event);
        assert_eq!(started(&mut a2), vec![id], "re-queued and handed out again");
    }
}
