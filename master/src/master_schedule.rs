//! Master-side schedules: a `schedule` in a `[[worker]]` of `master.toml`
//! (same forms as `worker.toml`) compiled by the policy engine as a `master`
//! source, evaluated by the master and combined with the presence the worker
//! pushes: the most restrictive wins.
//!
//! The scheduler keeps one timer for [`MasterSchedules::next_change`] and
//! calls [`MasterSchedules::refresh`] when it fires (a schedule boundary
//! fires at the boundary, no polling); every changed verdict is sent to the
//! agent as `MasterMessage::MasterOverride` so it shows it too. It also
//! keeps, per worker, what its schedule says about the time ahead
//! ([`ScheduleLimits`]), which window-aware admission joins with the
//! agent's own outlook: the agent cannot foresee the master's schedule.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{
    AvailabilityConfig, Inputs, Policy, Presence, PresenceState, ScheduleConfig,
};

/// One worker's master-side schedule as written.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    pub worker: String,
    /// Key path for errors, e.g. `worker[2].schedule`.
    pub path: String,
    pub timezone: Option<String>,
    pub windows: Vec<ScheduleConfig>,
}

/// How far ahead the limits look (a week and a day, like the agent's
/// outlook).
const LIMITS_HORIZON: SignedDuration = SignedDuration::from_hours(24 * 8);
/// Most changes followed when looking ahead (a guard).
const LIMITS_MAX_STEPS: usize = 1000;

/// What a worker's master-side schedule says about the time ahead, as of
/// its last boundary: when it next stops the worker taking builds, and when
/// it first makes an unrestricted worker `reluctant` before that (`None`:
/// not within the horizon, or no schedule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleLimits {
    pub takes_builds_until: Option<Timestamp>,
    pub reluctant_from: Option<Timestamp>,
    /// The schedule's next boundary: the limits are recomputed then.
    due: Option<Timestamp>,
}

/// Every worker's master-side schedule, compiled, with the last verdicts.
#[derive(Debug, Default)]
pub struct MasterSchedules {
    policies: BTreeMap<String, Policy>,
    verdicts: BTreeMap<String, Option<Presence>>,
    limits: BTreeMap<String, ScheduleLimits>,
}

impl MasterSchedules {
    /// Compiles every schedule; reports every problem of every worker at
    /// once (`worker[2].schedule.schedule[0].hours: …`).
    pub fn compile(
        specs: impl IntoIterator<Item = ScheduleSpec>,
        system_tz: TimeZone,
    ) -> Result<MasterSchedules, Vec<String>> {
        let mut policies = BTreeMap::new();
        let mut errors = Vec::new();
        for spec in specs {
            if spec.windows.is_empty() {
                continue;
            }
            let config = AvailabilityConfig {
                timezone: spec.timezone.clone(),
                default: None,
                schedule: spec.windows.clone(),
                load: None,
                overrun: None,
            };
            match Policy::compile_for_master(&config, system_tz.clone(), &spec.path) {
                Ok(policy) => {
                    policies.insert(spec.worker, policy);
                }
                Err(problems) => errors.extend(problems.into_iter().map(|p| p.to_string())),
            }
        }
        if errors.is_empty() {
            Ok(MasterSchedules {
                policies,
                verdicts: BTreeMap::new(),
                limits: BTreeMap::new(),
            })
        } else {
            Err(errors)
        }
    }

    /// The master's verdict for `worker` at `now`: `None` when it has no
    /// schedule or the schedule does not restrict it (`available`).
    pub fn evaluate(&self, worker: &str, now: Timestamp) -> Option<Presence> {
        let policy = self.policies.get(worker)?;
        let presence = policy.evaluate(now, &Inputs::default());
        (presence.state > PresenceState::Available).then_some(presence)
    }

    /// The last verdict [`Self::refresh`] recorded.
    pub fn verdict(&self, worker: &str) -> Option<&Presence> {
        self.verdicts.get(worker).and_then(Option::as_ref)
    }

    /// What `worker`'s schedule says about the time ahead, as of the last
    /// [`Self::refresh`] (nothing when it has none).
    pub fn limits(&self, worker: &str) -> ScheduleLimits {
        self.limits.get(worker).copied().unwrap_or_default()
    }

