//! What the policies say about the time ahead, for window-aware admission:
//! when the worker stops taking builds, its next window, and the longest
//! build that still fits now. Pure: every instant is a parameter.

use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{Inputs, Policy, Source};
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
    let mut at = from;
    for _ in 0..MAX_STEPS {
        let next = policy.next_change(at, inputs)?;
        if next > end {
            return None;
        }
        if takes(policy, next, inputs) == want {
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
    use nightshift_policy::{AvailabilityConfig, ManualOverride, PresenceState, ScheduleConfig};

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
