//! Data-driven tests of the availability engine: a table of config + instant (+ inputs)
//! → expected state, source and `until`, covering midnight, weekdays, overlaps, DST,
//! cron/hours agreement, manual expiry, master and stopping inputs, and load hysteresis.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{
    AvailabilityConfig, ForeignLoadSample, Inputs, ManualOverride, MasterOverride, Policy,
    PresenceState, Source,
};

const NIGHTS_BERLIN: &str = r#"
timezone = "Europe/Berlin"
[[schedule]]
name = "nights"
hours = "19:00-07:00"
"#;

const WEEKNIGHTS_HOURS: &str = r#"
timezone = "Europe/Berlin"
[[schedule]]
name = "nights"
hours = "19:00-07:00"
days = "mon-fri"
"#;

const WEEKNIGHTS_CRON: &str = r#"
timezone = "Europe/Berlin"
[[schedule]]
name = "nights"
open = "0 19 * * mon-fri"
close = "0 7 * * tue-sat"
"#;

const OVERLAPPING_UTC: &str = r#"
timezone = "UTC"
default = "away"
[[schedule]]
name = "evenings"
hours = "17:00-23:00"
[[schedule]]
name = "backup"
hours = "22:00-02:00"
state = "reluctant"
[[schedule]]
name = "dinner"
hours = "19:00-20:00"
state = "away"
"#;

const DST_BERLIN: &str = r#"
timezone = "Europe/Berlin"
[[schedule]]
name = "w"
hours = "02:30-03:30"
"#;

const DST_BERLIN_IN_GAP: &str = r#"
timezone = "Europe/Berlin"
[[schedule]]
name = "w"
hours = "02:15-02:45"
"#;

const DST_NEW_YORK: &str = r#"
timezone = "America/New_York"
[[schedule]]
name = "w"
hours = "01:30-02:30"
"#;

const WEEKENDS: &str = r#"
timezone = "Europe/Berlin"
[[schedule]]
name = "nights"
hours = "19:00-07:00"
[[schedule]]
name = "weekends"
hours = "00:00-24:00"
days = "sat,sun"
state = "reluctant"
"#;

const AWAY_AT_LUNCH: &str = r#"
timezone = "UTC"
[[schedule]]
name = "lunch"
hours = "12:00-13:00"
state = "away"
"#;

fn policy(toml_text: &str) -> Policy {
    let config: AvailabilityConfig = toml::from_str(toml_text).expect("test config parses");
    Policy::compile(&config, TimeZone::UTC).expect("test config compiles")
}

fn ts(text: &str) -> Timestamp {
    text.parse::<Timestamp>()
        .unwrap_or_else(|e| panic!("bad instant {text}: {e}"))
}

fn manual(state: PresenceState, set_at: &str, until: Option<&str>) -> Inputs {
    Inputs {
        manual: Some(ManualOverride {
            state,
            reason: Some("dentist".to_owned()),
            set_at: ts(set_at),
            until: until.map(ts),
        }),
        ..Inputs::default()
    }
}

struct Case {
    config: &'static str,
    at: &'static str,
    inputs: Inputs,
    state: PresenceState,
    source: &'static str,
    until: Option<&'static str>,
}

fn case(
    config: &'static str,
    at: &'static str,
    state: PresenceState,
    source: &'static str,
    until: Option<&'static str>,
) -> Case {
    Case {
        config,
        at,
        inputs: Inputs::default(),
        state,
        source,
        until,
    }
}

fn with(mut c: Case, inputs: Inputs) -> Case {
    c.inputs = inputs;
    c
}

use PresenceState::{Available, Away, Reluctant};