    /// Re-evaluates every schedule at `now`; returns the workers whose
    /// verdict changed (state or source), with the new verdict. The limits
    /// of a worker whose schedule passed a boundary are looked ahead again.
    pub fn refresh(&mut self, now: Timestamp) -> Vec<(String, Option<Presence>)> {
        let mut changed = Vec::new();
        for (worker, policy) in &self.policies {
            let due = self
                .limits
                .get(worker)
                .is_none_or(|l| l.due.is_some_and(|due| due <= now));
            if due {
                self.limits.insert(worker.clone(), limits_of(policy, now));
            }
        }
        for worker in self.policies.keys() {
            let fresh = self.evaluate(worker, now);
            let before = self.verdicts.get(worker).cloned().flatten();
            let same = match (&before, &fresh) {
                (None, None) => true,
                (Some(a), Some(b)) => a.state == b.state && a.reason == b.reason,
                _ => false,
            };
            if !same || !self.verdicts.contains_key(worker) {
                changed.push((worker.clone(), fresh));
            }
        }
        for (worker, verdict) in &changed {
            self.verdicts.insert(worker.clone(), verdict.clone());
        }
        changed
    }

    /// The earliest instant after `now` at which any verdict can change.
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        self.policies
            .values()
            .filter_map(|policy| policy.next_change(now, &Inputs::default()))
            .min()
    }

    /// Replaces the schedules (reconfig), keeping verdicts of unchanged
    /// workers so only real changes are reported by the next refresh.
    pub fn replace(&mut self, next: MasterSchedules) {
        let verdicts = std::mem::take(&mut self.verdicts);
        self.policies = next.policies;
        self.verdicts = verdicts
            .into_iter()
            .filter(|(worker, _)| self.policies.contains_key(worker))
            .collect();
        // Schedules may have changed: the next refresh looks ahead again.
        self.limits.clear();
    }

    /// Workers that had a verdict and no longer have a schedule after a
    /// [`Self::replace`]: their override must be cleared.
    pub fn dropped_since(&self, before: &[String]) -> Vec<String> {
        before
            .iter()
            .filter(|worker| !self.policies.contains_key(*worker))
            .cloned()
            .collect()
    }
}

/// The limits of `policy` looked ahead from `now`.
fn limits_of(policy: &Policy, now: Timestamp) -> ScheduleLimits {
    let inputs = Inputs::default();
    let due = policy.next_change(now, &inputs);
    let mut limits = ScheduleLimits {
        due,
        ..ScheduleLimits::default()
    };
    let state_now = policy.evaluate(now, &inputs).state;
    if !state_now.takes_builds() {
        return limits;
    }
    let Ok(end) = now.checked_add(LIMITS_HORIZON) else {
        return limits;
    };
    let mut at = now;
    for _ in 0..LIMITS_MAX_STEPS {
        let Some(next) = policy.next_change(at, &inputs).filter(|next| *next <= end) else {
            break;
        };
        let state = policy.evaluate(next, &inputs).state;
        if !state.takes_builds() {
            limits.takes_builds_until = Some(next);
            break;
        }
        if state == PresenceState::Reluctant
            && state_now == PresenceState::Available
            && limits.reluctant_from.is_none()
        {
            limits.reluctant_from = Some(next);
        }
        at = next;
    }
    limits
}

