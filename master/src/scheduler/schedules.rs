//! Master-side schedules (`schedule` in `[[worker]]`) in the scheduler:
//! compiling them, the effective presence they give a worker, and the one
//! timer for the next boundary.

use std::time::Duration;

use nightshift_policy::{Presence, PresenceState};
use nightshift_proto::wire::MasterMessage;

use super::timers::TimerSlot;
use super::{Event, Scheduler};
use crate::latent::Now;
use crate::master_schedule::{MasterSchedules, ScheduleSpec, combine};

/// The longest the schedule timer sleeps, so a clock jump or a suspend is
/// caught up.
const MAX_SCHEDULE_SLEEP: Duration = Duration::from_secs(3600);

impl Scheduler {
    /// The master-side schedules of the current config (validated with it).
    pub(super) fn compile_schedules(&self) -> MasterSchedules {
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
    pub(super) fn effective_presence(&self, worker: &str, pushed: &Presence) -> Presence {
        combine(pushed, self.schedules.verdict(worker))
    }

    /// Re-evaluates the master-side schedules now: tells each agent whose
    /// verdict changed (`MasterOverride`), lets a latent worker the schedule
    /// sends away stop after its builds, and re-arms the one timer for the
    /// next boundary (capped, so a clock jump or suspend is caught up).
    pub(super) fn refresh_schedules(&mut self) {
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
            self.touch(&worker);
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
}
