//! Evaluating a policy at an instant: the schedule's verdict, the presence, when it ends and when it next changes.

use super::*;

impl Policy {
    pub(super) fn schedule_source(&self, name: &str) -> Source {
        match self.owner {
            PolicyOwner::Worker => Source::Schedule(name.to_owned()),
            PolicyOwner::Master => Source::Master,
        }
    }

    pub(super) fn default_source(&self) -> Source {
        match self.owner {
            PolicyOwner::Worker => Source::Default,
            PolicyOwner::Master => Source::Master,
        }
    }

    pub(super) fn zoned(&self, at: Timestamp) -> Zoned {
        at.to_zoned(self.tz.clone())
    }

    fn schedule_verdict(&self, now: &Zoned) -> ScheduleVerdict {
        let memberships: Vec<_> = self
            .windows
            .iter()
            .map(|w| (w, w.membership(now)))
            .collect();
        let deciding = memberships.iter().filter(|(_, m)| m.inside).fold(
            None::<&(&Window, crate::window::Membership)>,
            |best, item| match best {
                Some(best) if best.0.state >= item.0.state => Some(best),
                _ => Some(item),
            },
        );
        let prefix = match self.owner {
            PolicyOwner::Worker => "",
            PolicyOwner::Master => "master-side ",
        };
        match deciding {
            Some((window, membership)) => ScheduleVerdict {
                state: window.state,
                source: self.schedule_source(&window.name),
                reason: format!(
                    "inside {prefix}schedule {} ({} {})",
                    window.name,
                    window.short_when(),
                    self.zone_name
                ),
                since: membership.since,
            },
            None => {
                let reason = match memberships.as_slice() {
                    [] => format!("{prefix}default state (no schedule)"),
                    [(window, _)] => format!(
                        "outside {prefix}schedule {} ({} {})",
                        window.name,
                        window.short_when(),
                        self.zone_name
                    ),
                    _ => format!("outside every {prefix}schedule"),
                };
                ScheduleVerdict {
                    state: self.default,
                    source: self.default_source(),
                    reason,
                    since: memberships.iter().filter_map(|(_, m)| m.since).max(),
                }
            }
        }
    }

    /// The presence at `now`: stopping beats everything, an unexpired manual
    /// override beats the automatic sources, and among the automatic sources
    /// (master, load, schedules/default) the most restrictive wins (on a tie:
    /// master, then load, then the schedule). `until` is the instant the
    /// *state* next changes (an override that ends into the same state, or a
    /// window that hands over to another with the same state, is not one);
    /// the agent re-evaluates earlier, at [`Policy::next_change`];
    /// `since` is when the deciding condition began where known, else `now`
    /// (use [`PresenceTracker`] to keep `since` across evaluations).
    pub fn evaluate(&self, now: Timestamp, inputs: &Inputs) -> Presence {
        let mut presence = self.presence_at(now, inputs, false);
        presence.until = self.state_ends(now, inputs, presence.state);
        presence
    }

    /// The presence at `now` with `until` left unset: [`Policy::evaluate`]
    /// without its look-ahead through coming changes, for callers that only
    /// compare states and reasons (and re-evaluate at every change anyway).
    pub fn evaluate_without_until(&self, now: Timestamp, inputs: &Inputs) -> Presence {
        self.presence_at(now, inputs, false)
    }