/// The presence the master acts on: the worker's own, unless the master's
/// verdict is more restrictive (on a tie the worker's own reason stays).
pub fn combine(pushed: &Presence, master: Option<&Presence>) -> Presence {
    match master {
        Some(master) if master.state > pushed.state => master.clone(),
        _ => pushed.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_policy::Source;

    fn nights(worker: &str) -> ScheduleSpec {
        ScheduleSpec {
            worker: worker.into(),
            path: "worker[0].schedule".into(),
            timezone: Some("Europe/Berlin".into()),
            windows: vec![ScheduleConfig {
                name: "nights".into(),
                hours: Some("19:00-07:00".into()),
                days: None,
                open: None,
                close: None,
                state: PresenceState::Available,
            }],
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn pushed(state: PresenceState) -> Presence {
        Presence {
            state,
            reason: "worker's own".into(),
            source: Source::Default,
            since: at("2026-11-23T00:00:00Z"),
            until: None,
        }
    }

    #[test]
    fn a_master_schedule_restricts_outside_its_window_with_source_master() {
        let mut schedules = MasterSchedules::compile([nights("w1")], TimeZone::UTC).unwrap();
        // 12:00 in Berlin (11:00 UTC): outside the night window.
        let noon = at("2026-11-23T11:00:00Z");
        let verdict = schedules.evaluate("w1", noon).expect("restricted by day");
        assert_eq!(verdict.state, PresenceState::Away);
        assert_eq!(verdict.source, Source::Master);
        assert_eq!(schedules.evaluate("other", noon), None);
        // The boundary is exactly 19:00 Berlin = 18:00 UTC.
        assert_eq!(
            schedules.next_change(noon),
            Some(at("2026-11-23T18:00:00Z"))
        );
        let changed = schedules.refresh(noon);
        assert_eq!(changed.len(), 1);
        assert!(
            schedules.refresh(noon).is_empty(),
            "no change, nothing reported"
        );
        let evening = at("2026-11-23T18:00:00Z");
        assert_eq!(schedules.refresh(evening), vec![("w1".to_owned(), None)]);
        assert_eq!(schedules.verdict("w1"), None);
    }

    #[test]
    fn the_limits_say_when_the_master_schedule_stops_or_restricts_a_worker() {
        let mut spec = nights("w1");
        spec.windows.push(ScheduleConfig {
            name: "mornings".into(),
            hours: Some("07:00-09:00".into()),
            days: None,
            open: None,
            close: None,
            state: PresenceState::Reluctant,
        });
        let mut schedules = MasterSchedules::compile([spec, nights("w2")], TimeZone::UTC).unwrap();
        assert_eq!(schedules.limits("w1"), ScheduleLimits::default());
        // 06:50 Berlin: w1 turns reluctant at 07:00 and away at 09:00; w2
        // goes away at 07:00; w3 has no schedule.
        let early = at("2026-11-24T05:50:00Z");
        schedules.refresh(early);
        let w1 = schedules.limits("w1");
        assert_eq!(w1.takes_builds_until, Some(at("2026-11-24T08:00:00Z")));
        assert_eq!(w1.reluctant_from, Some(at("2026-11-24T06:00:00Z")));
        let w2 = schedules.limits("w2");
        assert_eq!(w2.takes_builds_until, Some(at("2026-11-24T06:00:00Z")));
        assert_eq!(w2.reluctant_from, None);
        assert_eq!(schedules.limits("w3"), ScheduleLimits::default());
        // Before w1's next boundary nothing is looked ahead again ...
        schedules.refresh(at("2026-11-24T05:55:00Z"));
        assert_eq!(schedules.limits("w1"), w1);
        // ... after it, from then: reluctant now (no reluctant_from), away at 09:00.
        schedules.refresh(at("2026-11-24T06:30:00Z"));
        let w1 = schedules.limits("w1");
        assert_eq!(w1.takes_builds_until, Some(at("2026-11-24T08:00:00Z")));
        assert_eq!(w1.reluctant_from, None);
        // Away by day: nothing to limit (the verdict keeps it from builds);
        // midnight: the night runs on to 07:00.
        schedules.refresh(at("2026-11-24T11:00:00Z"));
        assert_eq!(schedules.limits("w2").takes_builds_until, None);
        schedules.refresh(at("2026-11-24T23:00:00Z"));
        assert_eq!(
            schedules.limits("w2").takes_builds_until,
            Some(at("2026-11-25T06:00:00Z"))
        );
    }

    #[test]
    fn most_restrictive_wins_between_worker_and_master() {
        let schedules = MasterSchedules::compile([nights("w1")], TimeZone::UTC).unwrap();
        let noon = at("2026-11-23T11:00:00Z");
        let master = schedules.evaluate("w1", noon);
        let combined = combine(&pushed(PresenceState::Available), master.as_ref());
        assert_eq!(combined.state, PresenceState::Away);
        assert_eq!(combined.source, Source::Master);
        // At night the master does not restrict: the worker's own presence.
        let night = at("2026-11-23T22:00:00Z");
        let master = schedules.evaluate("w1", night);
        assert_eq!(master, None);
        let combined = combine(&pushed(PresenceState::Reluctant), master.as_ref());
        assert_eq!(combined.state, PresenceState::Reluctant);
        assert_eq!(combined.reason, "worker's own");
        // An offline worker stays offline whatever the master says.
        let offline = combine(
            &pushed(PresenceState::Offline),
            schedules.evaluate("w1", noon).as_ref(),
        );
        assert_eq!(offline.state, PresenceState::Offline);
    }

    #[test]
    fn bad_schedules_are_reported_with_their_key_path() {
        let mut bad = nights("w1");
        bad.timezone = Some("Mars/Olympus".into());
        bad.windows[0].hours = Some("25:00-07:00".into());
        let errors = MasterSchedules::compile([bad], TimeZone::UTC).unwrap_err();
        assert!(errors.len() >= 2, "{errors:?}");
        assert!(
            errors.iter().all(|e| e.starts_with("worker[0].schedule.")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("Mars/Olympus")),
            "{errors:?}"
        );
    }

    #[test]
    fn replace_keeps_verdicts_of_kept_workers_and_names_dropped_ones() {
        let mut schedules =
            MasterSchedules::compile([nights("w1"), nights("w2")], TimeZone::UTC).unwrap();
        let noon = at("2026-11-23T11:00:00Z");
        assert_eq!(schedules.refresh(noon).len(), 2);
        let before: Vec<String> = vec!["w1".into(), "w2".into()];
        schedules.replace(MasterSchedules::compile([nights("w1")], TimeZone::UTC).unwrap());
        assert_eq!(schedules.dropped_since(&before), vec!["w2"]);
        assert!(schedules.refresh(noon).is_empty(), "w1 unchanged");
    }
}
