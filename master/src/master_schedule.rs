//! Master-side schedules: a `schedule` in a `[[worker]]` or a
//! `[[worker_group]]` of `master.toml` (same forms as `worker.toml`)
//! compiled by the policy engine as a `master` source, evaluated by the
//! master and combined with the presence the worker pushes: the most
//! restrictive wins. A group's schedule is compiled and evaluated once for
//! all its members.
//!
//! The scheduler keeps one timer for [`MasterSchedules::next_change`] and
//! calls [`MasterSchedules::refresh`] when it fires (a schedule boundary
//! fires at the boundary, no polling); every changed verdict is sent to the
//! agent as `MasterMessage::MasterOverride` so it shows it too. It also
//! keeps, per schedule, what it says about the time ahead
//! ([`ScheduleLimits`]), which window-aware admission joins with the
//! agent's own outlook: the agent cannot foresee the master's schedule.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{
    AvailabilityConfig, Inputs, Policy, Presence, PresenceState, ScheduleConfig,
};

/// Whose master-side schedule: one `[[worker]]`'s, or a `[[worker_group]]`'s,
/// which holds for every member of the group (one compiled schedule and one
/// verdict per group, however many members it has).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScheduleOwner {
    Worker(String),
    Group(String),
}

/// One master-side schedule as written.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    pub owner: ScheduleOwner,
    /// Key path for errors, e.g. `worker[2]` or `worker_group[0]`.
    pub path: String,
    pub timezone: Option<String>,
    pub windows: Vec<ScheduleConfig>,
}

/// How far ahead the limits look (a week and a day, like the agent's
/// outlook).
const LIMITS_HORIZON: SignedDuration = SignedDuration::from_hours(24 * 8);
/// Most changes followed when looking ahead (a guard).
const LIMITS_MAX_STEPS: usize = 1000;

/// What a master-side schedule says about the time ahead, as of its last
/// boundary: when it next stops the worker taking builds, and when it first
/// makes an unrestricted worker `reluctant` before that (`None`: not within
/// the horizon, or no schedule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleLimits {
    pub takes_builds_until: Option<Timestamp>,
    pub reluctant_from: Option<Timestamp>,
    /// The schedule's next boundary: the limits are recomputed then.
    due: Option<Timestamp>,
}

/// The compiled schedules of one kind of owner (workers, or groups), by
/// name, with their last verdicts and limits.
#[derive(Debug, Default)]
struct Table {
    policies: BTreeMap<String, Policy>,
    verdicts: BTreeMap<String, Option<Presence>>,
    limits: BTreeMap<String, ScheduleLimits>,
}

impl Table {
    fn evaluate(&self, name: &str, now: Timestamp) -> Option<Presence> {
        let policy = self.policies.get(name)?;
        let presence = policy.evaluate(now, &Inputs::default());
        (presence.state > PresenceState::Available).then_some(presence)
    }

    fn verdict(&self, name: &str) -> Option<&Presence> {
        self.verdicts.get(name).and_then(Option::as_ref)
    }

    /// Re-evaluates every schedule at `now`; the names whose verdict changed.
    fn refresh(&mut self, now: Timestamp) -> Vec<(String, Option<Presence>)> {
        let mut changed = Vec::new();
        for (name, policy) in &self.policies {
            let due = self
                .limits
                .get(name)
                .is_none_or(|l| l.due.is_some_and(|due| due <= now));
            if due {
                self.limits.insert(name.clone(), limits_of(policy, now));
            }
        }
        for name in self.policies.keys() {
            let fresh = self.evaluate(name, now);
            let before = self.verdicts.get(name).cloned().flatten();
            let same = match (&before, &fresh) {
                (None, None) => true,
                (Some(a), Some(b)) => a.state == b.state && a.reason == b.reason,
                _ => false,
            };
            if !same || !self.verdicts.contains_key(name) {
                changed.push((name.clone(), fresh));
            }
        }
        for (name, verdict) in &changed {
            self.verdicts.insert(name.clone(), verdict.clone());
        }
        changed
    }

    fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        self.policies
            .values()
            .filter_map(|policy| policy.next_change(now, &Inputs::default()))
            .min()
    }

    fn replace(&mut self, next: Table) {
        let verdicts = std::mem::take(&mut self.verdicts);
        self.policies = next.policies;
        self.verdicts = verdicts
            .into_iter()
            .filter(|(name, _)| self.policies.contains_key(name))
            .collect();
        // Schedules may have changed: the next refresh looks ahead again.
        self.limits.clear();
    }
}

/// Every master-side schedule, compiled, with the last verdicts: the
/// `[[worker]]`s' and the `[[worker_group]]`s'.
#[derive(Debug, Default)]
pub struct MasterSchedules {
    workers: Table,
    groups: Table,
}

impl MasterSchedules {
    /// Compiles every schedule; reports every problem of every owner at
    /// once (`worker[2].schedule[0].hours: …`).
    pub fn compile(
        specs: impl IntoIterator<Item = ScheduleSpec>,
        system_tz: TimeZone,
    ) -> Result<MasterSchedules, Vec<String>> {
        let mut schedules = MasterSchedules::default();
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
                    let (table, name) = schedules.table_mut(spec.owner);
                    table.policies.insert(name, policy);
                }
                Err(problems) => errors.extend(problems.into_iter().map(|p| p.to_string())),
            }
        }
        if errors.is_empty() {
            Ok(schedules)
        } else {
            Err(errors)
        }
    }

    fn table_mut(&mut self, owner: ScheduleOwner) -> (&mut Table, String) {
        match owner {
            ScheduleOwner::Worker(name) => (&mut self.workers, name),
            ScheduleOwner::Group(name) => (&mut self.groups, name),
        }
    }

    fn table<'a>(&'a self, owner: &'a ScheduleOwner) -> (&'a Table, &'a str) {
        match owner {
            ScheduleOwner::Worker(name) => (&self.workers, name),
            ScheduleOwner::Group(name) => (&self.groups, name),
        }
    }

    /// The verdict of `owner`'s schedule at `now`: `None` when it has no
    /// schedule or the schedule does not restrict (`available`).
    #[cfg(test)]
    pub fn evaluate(&self, owner: &ScheduleOwner, now: Timestamp) -> Option<Presence> {
        let (table, name) = self.table(owner);
        table.evaluate(name, now)
    }

    /// The last verdict [`Self::refresh`] recorded for `worker`: its own
    /// schedule's, else that of `group`, the group it was enrolled in. Two
    /// map lookups, however many workers or members there are.
    pub fn verdict(&self, worker: &str, group: Option<&str>) -> Option<&Presence> {
        if self.workers.policies.contains_key(worker) {
            return self.workers.verdict(worker);
        }
        self.groups.verdict(group?)
    }

    /// What `worker`'s schedule (its own, else its group's) says about the
    /// time ahead, as of the last [`Self::refresh`] (nothing when it has
    /// none).
    pub fn limits(&self, worker: &str, group: Option<&str>) -> ScheduleLimits {
        let limits = match self.workers.policies.contains_key(worker) {
            true => self.workers.limits.get(worker),
            false => group.and_then(|group| self.groups.limits.get(group)),
        };
        limits.copied().unwrap_or_default()
    }

    /// Re-evaluates every schedule at `now`; returns the owners whose
    /// verdict changed (state or source), with the new verdict: a group once,
    /// however many members it has. The limits of a schedule that passed a
    /// boundary are looked ahead again.
    pub fn refresh(&mut self, now: Timestamp) -> Vec<(ScheduleOwner, Option<Presence>)> {
        let workers = self.workers.refresh(now).into_iter();
        let groups = self.groups.refresh(now).into_iter();
        workers
            .map(|(name, verdict)| (ScheduleOwner::Worker(name), verdict))
            .chain(groups.map(|(name, verdict)| (ScheduleOwner::Group(name), verdict)))
            .collect()
    }

    /// The earliest instant after `now` at which any verdict can change.
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        [self.workers.next_change(now), self.groups.next_change(now)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Replaces the schedules (reconfig), keeping verdicts of unchanged
    /// owners so only real changes are reported by the next refresh.
    pub fn replace(&mut self, next: MasterSchedules) {
        self.workers.replace(next.workers);
        self.groups.replace(next.groups);
    }

    /// The owners whose last verdict restricts their workers.
    pub fn restricting(&self) -> Vec<ScheduleOwner> {
        let workers = self.workers.verdicts.iter().filter(|(_, v)| v.is_some());
        let groups = self.groups.verdicts.iter().filter(|(_, v)| v.is_some());
        workers
            .map(|(name, _)| ScheduleOwner::Worker(name.clone()))
            .chain(groups.map(|(name, _)| ScheduleOwner::Group(name.clone())))
            .collect()
    }

    /// Owners that had a verdict and no longer have a schedule after a
    /// [`Self::replace`]: their workers' override must be cleared.
    pub fn dropped_since(&self, before: &[ScheduleOwner]) -> Vec<ScheduleOwner> {
        before
            .iter()
            .filter(|owner| {
                let (table, name) = self.table(owner);
                !table.policies.contains_key(name)
            })
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

    fn worker(name: &str) -> ScheduleOwner {
        ScheduleOwner::Worker(name.into())
    }

    fn nights(name: &str) -> ScheduleSpec {
        ScheduleSpec {
            owner: worker(name),
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
        let verdict = schedules
            .evaluate(&worker("w1"), noon)
            .expect("restricted by day");
        assert_eq!(verdict.state, PresenceState::Away);
        assert_eq!(verdict.source, Source::Master);
        assert_eq!(schedules.evaluate(&worker("other"), noon), None);
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
        assert_eq!(schedules.refresh(evening), vec![(worker("w1"), None)]);
        assert_eq!(schedules.verdict("w1", None), None);
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
        assert_eq!(schedules.limits("w1", None), ScheduleLimits::default());
        // 06:50 Berlin: w1 turns reluctant at 07:00 and away at 09:00; w2
        // goes away at 07:00; w3 has no schedule.
        let early = at("2026-11-24T05:50:00Z");
        schedules.refresh(early);
        let w1 = schedules.limits("w1", None);
        assert_eq!(w1.takes_builds_until, Some(at("2026-11-24T08:00:00Z")));
        assert_eq!(w1.reluctant_from, Some(at("2026-11-24T06:00:00Z")));
        let w2 = schedules.limits("w2", None);
        assert_eq!(w2.takes_builds_until, Some(at("2026-11-24T06:00:00Z")));
        assert_eq!(w2.reluctant_from, None);
        assert_eq!(schedules.limits("w3", None), ScheduleLimits::default());
        // Before w1's next boundary nothing is looked ahead again ...
        schedules.refresh(at("2026-11-24T05:55:00Z"));
        assert_eq!(schedules.limits("w1", None), w1);
        // ... after it, from then: reluctant now (no reluctant_from), away at 09:00.
        schedules.refresh(at("2026-11-24T06:30:00Z"));
        let w1 = schedules.limits("w1", None);
        assert_eq!(w1.takes_builds_until, Some(at("2026-11-24T08:00:00Z")));
        assert_eq!(w1.reluctant_from, None);
        // Away by day: nothing to limit (the verdict keeps it from builds);
        // midnight: the night runs on to 07:00.
        schedules.refresh(at("2026-11-24T11:00:00Z"));
        assert_eq!(schedules.limits("w2", None).takes_builds_until, None);
        schedules.refresh(at("2026-11-24T23:00:00Z"));
        assert_eq!(
            schedules.limits("w2", None).takes_builds_until,
            Some(at("2026-11-25T06:00:00Z"))
        );
    }

    #[test]
    fn most_restrictive_wins_between_worker_and_master() {
        let schedules = MasterSchedules::compile([nights("w1")], TimeZone::UTC).unwrap();
        let noon = at("2026-11-23T11:00:00Z");
        let master = schedules.evaluate(&worker("w1"), noon);
        let combined = combine(&pushed(PresenceState::Available), master.as_ref());
        assert_eq!(combined.state, PresenceState::Away);
        assert_eq!(combined.source, Source::Master);
        // At night the master does not restrict: the worker's own presence.
        let night = at("2026-11-23T22:00:00Z");
        let master = schedules.evaluate(&worker("w1"), night);
        assert_eq!(master, None);
        let combined = combine(&pushed(PresenceState::Reluctant), master.as_ref());
        assert_eq!(combined.state, PresenceState::Reluctant);
        assert_eq!(combined.reason, "worker's own");
        // An offline worker stays offline whatever the master says.
        let offline = combine(
            &pushed(PresenceState::Offline),
            schedules.evaluate(&worker("w1"), noon).as_ref(),
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
        let before = schedules.restricting();
        assert_eq!(before, vec![worker("w1"), worker("w2")]);
        schedules.replace(MasterSchedules::compile([nights("w1")], TimeZone::UTC).unwrap());
        assert_eq!(schedules.dropped_since(&before), vec![worker("w2")]);
        assert!(schedules.refresh(noon).is_empty(), "w1 unchanged");
    }

    #[test]
    fn a_group_schedule_holds_for_every_member_and_flips_once_for_all() {
        let mut lab = nights("unused");
        lab.owner = ScheduleOwner::Group("lab".into());
        lab.path = "worker_group[0]".into();
        let mut schedules = MasterSchedules::compile([lab, nights("w1")], TimeZone::UTC).unwrap();
        // Midnight UTC (01:00 in Berlin): inside the night window.
        let midnight = at("2026-11-24T00:00:00Z");
        let changed = schedules.refresh(midnight);
        assert_eq!(
            changed,
            vec![
                (worker("w1"), None),
                (ScheduleOwner::Group("lab".into()), None)
            ]
        );
        assert_eq!(schedules.verdict("lab-1", Some("lab")), None);
        // 07:00 Berlin: the group's one verdict turns away, reported once.
        let seven = at("2026-11-24T06:00:00Z");
        assert_eq!(schedules.next_change(midnight), Some(seven));
        let changed = schedules.refresh(seven);
        assert_eq!(changed.len(), 2, "{changed:?}");
        let (owner, verdict) = &changed[1];
        assert_eq!(owner, &ScheduleOwner::Group("lab".into()));
        let verdict = verdict.as_ref().expect("away by day");
        assert_eq!(verdict.state, PresenceState::Away);
        assert_eq!(verdict.source, Source::Master);
        // Every member reads it; a worker of no group, or of another group,
        // does not; a worker's own schedule is its own.
        for member in ["lab-1", "lab-9999"] {
            let seen = schedules.verdict(member, Some("lab")).expect("member");
            assert_eq!(seen.state, PresenceState::Away);
        }
        assert_eq!(schedules.verdict("pool-1", Some("pool")), None);
        assert_eq!(schedules.verdict("lonely", None), None);
        assert!(schedules.verdict("w1", None).is_some());
        // Limits come from the group's schedule too: at 06:00 Berlin on the
        // night the clocks go forward (28 March 2027), the window still
        // closes at 07:00 CEST = 05:00 UTC.
        let before_dawn = at("2027-03-28T04:00:00Z");
        schedules.refresh(before_dawn);
        assert_eq!(
            schedules.limits("lab-3", Some("lab")).takes_builds_until,
            Some(at("2027-03-28T05:00:00Z"))
        );
        assert_eq!(schedules.limits("lab-3", None), ScheduleLimits::default());
        // By day both restrict; the group's schedule removed, the group is
        // named as dropped (its members' overrides are cleared).
        schedules.refresh(at("2027-03-28T12:00:00Z"));
        let before = schedules.restricting();
        assert_eq!(
            before,
            vec![worker("w1"), ScheduleOwner::Group("lab".into())]
        );
        schedules.replace(MasterSchedules::compile([nights("w1")], TimeZone::UTC).unwrap());
        assert_eq!(
            schedules.dropped_since(&before),
            vec![ScheduleOwner::Group("lab".into())]
        );
        assert_eq!(schedules.verdict("lab-1", Some("lab")), None);
    }
}
