//! What the policies say about the time ahead, for window-aware admission:
//! when the worker stops taking builds, its next window, and the longest
//! build that still fits now. Pure: every instant is a parameter.

use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{Inputs, Policy, PresenceState, Source};
use nightshift_proto::wire::{Outlook, Window};

/// How far ahead the outlook looks (a week and a day: every weekly window).
pub const HORIZON: SignedDuration = SignedDuration::from_hours(24 * 8);

/// Most presence changes followed when looking ahead (a guard; a week of
/// windows has far fewer).
const MAX_STEPS: usize = 10_000;

fn takes(policy: &Policy, at: Timestamp, inputs: &Inputs) -> bool {
    policy.evaluate(at, inputs).state.takes_builds()
}

/// The first change after `from` and not after `end` at which taking builds
/// becomes `want`.
fn next_flip(
    policy: &Policy,
    from: Timestamp,
    inputs: &Inputs,
    want: bool,
    end: Timestamp,
) -> Option<Timestamp> {
    next_where(policy, from, inputs, end, |state| {
        state.takes_builds() == want
    })
}

/// The first change after `from` and not after `end` to a state `wanted`
/// accepts.
fn next_where(
    policy: &Policy,
    from: Timestamp,
    inputs: &Inputs,
    end: Timestamp,
    wanted: impl Fn(PresenceState) -> bool,
) -> Option<Timestamp> {
    let mut at = from;
    for _ in 0..MAX_STEPS {
        let next = policy.next_change(at, inputs)?;
        if next > end {
            return None;
        }
        if wanted(policy.evaluate(next, inputs).state) {
            return Some(next);
        }
        at = next;
    }
    None
}

/// The outlook at `now`: load is taken as it is now for the current
/// stretch, and as absent for the next window (it cannot be foreseen); a
/// worker away because of load has no known next window.
pub fn outlook(
    policy: &Policy,
    now: Timestamp,
    inputs: &Inputs,
    overrun: SignedDuration,
) -> Outlook {
    let overrun_secs = u64::try_from(overrun.as_secs()).unwrap_or(0);
    let Ok(end) = now.checked_add(HORIZON) else {
        return Outlook {
            overrun_secs,
            ..Outlook::default()
        };
    };
    let presence = policy.evaluate(now, inputs);
    let takes_now = presence.state.takes_builds();
    let (takes_builds_until, search_from) = if takes_now {
        let until = next_flip(policy, now, inputs, false, end);
        (until, until)
    } else if presence.source == Source::Load || inputs.stopping {
        (None, None)
    } else {
        (None, Some(now))
    };
    // An available worker that turns reluctant before it stops taking
    // builds: from then on it lends its time only when nobody else can.
    let reluctant_from = if presence.state == PresenceState::Available {
        let last = takes_builds_until.unwrap_or(end);
        next_where(policy, now, inputs, last, |state| {
            state == PresenceState::Reluctant
        })
        .filter(|at| *at < last)
    } else {
        None
    };
    let future = Inputs {
        load: None,
        ..inputs.clone()
    };
    let next_window = search_from.and_then(|from| {
        let opens = if takes(policy, from, &future) {
            Some(from)
        } else {
            next_flip(policy, from, &future, true, end)
        }?;
        Some(Window {
            from: opens,
            until: next_flip(policy, opens, &future, false, end),
        })
    });
    Outlook {
        takes_builds_until,
        reluctant_from,
        next_window,
        overrun_secs,
    }
}

