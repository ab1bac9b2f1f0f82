//! Regression table of issue 9's exactness cases: the DST rule applied to
//! every firing of every cron (lists, ranges, steps), chains of coinciding
//! open/close of any length, a preview cut short saying so, names in the
//! wrong cron field, `open == close`, and `until` as the instant the state
//! (not only its reason) changes.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{
    AvailabilityConfig, Inputs, ManualOverride, Policy, PolicyError, PresenceState,
};

fn compile(toml_text: &str) -> Result<Policy, Vec<PolicyError>> {
    let config: AvailabilityConfig = toml::from_str(toml_text).expect("test config parses");
    Policy::compile(&config, TimeZone::UTC)
}

fn policy(toml_text: &str) -> Policy {
    compile(toml_text).unwrap_or_else(|e| panic!("test config compiles: {e:?}"))
}

fn ts(text: &str) -> Timestamp {
    text.parse::<Timestamp>()
        .unwrap_or_else(|e| panic!("bad instant {text}: {e}"))
}

fn cron_window(zone: &str, open: &str, close: &str) -> String {
    format!(
        "timezone = \"{zone}\"\n[[schedule]]\nname = \"w\"\nopen = \"{open}\"\nclose = \"{close}\"\n"
    )
}

/// `(from, to, state)` in the policy's zone, RFC 3339 with offsets.
fn intervals(policy: &Policy, from: &str, days: i64) -> Vec<(String, String, String)> {
    let from = ts(from);
    let to = from + SignedDuration::from_hours(24 * days);
    let preview = policy.preview(from, to);
    assert_eq!(preview.truncated_at, None);
    let tz = policy.time_zone().clone();
    let show = |t: Timestamp| {
        t.to_zoned(tz.clone())
            .strftime("%Y-%m-%dT%H:%M%:z")
            .to_string()
    };
    preview
        .intervals
        .iter()
        .map(|i| (show(i.from), show(i.to), i.state.to_string()))
        .collect()
}

fn rows(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

struct DstCase {
    what: &'static str,
    zone: &'static str,
    open: &'static str,
    close: &'static str,
    from: &'static str,
    days: i64,
    expected: &'static [(&'static str, &'static str, &'static str)],
}

const DST_CASES: &[DstCase] = &[
    DstCase {
        what: "a close in the New York spring-forward gap closes at 03:00",
        zone: "America/New_York",
        open: "30 3,15 * * 6",
        close: "0 2,14 * * 0",
        from: "2026-03-07T12:00:00-05:00",
        days: 2,
        expected: &[
            (
                "2026-03-07T12:00-05:00",
                "2026-03-08T03:00-04:00",
                "available",
            ),
            ("2026-03-08T03:00-04:00", "2026-03-09T13:00-04:00", "away"),
        ],
    },
    DstCase {
        what: "an open in the Berlin spring-forward gap opens at 03:00",
        zone: "Europe/Berlin",
        open: "30 2,14 * * *",
        close: "0 4,16 * * *",
        from: "2026-03-28T12:00:00+01:00",
        days: 2,
        expected: &[
            ("2026-03-28T12:00+01:00", "2026-03-28T14:30+01:00", "away"),
            (
                "2026-03-28T14:30+01:00",
                "2026-03-28T16:00+01:00",
                "available",
            ),
            ("2026-03-28T16:00+01:00", "2026-03-29T03:00+02:00", "away"),
            (
                "2026-03-29T03:00+02:00",
                "2026-03-29T04:00+02:00",
                "available",
            ),
            ("2026-03-29T04:00+02:00", "2026-03-29T14:30+02:00", "away"),
            (
                "2026-03-29T14:30+02:00",
                "2026-03-29T16:00+02:00",
                "available",
            ),
            ("2026-03-29T16:00+02:00", "2026-03-30T02:30+02:00", "away"),
            (
                "2026-03-30T02:30+02:00",
                "2026-03-30T04:00+02:00",
                "available",
            ),
            ("2026-03-30T04:00+02:00", "2026-03-30T13:00+02:00", "away"),
        ],
    },
    DstCase {
        what: "on the Berlin fall-back night the window opens once",
        zone: "Europe/Berlin",
        open: "15 2,14 * * *",
        close: "45 2,14 * * *",
        from: "2026-10-24T12:00:00+02:00",
        days: 2,
        expected: &[
            ("2026-10-24T12:00+02:00", "2026-10-24T14:15+02:00", "away"),
            (
                "2026-10-24T14:15+02:00",
                "2026-10-24T14:45+02:00",
                "available",
            ),
            ("2026-10-24T14:45+02:00", "2026-10-25T02:15+02:00", "away"),
            (
                "2026-10-25T02:15+02:00",
                "2026-10-25T02:45+02:00",
                "available",
            ),
            ("2026-10-25T02:45+02:00", "2026-10-25T14:15+01:00", "away"),
            (
                "2026-10-25T14:15+01:00",
                "2026-10-25T14:45+01:00",
                "available",
            ),
            ("2026-10-25T14:45+01:00", "2026-10-26T02:15+01:00", "away"),
            (
                "2026-10-26T02:15+01:00",
                "2026-10-26T02:45+01:00",
                "available",
            ),
            ("2026-10-26T02:45+01:00", "2026-10-26T11:00+01:00", "away"),
        ],
    },
    DstCase {
        what: "a step whose firings all fall in the gap fires once, at its end",
        zone: "Europe/Berlin",
        open: "*/20 2 * * *",
        close: "10 3 * * *",
        from: "2026-03-29T00:00:00+01:00",
        days: 1,
        expected: &[
            ("2026-03-29T00:00+01:00", "2026-03-29T03:00+02:00", "away"),
            (
                "2026-03-29T03:00+02:00",
                "2026-03-29T03:10+02:00",
                "available",
            ),
            ("2026-03-29T03:10+02:00", "2026-03-30T01:00+02:00", "away"),
        ],
    },
    DstCase {
        what: "a range closing in the Lord Howe half-hour gap closes at its end",
        zone: "Australia/Lord_Howe",
        open: "0 1 * * *",
        close: "0-59/15 2 * * *",
        from: "2026-10-04T00:00:00+10:30",
        days: 1,
        expected: &[
            ("2026-10-04T00:00+10:30", "2026-10-04T01:00+10:30", "away"),
            (
                "2026-10-04T01:00+10:30",
                "2026-10-04T02:30+11:00",
                "available",
            ),
            ("2026-10-04T02:30+11:00", "2026-10-05T00:30+11:00", "away"),
        ],
    },
];

