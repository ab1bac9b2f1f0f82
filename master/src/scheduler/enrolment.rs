//! Enrolled workers (`[[worker_group]]` members) in the scheduler: which
//! names it knows besides master.toml's `[[worker]]`s, their group's
//! settings, an enrolment arriving, and a revocation (its connection
//! closed, its builds re-queued elsewhere, its slot forgotten).

use std::collections::BTreeSet;

use nightshift_proto::wire::{BuildId, MasterMessage};

use super::{Outbound, Scheduler, WorkerSlot, offline};
use crate::metrics::RetryReason;
use crate::worker_groups::Member;

impl Scheduler {
    /// Whether `worker` is one the config gives builds to: a `[[worker]]`,
    /// or a member of a `[[worker_group]]` that is still configured.
    pub(super) fn is_known(&self, worker: &str) -> bool {
        self.config.worker(worker).is_some()
            || self
                .members
                .get(worker)
                .is_some_and(|group| self.config.worker_group(group).is_some())
    }

    /// master.toml's `max_builds` for `worker` (its own, or its group's).
    pub(super) fn configured_max_builds(&self, worker: &str) -> Option<u32> {
        if let Some(def) = self.config.worker(worker) {
            return Some(def.max_builds);
        }
        let group = self.members.get(worker)?;
        self.config.worker_group(group).map(|g| g.max_builds)
    }

    /// Whether builds of `builder` may go to `worker` (listed by name or
    /// through its group).
    pub(super) fn builder_lists(&self, builder: &str, worker: &str) -> bool {
        let group = self.members.get(worker);
        self.config.builder(builder).is_some_and(|b| {
            b.workers
                .iter()
                .any(|w| w == worker || group.is_some_and(|g| g == w))
        })
    }

    /// The members of `group`, by name.
    pub(super) fn members_of(&self, group: &str) -> impl Iterator<Item = &String> {
        self.group_members.get(group).into_iter().flatten()
    }

    /// Remembers `member` (at start, or enrolled now) and gives it a slot
    /// when its group is configured.
    pub(super) fn add_member(&mut self, member: Member) {
        self.members
            .insert(member.name.clone(), member.group.clone());
        self.group_members
            .entry(member.group.clone())
            .or_default()
            .insert(member.name.clone());
        if self.config.worker_group(&member.group).is_some() {
            self.ensure_member_slot(&member.name, "enrolled; not connected yet");
        }
        self.eligible.list_member(&member.name, &member.group);
        self.touch(&member.name);
    }

    /// A slot for a member that has none (a new one, or one whose group a
    /// reconfig brought back).
    pub(super) fn ensure_member_slot(&mut self, worker: &str, why: &str) {
        let max_builds = self.configured_max_builds(worker).unwrap_or(1);
        let now = self.clock.now();
        self.workers
            .entry(worker.to_owned())
            .or_insert_with(|| WorkerSlot::new(offline(now, why), max_builds));
    }

    /// A worker enrolled (already committed and in the server's roster).
    pub(super) fn on_enrolled(&mut self, member: Member) {
        tracing::info!("worker {} enrolled in group {}", member.name, member.group);
        self.add_member(member);
        self.assign();
    }

    /// The admin revoked enrolled worker `name` (already committed and out
    /// of the server's roster): it is closed and forgotten, and its running
    /// builds run elsewhere. `false`: no such member.
    pub(super) fn on_revoked(&mut self, name: &str) -> bool {
        let Some(group) = self.members.remove(name) else {
            return false;
        };
        if let Some(members) = self.group_members.get_mut(&group) {
            members.remove(name);
        }
        tracing::info!("worker {name} (group {group}) revoked");
        let running: Vec<BuildId> = self
            .workers
            .get(name)
            .map(|slot| slot.running.iter().copied().collect::<BTreeSet<_>>())
            .unwrap_or_default()
            .into_iter()
            .collect();
        for id in running {
            self.requeue(
                name,
                id,
                &format!("worker {name} was revoked"),
                RetryReason::WorkerRemoved,
            );
            // Its result would not be accepted any more.
            if let Some(queued) = self.queue.get_mut(&id) {
                queued.handed_to = None;
            }
            self.store.forget_handed_to(id);
        }
        self.unbind_lock_waits(name);
        if let Some(slot) = self.workers.remove(name)
            && let Some((_, out)) = &slot.conn
        {
            let _ = out.send(Outbound::Message(MasterMessage::Refused {
                reason: "this worker was revoked by the master's admin".into(),
            }));
            let _ = out.send(Outbound::Close("worker revoked".into()));
        }
        self.timers
            .cancel(&super::timers::TimerSlot::Missing(name.to_owned()));
        self.touch(name);
        self.eligible.unlist(name);
        self.assign();
        true
    }
}