/// The longest build that, started at `now`, still ends before the worker
/// stops taking builds plus the owner's grace: `Some(ZERO)` when it takes
/// none now, `None` when nothing known limits it.
pub fn longest_fit(outlook: &Outlook, takes_now: bool, now: Timestamp) -> Option<SignedDuration> {
    if !takes_now {
        return Some(SignedDuration::ZERO);
    }
    let until = outlook.takes_builds_until?;
    let grace = SignedDuration::from_secs(i64::try_from(outlook.overrun_secs).unwrap_or(i64::MAX));
    Some(
        until
            .duration_since(now)
            .saturating_add(grace)
            .max(SignedDuration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_policy::{AvailabilityConfig, ManualOverride, ScheduleConfig};

    fn nights() -> Policy {
        let config = AvailabilityConfig {
            timezone: Some("Europe/Berlin".to_owned()),
            schedule: vec![ScheduleConfig {
                name: "nights".to_owned(),
                hours: Some("19:00-07:00".to_owned()),
                days: Some("mon-fri".to_owned()),
                open: None,
                close: None,
                state: PresenceState::Available,
            }],
            ..AvailabilityConfig::default()
        };
        Policy::compile(&config, jiff::tz::TimeZone::UTC).expect("valid")
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    #[test]
    fn inside_a_window_the_end_and_the_next_window_are_known() {
        let policy = nights();
        // Tuesday 06:50 Berlin (05:50Z): ends 07:00, next opens 19:00 until 07:00.
        let got = outlook(
            &policy,
            at("2026-12-01T05:50:00Z"),
            &Inputs::default(),
            SignedDuration::from_mins(15),
        );
        assert_eq!(got.takes_builds_until, Some(at("2026-12-01T06:00:00Z")));
        assert_eq!(
            got.next_window,
            Some(Window {
                from: at("2026-12-01T18:00:00Z"),
                until: Some(at("2026-12-02T06:00:00Z")),
            })
        );
        assert_eq!(got.overrun_secs, 900);
        assert_eq!(
            longest_fit(&got, true, at("2026-12-01T05:50:00Z")),
            Some(SignedDuration::from_mins(25))
        );
    }

    /// Nights available, then a reluctant morning until 09:00 (Berlin).
    fn nights_then_a_reluctant_morning() -> Policy {
        let config = AvailabilityConfig {
            timezone: Some("Europe/Berlin".to_owned()),
            schedule: vec![
                ScheduleConfig {
                    name: "nights".to_owned(),
                    hours: Some("19:00-07:00".to_owned()),
                    days: None,
                    open: None,
                    close: None,
                    state: PresenceState::Available,
                },
                ScheduleConfig {
                    name: "mornings".to_owned(),
                    hours: Some("07:00-09:00".to_owned()),
                    days: None,
                    open: None,
                    close: None,
                    state: PresenceState::Reluctant,
                },
            ],
            ..AvailabilityConfig::default()
        };
        Policy::compile(&config, jiff::tz::TimeZone::UTC).expect("valid")
    }

    #[test]
    fn an_available_worker_says_when_it_turns_reluctant() {
        let policy = nights_then_a_reluctant_morning();
        let cases = [
            // (now, takes builds until, reluctant from): 06:50 Berlin,
            // available: reluctant at 07:00, away at 09:00.
            (
                "2026-12-01T05:50:00Z",
                Some("2026-12-01T08:00:00Z"),
                Some("2026-12-01T06:00:00Z"),
            ),
            // Midnight: the same morning ahead.
            (
                "2026-11-30T23:00:00Z",
                Some("2026-12-01T08:00:00Z"),
                Some("2026-12-01T06:00:00Z"),
            ),
            // 08:00, reluctant already: only the end of taking builds.
            ("2026-12-01T07:00:00Z", Some("2026-12-01T08:00:00Z"), None),
            // Away at noon: neither.
            ("2026-12-01T11:00:00Z", None, None),
        ];
        for (now, until, reluctant) in cases {
            let got = outlook(&policy, at(now), &Inputs::default(), SignedDuration::ZERO);
            assert_eq!(got.takes_builds_until, until.map(at), "at {now}");
            assert_eq!(got.reluctant_from, reluctant.map(at), "at {now}");
        }
        // Plain nights never turn reluctant.
        let got = outlook(
            &nights(),
            at("2026-12-01T05:50:00Z"),
            &Inputs::default(),
            SignedDuration::ZERO,
        );
        assert_eq!(got.reluctant_from, None);
        // Reluctant by hand until 06:30, then the schedule's nights until 07:00.
        let now = at("2026-12-01T05:00:00Z");
        let inputs = Inputs {
            manual: Some(ManualOverride {
                state: PresenceState::Reluctant,
                reason: None,
                set_at: now,
                until: Some(at("2026-12-01T05:30:00Z")),
            }),
            ..Inputs::default()
        };
        let got = outlook(&policy, now, &inputs, SignedDuration::ZERO);
        assert_eq!(got.reluctant_from, None, "reluctant now: nothing to add");
        assert_eq!(got.takes_builds_until, Some(at("2026-12-01T08:00:00Z")));
    }

    #[test]
    fn outside_a_window_the_next_one_skips_the_weekend() {
        let policy = nights();
        // Saturday noon: Friday's night is over, Monday 19:00 opens next.
        let got = outlook(
            &policy,
            at("2026-12-05T11:00:00Z"),
            &Inputs::default(),
            SignedDuration::ZERO,
        );
        assert_eq!(got.takes_builds_until, None);
        assert_eq!(
            got.next_window,
            Some(Window {
                from: at("2026-12-07T18:00:00Z"),
                until: Some(at("2026-12-08T06:00:00Z")),
            })
        );
        assert_eq!(
            longest_fit(&got, false, at("2026-12-05T11:00:00Z")),
            Some(SignedDuration::ZERO)
        );
    }

    #[test]
    fn a_manual_override_ends_where_the_schedule_takes_over() {
        let policy = nights();
        let now = at("2026-12-01T10:00:00Z");
        let inputs = Inputs {
            manual: Some(ManualOverride {
                state: PresenceState::Available,
                reason: None,
                set_at: now,
                until: Some(at("2026-12-01T10:00:02Z")),
            }),
            ..Inputs::default()
        };
        let got = outlook(&policy, now, &inputs, SignedDuration::ZERO);
        assert_eq!(got.takes_builds_until, Some(at("2026-12-01T10:00:02Z")));
        assert_eq!(
            got.next_window.map(|w| w.from),
            Some(at("2026-12-01T18:00:00Z"))
        );
        assert_eq!(
            longest_fit(&got, true, now),
            Some(SignedDuration::from_secs(2))
        );
        // Available by hand with no end: nothing limits a build.
        let forever = Inputs {
            manual: Some(ManualOverride {
                until: None,
                ..inputs.manual.clone().expect("set")
            }),
            ..Inputs::default()
        };
        let got = outlook(&policy, now, &forever, SignedDuration::ZERO);
        assert_eq!(got.takes_builds_until, None);
        assert_eq!(got.next_window, None);
        assert_eq!(longest_fit(&got, true, now), None);
    }
}
