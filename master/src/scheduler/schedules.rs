//! Master-side schedules (`schedule` in `[[worker]]` and in
//! `[[worker_group]]`) in the scheduler: compiling them, the effective
//! presence they give a worker, and the one timer for the next boundary.

use std::time::Duration;

use nightshift_policy::{Presence, PresenceState};
use nightshift_proto::wire::MasterMessage;

use super::timers::TimerSlot;
use super::{Event, Scheduler};
use crate::latent::Now;
use crate::master_schedule::{MasterSchedules, ScheduleOwner, ScheduleSpec, combine};

/// The longest the schedule timer sleeps, so a clock jump or a suspend is
/// caught up.
const MAX_SCHEDULE_SLEEP: Duration = Duration::from_secs(3600);

impl Scheduler {
    /// The master-side schedules of the current config (validated with it).
    pub(super) fn compile_schedules(&self) -> MasterSchedules {
        let workers = self
            .config
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| ScheduleSpec {
                owner: ScheduleOwner::Worker(w.name.clone()),
                path: format!("worker[{i}]"),
                timezone: w.timezone.clone(),
                windows: w.schedule.clone(),
            });
        let groups = self
            .config
            .worker_groups
            .iter()
            .enumerate()
            .map(|(i, g)| ScheduleSpec {
                owner: ScheduleOwner::Group(g.name.clone()),
                path: format!("worker_group[{i}]"),
                timezone: g.timezone.clone(),
                windows: g.schedule.clone(),
            });
        match MasterSchedules::compile(workers.chain(groups), jiff::tz::TimeZone::system()) {
            Ok(schedules) => schedules,
            Err(errors) => {
                // The config check compiles the same schedules; not reached.
                tracing::error!("master-side schedules ignored: {}", errors.join("; "));
                MasterSchedules::default()
            }
        }
    }

    /// The presence the scheduler acts on: the worker's own, unless its
    /// master-side schedule (its own, or its group's) is more restrictive.
    pub(super) fn effective_presence(&self, worker: &str, pushed: &Presence) -> Presence {
        combine(pushed, self.schedule_verdict(worker))
    }

    /// The last verdict of `worker`'s master-side schedule: its own, or
    /// that of the group it enrolled in. O(1) in the number of workers.
    pub(super) fn schedule_verdict(&self, worker: &str) -> Option<&Presence> {
        let group = self.members.get(worker).map(String::as_str);
        self.schedules.verdict(worker, group)
    }

    /// The workers an owner's schedule holds for: the worker, or every
    /// member of the group that has a slot.
    fn scheduled_workers(&self, owner: &ScheduleOwner) -> Vec<String> {
        match owner {
            ScheduleOwner::Worker(name) => vec![name.clone()],
            ScheduleOwner::Group(group) => self
                .members_of(group)
                .filter(|name| self.workers.contains_key(*name))
                .cloned()
                .collect(),
        }
    }

    /// Tells the workers of schedules that are gone (a reconfig removed
    /// them) that the master no longer restricts them.
    pub(super) fn clear_dropped_schedules(&mut self, dropped: &[ScheduleOwner]) {
        for owner in dropped {
            for worker in self.scheduled_workers(owner) {
                self.send(&worker, MasterMessage::MasterOverride { presence: None });
            }
        }
    }

    /// Re-evaluates the master-side schedules now: tells each agent whose
    /// verdict changed (`MasterOverride`; a group's verdict is computed once
    /// and goes to each of its members), lets a latent worker the schedule
    /// sends away stop after its builds, and re-arms the one timer for the
    /// next boundary (capped, so a clock jump or suspend is caught up).
    pub(super) fn refresh_schedules(&mut self) {
        let now = self.clock.now();
        for (owner, verdict) in self.schedules.refresh(now) {
            let said = match &verdict {
                Some(p) => format!("says {} ({})", p.state, p.reason),
                None => "does not restrict it".to_owned(),
            };
            let workers = self.scheduled_workers(&owner);
            match &owner {
                ScheduleOwner::Worker(worker) => {
                    tracing::info!("worker {worker}: master schedule {said}");
                }
                ScheduleOwner::Group(group) => tracing::info!(
                    "worker group {group} ({} members): master schedule {said}",
                    workers.len()
                ),
            }
            for worker in workers {
                self.apply_schedule_verdict(&worker, verdict.as_ref());
            }
        }
        let Some(next) = self.schedules.next_change(now) else {
            self.timers.cancel(&TimerSlot::ScheduleTick);
            return;
        };
        let wait = next
            .duration_since(now)
            .unsigned_abs()
            .min(MAX_SCHEDULE_SLEEP);
        self.timers
            .set(TimerSlot::ScheduleTick, wait, Event::ScheduleTick);
    }

    /// One worker's schedule verdict changed: its agent is told, its place
    /// among the eligible is updated, and a worker that no longer takes
    /// builds gives up its lock waits (a latent one stops after its builds).
    fn apply_schedule_verdict(&mut self, worker: &str, verdict: Option<&Presence>) {
        self.send(
            worker,
            MasterMessage::MasterOverride {
                presence: verdict.cloned(),
            },
        );
        self.touch(worker);
        let takes = self
            .workers
            .get(worker)
            .map(|slot| self.effective_presence(worker, &slot.presence))
            .is_some_and(|p| p.state.takes_builds() || p.state == PresenceState::Offline);
        let why = verdict.map(|p| p.reason.as_str()).unwrap_or_default();
        if !takes {
            self.unbind_lock_waits(worker);
        }
        let actions = self
            .latent
            .presence_changed(worker, takes, why, Now::system());
        self.run_latent(worker, actions);
    }
}