#[test]
fn the_dst_rule_holds_for_every_cron() {
    let mut failures = Vec::new();
    for case in DST_CASES {
        let p = policy(&cron_window(case.zone, case.open, case.close));
        let expected = rows(case.expected);
        let got = intervals(&p, case.from, case.days);
        if got != expected {
            failures.push(format!("{}:\n got {got:#?}\nwant {expected:#?}", case.what));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_chain_of_coinciding_open_and_close_keeps_the_state_of_before() {
    // Open and close fire together on the 1st to the 20th; the window was
    // closed before the first of them, so it stays closed all month.
    let p = policy(&cron_window("UTC", "0 22 1-20 * *", "0 22 * * *"));
    assert_eq!(
        intervals(&p, "2026-12-01T00:00:00Z", 31),
        rows(&[("2026-12-01T00:00+00:00", "2027-01-01T00:00+00:00", "away")])
    );
    assert_eq!(
        p.warnings().first().map(|w| w.path.as_str()),
        Some("availability.schedule[0].open")
    );
    // And a chain longer than any fixed limit after a real open stays open:
    // open daily at 22:00 until the 1st, then 40 days of ties.
    let p = policy(&cron_window("UTC", "0 22 * * *", "0 22 2-31 * *"));
    let at = ts("2026-12-25T12:00:00Z");
    let presence = p.evaluate(at, &Inputs::default());
    assert_eq!(presence.state, PresenceState::Available);
    assert_eq!(presence.since, ts("2026-12-01T22:00:00Z"));
    assert_eq!(presence.until, None);
}

#[test]
fn a_preview_past_its_limit_says_where_it_stopped() {
    // Opens on even minutes, closes on odd ones: 1440 changes a day.
    let p = policy(&cron_window("UTC", "*/2 * * * *", "1-59/2 * * * *"));
    let from = ts("2026-12-01T00:00:00Z");
    let to = from + SignedDuration::from_hours(24);
    let preview = p.preview_limited(from, to, 100);
    assert_eq!(preview.truncated_at, Some(ts("2026-12-01T01:40:00Z")));
    assert_eq!(preview.intervals.len(), 100);
    assert_eq!(
        preview.intervals.last().map(|i| i.to),
        Some(ts("2026-12-01T01:40:00Z"))
    );
    let full = p.preview(from, to);
    assert_eq!(full.truncated_at, None);
    assert_eq!(full.intervals.len(), 1440);
    assert_eq!(full.intervals[..100], preview.intervals[..]);
}

#[test]
fn names_in_the_wrong_cron_field_are_rejected_where_they_stand() {
    for (open, word) in [
        ("0 9 * mon *", "`mon` is a day name"),
        ("0 9 * * jan", "`jan` is a month name"),
        ("mon 9 * * *", "`mon` is a day name"),
        ("0 sat * * *", "`sat` is a day name"),
        ("0 9 dec * *", "`dec` is a month name"),
    ] {
        let errors = compile(&cron_window("UTC", open, "0 17 * * *")).unwrap_err();
        assert_eq!(errors.len(), 1, "{open}: {errors:?}");
        assert_eq!(errors[0].path, "availability.schedule[0].open", "{open}");
        assert!(errors[0].message.contains(word), "{open}: {errors:?}");
    }
}

#[test]
fn open_equal_to_close_is_rejected_like_equal_hours() {
    let errors = compile(&cron_window("UTC", "0 19 * * *", "0 19 * * 0-6")).unwrap_err();
    assert_eq!(errors[0].path, "availability.schedule[0].close");
    assert!(errors[0].message.contains("never opens"), "{errors:?}");
    let errors = compile("[[schedule]]\nname = \"w\"\nhours = \"19:00-19:00\"\n").unwrap_err();
    assert_eq!(errors[0].path, "availability.schedule[0].hours");
}

#[test]
fn hours_accept_bare_hours_and_reject_signs() {
    let bare = policy("timezone = \"UTC\"\n[[schedule]]\nname = \"w\"\nhours = \"7-19\"\n");
    let full = policy("timezone = \"UTC\"\n[[schedule]]\nname = \"w\"\nhours = \"07:00-19:00\"\n");
    let from = ts("2026-12-01T00:00:00Z");
    let to = from + SignedDuration::from_hours(48);
    assert_eq!(bare.preview(from, to), full.preview(from, to));
    let errors = compile("[[schedule]]\nname = \"w\"\nhours = \"+7:00-08:00\"\n").unwrap_err();
    assert_eq!(errors[0].path, "availability.schedule[0].hours");
    assert!(errors[0].message.contains("+7:00"), "{errors:?}");
}

#[test]
fn a_dom_step_beside_a_weekday_warns_and_fires_on_either() {
    let p = policy(&cron_window("UTC", "0 9 */2 * mon", "0 10 * * *"));
    let warning = &p.warnings()[0];
    assert_eq!(warning.path, "availability.schedule[0].open");
    assert!(warning.message.contains("either"), "{warning:?}");
    // 2026-12-01 (odd day, Tuesday) opens; 2026-12-14 (even day, Monday) opens too;
    // 2026-12-02 (even, Wednesday) does not.
    let opened = |day: &str| {
        p.evaluate(ts(&format!("{day}T09:30:00Z")), &Inputs::default())
            .state
            .takes_builds()
    };
    assert!(opened("2026-12-01"));
    assert!(opened("2026-12-14"));
    assert!(!opened("2026-12-02"));
    // `+` asks for both, as crontab reads it: no warning, Mondays on odd days only.
    let both = policy(&cron_window("UTC", "0 9 */2 * +mon", "0 10 * * *"));
    assert!(both.warnings().is_empty());
    let opened = |day: &str| {
        both.evaluate(ts(&format!("{day}T09:30:00Z")), &Inputs::default())
            .state
            .takes_builds()
    };
    assert!(!opened("2026-12-01"));
    assert!(!opened("2026-12-14"));
    assert!(opened("2026-12-21"));
}

#[test]
fn until_is_when_the_state_changes_not_when_an_override_ends() {
    // Nights 19:00-07:00, default away. By hand away until 09:04: at 09:04
    // only the reason changes (away by hand → away by default), so the state
    // holds until the nights window opens at 19:00.
    let p =
        policy("timezone = \"UTC\"\n[[schedule]]\nname = \"nights\"\nhours = \"19:00-07:00\"\n");
    let now = ts("2026-12-01T09:03:00Z");
    let inputs = Inputs {
        manual: Some(ManualOverride {
            state: PresenceState::Away,
            reason: None,
            set_at: ts("2026-12-01T08:00:00Z"),
            until: Some(ts("2026-12-01T09:04:00Z")),
        }),
        ..Inputs::default()
    };
    let presence = p.evaluate(now, &inputs);
    assert_eq!(presence.state, PresenceState::Away);
    assert_eq!(presence.until, Some(ts("2026-12-01T19:00:00Z")));
    // The agent still wakes at 09:04 to re-evaluate.
    assert_eq!(
        p.next_change(now, &inputs),
        Some(ts("2026-12-01T09:04:00Z"))
    );
    // Available by hand until 09:04: then the state does change.
    let mut inputs = inputs;
    if let Some(manual) = inputs.manual.as_mut() {
        manual.state = PresenceState::Available;
    }
    assert_eq!(
        p.evaluate(now, &inputs).until,
        Some(ts("2026-12-01T09:04:00Z"))
    );
}

#[test]
fn a_whole_day_every_day_is_open_throughout() {
    let p = policy(
        "timezone = \"Europe/Berlin\"\ndefault = \"away\"\n[[schedule]]\nname = \"w\"\nhours = \"00:00-24:00\"\n",
    );
    let from = ts("2026-03-28T00:00:00Z");
    let preview = p.preview(from, from + SignedDuration::from_hours(72));
    assert_eq!(preview.intervals.len(), 1);
    assert_eq!(preview.intervals[0].state, PresenceState::Available);
    let presence = p.evaluate(from, &Inputs::default());
    assert_eq!(
        (presence.state, presence.until),
        (PresenceState::Available, None)
    );
}