    /// When the presence *state* next differs from `state` (not merely its
    /// reason or source): walks the coming changes, taking a pending load
    /// verdict as flipped once its deadline passes. `None` when no change is
    /// known within [`MAX_UNTIL_STEPS`] changes.
    fn state_ends(
        &self,
        now: Timestamp,
        inputs: &Inputs,
        state: PresenceState,
    ) -> Option<Timestamp> {
        // A source that holds without end at or above anything the schedules
        // can give keeps the state for good: nothing to walk.
        let schedules_at_most = self
            .windows
            .iter()
            .map(|w| w.state)
            .fold(self.default, PresenceState::max);
        let holds_for_good = |at: Timestamp| {
            let master = inputs
                .master
                .as_ref()
                .filter(|m| m.until.is_none() && m.is_active(at))
                .map(|m| m.state);
            let load = inputs
                .load
                .as_ref()
                .filter(|l| l.high && l.pending_change.is_none())
                .map(|l| l.state);
            master
                .into_iter()
                .chain(load)
                .max()
                .is_some_and(|floor| floor == state && floor >= schedules_at_most)
        };
        let mut at = now;
        for _ in 0..MAX_UNTIL_STEPS {
            let manual_decides = inputs.manual.as_ref().is_some_and(|m| m.is_active(at));
            if !manual_decides && holds_for_good(at) {
                return None;
            }
            let next = self.next_change(at, inputs)?;
            if self.presence_at(next, inputs, true).state != state {
                return Some(next);
            }
            at = next;
        }
        None
    }

    /// The presence at `now` without `until`. With `predict_load`, a load
    /// verdict whose `pending_change` is at or before `now` counts as flipped.
    pub(super) fn presence_at(
        &self,
        now: Timestamp,
        inputs: &Inputs,
        predict_load: bool,
    ) -> Presence {
        let until = None;
        if inputs.stopping {
            return Presence {
                state: PresenceState::Away,
                reason: "finishing the current builds, then exiting".to_owned(),
                source: Source::Stopping,
                since: now,
                until: None,
            };
        }
        if let Some(manual) = inputs.manual.as_ref().filter(|m| m.is_active(now)) {
            let reason = match &manual.reason {
                Some(reason) if !reason.trim().is_empty() => format!("set by hand: {reason}"),
                _ => "set by hand".to_owned(),
            };
            return Presence {
                state: manual.state,
                reason,
                source: Source::Manual,
                since: manual.set_at.min(now),
                until,
            };
        }
        let schedule = self.schedule_verdict(&self.zoned(now));
        let mut best = Presence {
            state: schedule.state,
            reason: schedule.reason,
            source: schedule.source,
            since: schedule.since.unwrap_or(now).min(now),
            until,
        };
        let load_high = |load: &LoadVerdict| {
            let flipped = predict_load && load.pending_change.is_some_and(|t| t <= now);
            load.high != flipped
        };
        if let Some(load) = inputs.load.as_ref().filter(|l| load_high(l))
            && load.state >= best.state
        {
            best.state = load.state;
            best.reason = load.reason.clone();
            best.source = Source::Load;
            best.since = load.since.min(now);
        }
        if let Some(master) = inputs.master.as_ref().filter(|m| m.is_active(now))
            && master.state >= best.state
        {
            best.state = master.state;
            best.reason = master.reason.clone();
            best.source = Source::Master;
            best.since = now;
        }
        best
    }

    /// When a re-evaluation is due: the earliest instant after `now` at which
    /// the presence can change (a window boundary, a manual or master override
    /// ending, a load hysteresis deadline). `None`: nothing known will change it.
    pub fn next_change(&self, now: Timestamp, inputs: &Inputs) -> Option<Timestamp> {
        if inputs.stopping {
            return None;
        }
        let after = |t: Option<Timestamp>| t.filter(|t| *t > now);
        if let Some(manual) = inputs.manual.as_ref().filter(|m| m.is_active(now)) {
            return after(manual.until);
        }
        let mut next = self.next_schedule_change(&self.zoned(now));
        let mut consider = |t: Option<Timestamp>| {
            if let Some(t) = after(t) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(master) = inputs.master.as_ref().filter(|m| m.is_active(now)) {
            consider(master.until);
        }
        if let Some(load) = &inputs.load {
            consider(load.pending_change);
        }
        next
    }

    fn next_schedule_change(&self, now: &Zoned) -> Option<Timestamp> {
        self.windows
            .iter()
            .filter_map(|w| w.next_boundary(now, w.membership(now).inside))
            .min()
    }
}