fn cases() -> Vec<Case> {
    let mut cases = vec![
        // A window across midnight, every day.
        case(
            NIGHTS_BERLIN,
            "2026-11-23T20:00:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-24T07:00:00+01:00"),
        ),
        case(
            NIGHTS_BERLIN,
            "2026-11-24T00:30:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-24T07:00:00+01:00"),
        ),
        case(
            NIGHTS_BERLIN,
            "2026-11-24T06:59:59+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-24T07:00:00+01:00"),
        ),
        case(
            NIGHTS_BERLIN,
            "2026-11-24T07:00:00+01:00",
            Away,
            "default",
            Some("2026-11-24T19:00:00+01:00"),
        ),
        case(
            NIGHTS_BERLIN,
            "2026-11-24T18:59:00+01:00",
            Away,
            "default",
            Some("2026-11-24T19:00:00+01:00"),
        ),
        case(
            NIGHTS_BERLIN,
            "2026-11-24T19:00:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-25T07:00:00+01:00"),
        ),
        // Weekday limits incl. the night from Friday into Saturday; hours and cron agree.
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-27T23:00:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-28T07:00:00+01:00"),
        ),
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-28T06:00:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-28T07:00:00+01:00"),
        ),
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-28T07:00:00+01:00",
            Away,
            "default",
            Some("2026-11-30T19:00:00+01:00"),
        ),
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-28T20:00:00+01:00",
            Away,
            "default",
            Some("2026-11-30T19:00:00+01:00"),
        ),
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-29T22:00:00+01:00",
            Away,
            "default",
            Some("2026-11-30T19:00:00+01:00"),
        ),
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-30T03:00:00+01:00",
            Away,
            "default",
            Some("2026-11-30T19:00:00+01:00"),
        ),
        case(
            WEEKNIGHTS_HOURS,
            "2026-11-30T19:00:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-12-01T07:00:00+01:00"),
        ),
        // Overlapping windows: the most restrictive wins.
        case(
            OVERLAPPING_UTC,
            "2026-11-23T18:00:00Z",
            Available,
            "schedule:evenings",
            Some("2026-11-23T19:00:00Z"),
        ),
        case(
            OVERLAPPING_UTC,
            "2026-11-23T19:30:00Z",
            Away,
            "schedule:dinner",
            Some("2026-11-23T20:00:00Z"),
        ),
        case(
            OVERLAPPING_UTC,
            "2026-11-23T20:00:00Z",
            Available,
            "schedule:evenings",
            Some("2026-11-23T22:00:00Z"),
        ),
        case(
            OVERLAPPING_UTC,
            "2026-11-23T22:30:00Z",
            Reluctant,
            "schedule:backup",
            // evenings closes at 23:00 under backup: the state holds until 02:00.
            Some("2026-11-24T02:00:00Z"),
        ),
        case(
            OVERLAPPING_UTC,
            "2026-11-23T23:30:00Z",
            Reluctant,
            "schedule:backup",
            Some("2026-11-24T02:00:00Z"),
        ),
        case(
            OVERLAPPING_UTC,
            "2026-11-24T02:00:00Z",
            Away,
            "default",
            Some("2026-11-24T17:00:00Z"),
        ),
        // Back-to-back whole days (sat, sun) are one stretch; nights overlap them.
        case(
            WEEKENDS,
            "2026-11-28T12:00:00+01:00",
            Reluctant,
            "schedule:weekends",
            // nights open and close under the weekend: reluctant until Monday 00:00.
            Some("2026-11-30T00:00:00+01:00"),
        ),
        case(
            WEEKENDS,
            "2026-11-29T00:00:00+01:00",
            Reluctant,
            "schedule:weekends",
            Some("2026-11-30T00:00:00+01:00"),
        ),
        case(
            WEEKENDS,
            "2026-11-30T00:00:00+01:00",
            Available,
            "schedule:nights",
            Some("2026-11-30T07:00:00+01:00"),
        ),
        // A window that only makes the worker away: available otherwise.
        case(
            AWAY_AT_LUNCH,
            "2026-11-23T11:00:00Z",
            Available,
            "default",
            Some("2026-11-23T12:00:00Z"),
        ),
        case(
            AWAY_AT_LUNCH,
            "2026-11-23T12:30:00Z",
            Away,
            "schedule:lunch",
            Some("2026-11-23T13:00:00Z"),
        ),
        // Europe/Berlin spring forward (2026-03-29, 02:00 CET -> 03:00 CEST):
        // a window opening in the gap opens at the first instant after it.
        case(
            DST_BERLIN,
            "2026-03-29T00:59:00Z",
            Away,
            "default",
            Some("2026-03-29T01:00:00Z"),
        ),
        case(
            DST_BERLIN,
            "2026-03-29T01:00:00Z",
            Available,
            "schedule:w",
            Some("2026-03-29T01:30:00Z"),
        ),
        case(
            DST_BERLIN,
            "2026-03-29T01:30:00Z",
            Away,
            "default",
            Some("2026-03-30T00:30:00Z"),
        ),
        // A window wholly inside the gap does not happen that day.
        case(
            DST_BERLIN_IN_GAP,
            "2026-03-29T01:00:00Z",
            Away,
            "default",
            Some("2026-03-30T00:15:00Z"),
        ),
        case(
            DST_BERLIN_IN_GAP,
            "2026-03-30T00:20:00Z",
            Available,
            "schedule:w",
            Some("2026-03-30T00:45:00Z"),
        ),
        // Europe/Berlin fall back (2026-10-25, 03:00 CEST -> 02:00 CET):
        // 02:30 happens twice; the window opens once and closes once.
        case(
            DST_BERLIN,
            "2026-10-25T00:30:00Z",
            Available,
            "schedule:w",
            Some("2026-10-25T02:30:00Z"),
        ),
        case(
            DST_BERLIN,
            "2026-10-25T01:29:00Z",
            Available,
            "schedule:w",
            Some("2026-10-25T02:30:00Z"),
        ),
        case(
            DST_BERLIN,
            "2026-10-25T01:45:00Z",
            Available,
            "schedule:w",
            Some("2026-10-25T02:30:00Z"),
        ),
        case(
            DST_BERLIN,
            "2026-10-25T02:30:00Z",
            Away,
            "default",
            Some("2026-10-26T01:30:00Z"),
        ),
        // America/New_York spring forward (2026-03-08, 02:00 EST -> 03:00 EDT):
        // a close in the gap happens at 03:00 EDT.
        case(
            DST_NEW_YORK,
            "2026-03-08T06:30:00Z",
            Available,
            "schedule:w",
            Some("2026-03-08T07:00:00Z"),
        ),
        case(
            DST_NEW_YORK,
            "2026-03-08T07:00:00Z",
            Away,
            "default",
            Some("2026-03-09T05:30:00Z"),
        ),
        // America/New_York fall back (2026-11-01, 02:00 EDT -> 01:00 EST):
        // opens at the first 01:30 (EDT) and stays open through the second.
        case(
            DST_NEW_YORK,
            "2026-11-01T05:29:00Z",
            Away,
            "default",
            Some("2026-11-01T05:30:00Z"),
        ),
        case(
            DST_NEW_YORK,
            "2026-11-01T05:30:00Z",
            Available,
            "schedule:w",
            Some("2026-11-01T07:30:00Z"),
        ),
        case(
            DST_NEW_YORK,
            "2026-11-01T06:45:00Z",
            Available,
            "schedule:w",
            Some("2026-11-01T07:30:00Z"),
        ),
        case(
            DST_NEW_YORK,
            "2026-11-01T07:30:00Z",
            Away,
            "default",
            Some("2026-11-02T06:30:00Z"),
        ),
    ];
    // Manual overrides: `for`/`until` expiry, indefinite, stopping beats manual.
    cases.extend([
        with(
            case(
                NIGHTS_BERLIN,
                "2026-11-23T21:00:00+01:00",
                Away,
                "manual",
                Some("2026-11-23T22:00:00+01:00"),
            ),
            manual(
                Away,
                "2026-11-23T20:00:00+01:00",
                Some("2026-11-23T22:00:00+01:00"),
            ),
        ),
        with(
            case(
                NIGHTS_BERLIN,
                "2026-11-23T22:00:00+01:00",
                Available,
                "schedule:nights",
                Some("2026-11-24T07:00:00+01:00"),
            ),
            manual(
                Away,
                "2026-11-23T20:00:00+01:00",
                Some("2026-11-23T22:00:00+01:00"),
            ),
        ),
        with(
            case(
                NIGHTS_BERLIN,
                "2026-11-23T12:00:00+01:00",
                Available,
                "manual",
                None,
            ),
            manual(Available, "2026-11-23T11:00:00+01:00", None),
        ),
        with(
            case(
                NIGHTS_BERLIN,
                "2026-11-23T12:00:00+01:00",
                Away,
                "stopping",
                None,
            ),
            Inputs {
                stopping: true,
                ..manual(Available, "2026-11-23T11:00:00+01:00", None)
            },
        ),
        // Master pause: most restrictive among the automatic sources, until it ends.
        with(
            case(
                NIGHTS_BERLIN,
                "2026-11-23T20:00:00+01:00",
                Away,
                "master",
                Some("2026-11-23T21:00:00+01:00"),
            ),
            Inputs {
                master: Some(MasterOverride {
                    state: Away,
                    reason: "paused by admin".to_owned(),
                    until: Some(ts("2026-11-23T21:00:00+01:00")),
                }),
                ..Inputs::default()
            },
        ),
        with(
            case(
                NIGHTS_BERLIN,
                "2026-11-23T21:00:00+01:00",
                Available,
                "schedule:nights",
                Some("2026-11-24T07:00:00+01:00"),
            ),
            Inputs {
                master: Some(MasterOverride {
                    state: Away,
                    reason: "paused by admin".to_owned(),
                    until: Some(ts("2026-11-23T21:00:00+01:00")),
                }),
                ..Inputs::default()
            },
        ),
    ]);
    cases
}

