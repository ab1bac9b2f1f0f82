//! Property test: `next_change` agrees with a brute-force minute-by-minute evaluation
//! over random schedules (hours and cron forms, several zones incl. DST) and instants.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{
    AvailabilityConfig, Inputs, ManualOverride, MasterOverride, Policy, PresenceState,
    ScheduleConfig,
};
use proptest::prelude::*;

const ZONES: [&str; 4] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const STATES: [PresenceState; 3] = [
    PresenceState::Available,
    PresenceState::Reluctant,
    PresenceState::Away,
];
/// Instants near DST changes in the zones above, and an ordinary week.
const BASES: [&str; 6] = [
    "2026-03-07T12:00:00Z",
    "2026-03-28T12:00:00Z",
    "2026-10-24T12:00:00Z",
    "2026-10-31T12:00:00Z",
    "2026-04-04T06:00:00Z",
    "2026-11-23T00:00:00Z",
];

fn day_list(mask: u8) -> String {
    (0..7)
        .filter(|d| mask & (1 << d) != 0)
        .map(|d| DAYS[d])
        .collect::<Vec<_>>()
        .join(",")
}

fn window() -> impl Strategy<Value = ScheduleConfig> {
    let hours = (0u32..96, 1u32..96, 1u8..128, 0usize..3, any::<bool>()).prop_map(
        |(start, length, mask, state, all_days)| {
            let open = start * 15;
            let close = (open + length * 15) % 1440;
            ScheduleConfig {
                name: String::new(),
                hours: Some(format!(
                    "{:02}:{:02}-{:02}:{:02}",
                    open / 60,
                    open % 60,
                    close / 60,
                    close % 60
                )),
                days: (!all_days).then(|| day_list(mask)),
                open: None,
                close: None,
                state: STATES[state],
            }
        },
    );
    let cron = (
        (0u32..4, 0u32..24, 1u8..128),
        (0u32..4, 0u32..24, 1u8..128),
        0usize..3,
    )
        .prop_map(|((om, oh, odays), (cm, ch, cdays), state)| ScheduleConfig {
            name: String::new(),
            hours: None,
            days: None,
            open: Some(format!("{} {oh} * * {}", om * 15, day_list(odays))),
            close: Some(format!("{} {ch} * * {}", cm * 15, day_list(cdays))),
            state: STATES[state],
        });
    prop_oneof![3 => hours, 1 => cron]
}

fn config() -> impl Strategy<Value = AvailabilityConfig> {
    (
        0usize..ZONES.len(),
        proptest::option::of(0usize..3),
        proptest::collection::vec(window(), 1..4),
    )
        .prop_map(|(zone, default, mut schedule)| {
            for (index, window) in schedule.iter_mut().enumerate() {
                window.name = format!("w{index}");
            }
            AvailabilityConfig {
                timezone: Some(ZONES[zone].to_owned()),
                default: default.map(|d| STATES[d]),
                schedule,
                load: None,
            }
        })
}

fn instant() -> impl Strategy<Value = Timestamp> {
    (0usize..BASES.len(), 0i64..(72 * 3600)).prop_map(|(base, offset)| {
        BASES[base].parse::<Timestamp>().expect("base instant") + SignedDuration::from_secs(offset)
    })
}

/// An override: index into `STATES` and minutes until it ends (`None`: never).
type OneOverride = Option<(usize, Option<i64>)>;
/// The manual and the master override.
type OverrideSpec = (OneOverride, OneOverride);

/// Optional manual and master overrides ending some minutes after `now`
/// (or never), built once `now` is known.
fn overrides() -> impl Strategy<Value = OverrideSpec> {
    let one =
        || proptest::option::weighted(0.3, (0usize..3, proptest::option::of(1i64..(40 * 60))));
    (one(), one())
}

fn inputs_at(now: Timestamp, spec: &OverrideSpec) -> Inputs {
    let end = |minutes: Option<i64>| minutes.map(|m| now + SignedDuration::from_mins(m));
    Inputs {
        manual: spec.0.map(|(state, minutes)| ManualOverride {
            state: STATES[state],
            reason: None,
            set_at: now,
            until: end(minutes),
        }),
        master: spec.1.map(|(state, minutes)| MasterOverride {
            state: STATES[state],
            reason: "admin".to_owned(),
            until: end(minutes),
        }),
        stopping: false,
        load: None,
    }
}

/// What must not change between re-evaluations.
fn key_with(policy: &Policy, at: Timestamp, inputs: &Inputs) -> (PresenceState, String, String) {
    // `until` is not compared here, and `evaluate`'s look-ahead for it
    // would make this minute-by-minute walk quadratic.
    let p = policy.evaluate_without_until(at, inputs);
    (p.state, p.source.to_string(), p.reason)
}

fn key(policy: &Policy, at: Timestamp) -> (PresenceState, String, String) {
    key_with(policy, at, &Inputs::default())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn next_change_matches_minute_by_minute_evaluation(
        config in config(),
        now in instant(),
        overrides in overrides(),
    ) {
        let policy = Policy::compile(&config, TimeZone::UTC)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let inputs = inputs_at(now, &overrides);
        let next = policy.next_change(now, &inputs);
        if let Some(next) = next {
            prop_assert!(next > now, "next_change {next} is not after {now}");
        }
        let horizon = now + SignedDuration::from_hours(30);
        let limit = next.map_or(horizon, |n| n.min(horizon));
        let before = key_with(&policy, now, &inputs);
        // Every minute boundary from now up to (not including) the next change.
        let mut at = Timestamp::from_second(now.as_second() - now.as_second().rem_euclid(60) + 60)
            .expect("in range");
        while at < limit {
            prop_assert_eq!(
                &key_with(&policy, at, &inputs), &before,
                "presence changed at {} before next_change {:?} (from {})", at, next, now
            );
            at += SignedDuration::from_mins(1);
        }
        // And the change it announces happens (within the horizon): the
        // presence changes, or a window opens or closes under a more
        // restrictive one (each window alone tells whether it is open).
        if let Some(next) = next.filter(|n| *n <= horizon) {
            let after = key_with(&policy, next, &inputs);
            // An override ending under a more restrictive source changes nothing visible.
            let override_ends = inputs.master.as_ref().is_some_and(|m| m.until == Some(next))
                || inputs.manual.as_ref().is_some_and(|m| m.until == Some(next));
            let some_window_flips = config.schedule.iter().any(|window| {
                let alone = AvailabilityConfig {
                    default: Some(PresenceState::Away),
                    schedule: vec![window.clone()],
                    ..config.clone()
                };
                let alone = Policy::compile(&alone, TimeZone::UTC).expect("a valid window alone");
                key(&alone, now).1 != key(&alone, next).1
            });
            prop_assert!(
                after != before || some_window_flips || override_ends,
                "nothing changed at next_change {} (from {}): {:?}", next, now, after
            );
        }
    }
}