#[test]
fn presence_table() {
    let mut failures = Vec::new();
    for (index, c) in cases().into_iter().enumerate() {
        let policy = policy(c.config);
        let now = ts(c.at);
        let presence = policy.evaluate(now, &c.inputs);
        let expected_until = c.until.map(ts);
        let got = (presence.state, presence.source.to_string(), presence.until);
        let want = (c.state, c.source.to_owned(), expected_until);
        if got != want {
            failures.push(format!(
                "case {index} at {}: got {:?} (reason {:?}), want {:?}",
                c.at, got, presence.reason, want
            ));
        }
        // `until` is the first re-evaluation (next_change) at which the
        // state differs; every re-evaluation before it keeps the state.
        let mut at = now;
        let mut walked = None;
        while let Some(next) = policy.next_change(at, &c.inputs) {
            if policy.evaluate(next, &c.inputs).state != presence.state {
                walked = Some(next);
                break;
            }
            at = next;
            if at > now + SignedDuration::from_hours(24 * 30) {
                break;
            }
        }
        assert_eq!(presence.until, walked, "case {index}");
        assert!(presence.since <= now, "case {index}: since after now");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn hours_and_cron_forms_agree_for_two_weeks() {
    let hours = policy(WEEKNIGHTS_HOURS);
    let cron = policy(WEEKNIGHTS_CRON);
    let from = ts("2026-03-20T00:00:00Z");
    let to = ts("2026-04-03T00:00:00Z");
    assert_eq!(hours.preview(from, to), cron.preview(from, to));
    let mut at = from;
    while at < to {
        let a = hours.evaluate(at, &Inputs::default());
        let b = cron.evaluate(at, &Inputs::default());
        assert_eq!((a.state, a.until), (b.state, b.until), "at {at}");
        at += SignedDuration::from_mins(17);
    }
}

/// Opening and closing at the same instant (every Wednesday 02:00) is an
/// empty window: nothing changes then, so `next_change` does not wake the
/// agent every Wednesday for nothing (it looks 16 windows ahead, then
/// re-evaluates once to be safe).
#[test]
fn an_empty_window_is_not_a_change() {
    let p = policy(
        r#"
timezone = "UTC"
default = "away"
[[schedule]]
name = "w0"
open = "0 2 * * wed"
close = "0 2 * * wed,thu"
"#,
    );
    let now = ts("2026-11-23T20:00:00Z");
    let wednesday = ts("2026-11-25T02:00:00Z");
    assert_eq!(
        p.evaluate(now, &Inputs::default()).state,
        PresenceState::Away
    );
    assert_eq!(
        p.evaluate(wednesday, &Inputs::default()).state,
        PresenceState::Away
    );
    let next = p.next_change(now, &Inputs::default());
    assert!(
        next.is_none_or(|next| next > ts("2027-01-01T00:00:00Z")),
        "woken for an empty window at {next:?}"
    );
}

#[test]
fn since_is_when_the_window_opened() {
    let p = policy(NIGHTS_BERLIN);
    let presence = p.evaluate(ts("2026-11-24T03:00:00+01:00"), &Inputs::default());
    assert_eq!(presence.since, ts("2026-11-23T19:00:00+01:00"));
    let presence = p.evaluate(ts("2026-11-24T10:00:00+01:00"), &Inputs::default());
    assert_eq!(presence.since, ts("2026-11-24T07:00:00+01:00"));
    assert_eq!(
        presence.reason,
        "outside schedule nights (19:00–07:00 Europe/Berlin)"
    );
}

fn sample(at: &str, load1: f64) -> ForeignLoadSample {
    ForeignLoadSample {
        at: ts(at),
        load1,
        cpu_percent: 0.0,
    }
}

const LOADED: &str = r#"
timezone = "UTC"
[[schedule]]
name = "days"
hours = "08:00-18:00"
state = "reluctant"
[load]
max_load1 = 4.0
for = "2m"
"#;

#[test]
fn load_goes_away_only_after_holding_for_the_duration() {
    let policy = policy(LOADED);
    let mut monitor = policy.load_monitor().expect("load policy");
    let v = monitor.observe(sample("2026-11-23T10:00:00Z", 6.0));
    assert!(!v.high);
    assert_eq!(v.pending_change, Some(ts("2026-11-23T10:02:00Z")));
    let inputs = Inputs {
        load: Some(v),
        ..Inputs::default()
    };
    // Still reluctant (schedule), and a re-evaluation is due at the deadline.
    let p = policy.evaluate(ts("2026-11-23T10:00:00Z"), &inputs);
    assert_eq!(
        (p.state, p.source.clone()),
        (Reluctant, Source::Schedule("days".into()))
    );
    assert_eq!(p.until, Some(ts("2026-11-23T10:02:00Z")));
    // A dip below the threshold restarts the clock.
    assert!(!monitor.observe(sample("2026-11-23T10:01:00Z", 1.0)).high);
    let v = monitor.observe(sample("2026-11-23T10:01:30Z", 6.0));
    assert!(!v.high);
    assert_eq!(v.pending_change, Some(ts("2026-11-23T10:03:30Z")));
    assert!(!monitor.observe(sample("2026-11-23T10:03:29Z", 6.0)).high);
    // Held for 2m: away, with source load; without a new sample at the deadline too.
    let v = monitor.verdict_at(ts("2026-11-23T10:03:30Z"));
    assert!(v.high);
    assert_eq!(v.since, ts("2026-11-23T10:03:30Z"));
    let inputs = Inputs {
        load: Some(v),
        ..Inputs::default()
    };
    let p = policy.evaluate(ts("2026-11-23T10:03:30Z"), &inputs);
    assert_eq!((p.state, p.source), (Away, Source::Load));
    // The schedule ends at 18:00 into the default `away`: no state change then.
    assert_eq!(p.until, None);
    assert_eq!(
        policy.next_change(ts("2026-11-23T10:03:30Z"), &inputs),
        Some(ts("2026-11-23T18:00:00Z"))
    );
}

#[test]
fn load_comes_back_only_after_holding_below_for_the_duration() {
    let policy = policy(LOADED);
    let mut monitor = policy.load_monitor().expect("load policy");
    monitor.observe(sample("2026-11-23T10:00:00Z", 6.0));
    assert!(monitor.observe(sample("2026-11-23T10:02:00Z", 6.0)).high);
    let v = monitor.observe(sample("2026-11-23T10:05:00Z", 0.5));
    assert!(v.high, "one low sample is not enough");
    assert_eq!(v.pending_change, Some(ts("2026-11-23T10:07:00Z")));
    // A spike resets the way back.
    assert!(monitor.observe(sample("2026-11-23T10:06:00Z", 5.0)).high);
    assert_eq!(monitor.next_deadline(), None);
    monitor.observe(sample("2026-11-23T10:06:30Z", 0.5));
    assert!(monitor.observe(sample("2026-11-23T10:08:29Z", 0.5)).high);
    let v = monitor.observe(sample("2026-11-23T10:08:30Z", 0.5));
    assert!(!v.high);
    let p = policy.evaluate(
        ts("2026-11-23T10:08:30Z"),
        &Inputs {
            load: Some(v),
            ..Inputs::default()
        },
    );
    assert_eq!(
        (p.state, p.source),
        (Reluctant, Source::Schedule("days".into()))
    );
}

#[test]
fn own_builds_do_not_count_as_load() {
    let policy = policy(LOADED);
    let mut monitor = policy.load_monitor().expect("load policy");
    // Total load 6, of which 5 are the worker's own build tasks: foreign 1.
    for minute in 0..10 {
        let at = ts("2026-11-23T10:00:00Z") + SignedDuration::from_mins(minute);
        let v = monitor.observe(ForeignLoadSample::from_totals(at, 6.0, 5.0, 90.0, 85.0));
        assert!(!v.high);
    }
}

#[test]
fn fits_checks_the_build_ends_before_the_worker_goes_away() {
    let nights = policy(NIGHTS_BERLIN);
    let none = Inputs::default();
    let at = ts("2026-11-23T20:00:00+01:00");
    assert!(nights.fits(at, &none, SignedDuration::from_hours(10)));
    assert!(nights.fits(at, &none, SignedDuration::from_hours(11)));
    assert!(!nights.fits(at, &none, SignedDuration::from_mins(11 * 60 + 1)));
    assert!(!nights.fits(
        ts("2026-11-23T12:00:00+01:00"),
        &none,
        SignedDuration::from_mins(1)
    ));
    // Reluctant still takes builds: 18:00 + 8h ends as the worker goes away... but dinner first.
    let overlapping = policy(OVERLAPPING_UTC);
    let at = ts("2026-11-23T20:00:00Z");
    assert!(overlapping.fits(at, &none, SignedDuration::from_hours(6)));
    assert!(!overlapping.fits(at, &none, SignedDuration::from_mins(6 * 60 + 1)));
    assert!(!overlapping.fits(
        ts("2026-11-23T18:00:00Z"),
        &none,
        SignedDuration::from_mins(61)
    ));
    // A manual override that ends hands back to the schedule.
    let inputs = manual(
        Available,
        "2026-11-23T05:00:00+01:00",
        Some("2026-11-23T09:00:00+01:00"),
    );
    assert!(nights.fits(
        ts("2026-11-23T06:00:00+01:00"),
        &inputs,
        SignedDuration::from_hours(3)
    ));
    assert!(!nights.fits(
        ts("2026-11-23T06:00:00+01:00"),
        &inputs,
        SignedDuration::from_mins(181)
    ));
}

#[test]
fn preview_is_contiguous_merged_and_ordered() {
    let p = policy(WEEKENDS);
    let from = ts("2026-11-27T12:00:00+01:00");
    let to = ts("2026-12-01T12:00:00+01:00");
    let intervals = p.preview(from, to).intervals;
    assert_eq!(intervals.first().map(|i| i.from), Some(from));
    assert_eq!(intervals.last().map(|i| i.to), Some(to));
    for pair in intervals.windows(2) {
        assert_eq!(pair[0].to, pair[1].from);
        assert!(pair[0].from < pair[0].to);
        assert!((pair[0].state, &pair[0].source) != (pair[1].state, &pair[1].source));
    }
    let summary: Vec<(String, PresenceState)> = intervals
        .iter()
        .map(|i| {
            (
                i.from
                    .to_zoned(p.time_zone().clone())
                    .strftime("%a %H:%M")
                    .to_string(),
                i.state,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("Fri 12:00".to_owned(), Away),
            ("Fri 19:00".to_owned(), Available),
            ("Sat 00:00".to_owned(), Reluctant),
            ("Mon 00:00".to_owned(), Available),
            ("Mon 07:00".to_owned(), Away),
            ("Mon 19:00".to_owned(), Available),
            ("Tue 07:00".to_owned(), Away),
        ]
    );
}

#[test]
fn describe_says_what_each_policy_means() {
    assert_eq!(
        policy(NIGHTS_BERLIN).describe(),
        [
            "nights: available 19:00–07:00 Europe/Berlin, every day",
            "default: away outside the schedules (implied; set `default` to change)",
        ]
    );
    let lines = policy(WEEKNIGHTS_CRON).describe();
    assert!(
        lines[0].starts_with("nights: available from \"0 19 * * mon-fri\""),
        "{lines:?}"
    );
    let lines = policy(LOADED).describe();
    assert_eq!(
        lines[2],
        "load: away when 1-minute load > 4 for 2m (not counting own builds); back when load ≤ 4 for 2m; sampled every 5s"
    );
}

#[test]
fn policy_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Policy>();
    shared::<nightshift_policy::LoadMonitor>();
}

#[test]
fn master_side_schedule_carries_source_master() {
    let config: AvailabilityConfig = toml::from_str(NIGHTS_BERLIN).unwrap();
    let p = Policy::compile_for_master(&config, TimeZone::UTC, "worker[0].availability").unwrap();
    let presence = p.evaluate(ts("2026-11-23T12:00:00+01:00"), &Inputs::default());
    assert_eq!(
        (presence.state, presence.source.clone()),
        (Away, Source::Master)
    );
    // Handed to the worker's own policy as a master override, it restricts it until it ends.
    let inputs = Inputs {
        master: Some(MasterOverride::from_presence(&presence)),
        ..Inputs::default()
    };
    let own = policy(AWAY_AT_LUNCH).evaluate(ts("2026-11-23T12:00:00+01:00"), &inputs);
    assert_eq!((own.state, own.source), (Away, Source::Master));
    // Its own lunch window (away) opens under the master's away: no change;
    // the state changes when the master's schedule ends at 19:00 Berlin.
    assert_eq!(own.until, Some(ts("2026-11-23T18:00:00Z")));
    // But the agent re-evaluates when the lunch window opens.
    assert_eq!(
        policy(AWAY_AT_LUNCH).next_change(ts("2026-11-23T12:00:00+01:00"), &inputs),
        Some(ts("2026-11-23T12:00:00Z"))
    );
    let bad: AvailabilityConfig =
        toml::from_str("[[schedule]]\nname = \"x\"\nhours = \"7-7\"\n").unwrap();
    let errors =
        Policy::compile_for_master(&bad, TimeZone::UTC, "worker[0].availability").unwrap_err();
    assert_eq!(errors[0].path, "worker[0].availability.schedule[0].hours");
    // A file that keeps the windows and zone directly in the worker entry.
    let options = nightshift_policy::CompileOptions {
        path: "worker[0]".to_owned(),
        owner: nightshift_policy::PolicyOwner::Master,
        schedule_path: Some("worker[0].schedule".to_owned()),
        timezone_path: Some("worker[0].timezone".to_owned()),
    };
    let errors = Policy::compile_with(&bad, TimeZone::UTC, &options).unwrap_err();
    assert_eq!(errors[0].path, "worker[0].schedule[0].hours");
}

#[test]
fn compile_reports_every_problem_at_its_key() {
    let config: AvailabilityConfig = toml::from_str(
        r#"
timezone = "Europe/Berln"
default = "offline"
[[schedule]]
name = "nights"
hours = "19:00-07:00"
days = "mnd"
[[schedule]]
name = "nights"
open = "0 25 * * *"
close = "0 7 * * *"
[[schedule]]
name = "half"
open = "0 7 * * *"
[[schedule]]
name = "both"
hours = "1-2"
open = "0 7 * * *"
[load]
resume_load1 = 3.0
state = "available"
"#,
    )
    .unwrap();
    let errors = Policy::compile(&config, TimeZone::UTC).unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "availability.timezone",
            "availability.default",
            "availability.schedule[0].days",
            "availability.schedule[1].name",
            "availability.schedule[1].open",
            "availability.schedule[2].close",
            "availability.schedule[3].open",
            "availability.load.max_load1",
            "availability.load.resume_load1",
            "availability.load.state",
        ],
        "{errors:#?}"
    );
    assert_eq!(errors[2].message, "unknown day \"mnd\", expected mon..sun");
    assert!(
        errors[4].message.contains("hour (2nd field"),
        "{}",
        errors[4].message
    );
}

#[test]
fn tracker_keeps_since_while_state_and_source_hold() {
    use nightshift_policy::{PresenceChange, PresenceTracker};
    let p = policy(NIGHTS_BERLIN);
    let mut tracker = PresenceTracker::new();
    let first = p.evaluate(
        ts("2026-11-23T12:00:00+01:00"),
        &manual(Away, "2026-11-23T12:00:00+01:00", None),
    );
    assert_eq!(tracker.update(first), PresenceChange::State);
    let again = p.evaluate(
        ts("2026-11-23T13:00:00+01:00"),
        &manual(Away, "2026-11-23T13:00:00+01:00", None),
    );
    assert_eq!(tracker.update(again), PresenceChange::Unchanged);
    assert_eq!(
        tracker.current().map(|c| c.since),
        Some(ts("2026-11-23T12:00:00+01:00"))
    );
    let auto = p.evaluate(ts("2026-11-23T14:00:00+01:00"), &Inputs::default());
    assert_eq!(tracker.update(auto), PresenceChange::State);
}
