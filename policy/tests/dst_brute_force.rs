//! Property test: around DST changes in several zones (Europe/Berlin,
//! America/New_York, Australia/Lord_Howe with its 30-minute shift, and
//! America/Santiago, southern hemisphere, changing at midnight), a cron window
//! with lists, ranges and steps gives exactly the intervals of a brute-force
//! evaluation that knows nothing of the engine: cron fields as plain sets, and
//! every civil minute the sets match fires at the first instant whose wall
//! clock shows that minute or later (the documented rule: a time in the
//! spring-forward gap fires at the gap's end, a time of the repeated hour
//! fires once, at its first occurrence), walked minute by minute.
//!
//! CI fixes the seed with `PROPTEST_RNG_SEED` (see `.ci/run`).

use std::collections::BTreeMap;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{AvailabilityConfig, Policy, PresenceState, ScheduleConfig};
use proptest::prelude::*;

const ZONES: [&str; 4] = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Santiago",
];

/// One cron field: its text and the values it means.
#[derive(Debug, Clone)]
struct Field {
    text: String,
    values: Vec<u8>,
}

fn field(text: String, values: impl IntoIterator<Item = u8>) -> Field {
    let mut values: Vec<u8> = values.into_iter().collect();
    values.sort_unstable();
    values.dedup();
    Field { text, values }
}

/// A minute field: single, list, range, step, range with step.
fn minutes() -> impl Strategy<Value = Field> {
    prop_oneof![
        (0u8..60).prop_map(|m| field(m.to_string(), [m])),
        (0u8..60, 0u8..60).prop_map(|(a, b)| field(format!("{a},{b}"), [a, b])),
        (0u8..60, 0u8..60).prop_map(|(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            field(format!("{a}-{b}"), a..=b)
        }),
        prop::sample::select(vec![5u8, 10, 15, 20, 30])
            .prop_map(|s| field(format!("*/{s}"), (0..60).step_by(s as usize))),
        (0u8..30, 30u8..60, prop::sample::select(vec![7u8, 10, 15]))
            .prop_map(|(a, b, s)| { field(format!("{a}-{b}/{s}"), (a..=b).step_by(s as usize)) }),
    ]
}

/// An hour field, mostly around the hours clocks change at (0-3) and noon.
fn hours() -> impl Strategy<Value = Field> {
    let near = || prop::sample::select(vec![0u8, 1, 2, 3, 12, 13, 22, 23]);
    prop_oneof![
        near().prop_map(|h| field(h.to_string(), [h])),
        (near(), near()).prop_map(|(a, b)| field(format!("{a},{b}"), [a, b])),
        (0u8..4, 0u8..4).prop_map(|(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            field(format!("{a}-{b}"), a..=b)
        }),
        prop::sample::select(vec![2u8, 3, 6])
            .prop_map(|s| field(format!("*/{s}"), (0..24).step_by(s as usize))),
        Just(field("0-4/2".to_owned(), [0, 2, 4])),
        Just(field("*".to_owned(), 0..24)),
    ]
}

/// A day-of-week field (0 = Sunday).
fn weekdays() -> impl Strategy<Value = Field> {
    prop_oneof![
        3 => Just(field("*".to_owned(), 0..7)),
        1 => (0u8..7, 0u8..7).prop_map(|(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            field(format!("{a}-{b}"), a..=b)
        }),
        1 => (0u8..7, 0u8..7).prop_map(|(a, b)| field(format!("{a},{b}"), [a, b])),
    ]
}

#[derive(Debug, Clone)]
struct Cron {
    minute: Field,
    hour: Field,
    weekday: Field,
}

impl Cron {
    fn text(&self) -> String {
        format!(
            "{} {} * * {}",
            self.minute.text, self.hour.text, self.weekday.text
        )
    }

    /// The independent matcher: plain set membership.
    fn matches(&self, civil: DateTime) -> bool {
        let weekday = civil.weekday().to_sunday_zero_offset() as u8;
        self.minute.values.contains(&(civil.minute() as u8))
            && self.hour.values.contains(&(civil.hour() as u8))
            && self.weekday.values.contains(&weekday)
    }
}

fn cron() -> impl Strategy<Value = Cron> {
    (minutes(), hours(), weekdays()).prop_map(|(minute, hour, weekday)| Cron {
        minute,
        hour,
        weekday,
    })
}

/// What the brute force says: the window's state at every change in
/// `[from, to)`, as (instant, open) with the state at `from` first.
fn brute_force(
    tz: &TimeZone,
    open: &Cron,
    close: &Cron,
    from: Timestamp,
    to: Timestamp,
) -> Vec<(Timestamp, bool)> {
    // Every crontab here fires at least weekly, so eight days of history
    // decide the state at `from`.
    let start = from - SignedDuration::from_hours(24 * 8);
    let minute = SignedDuration::from_mins(1);
    // Civil minutes that match, from a day before `start` to a day after `to`.
    let civil_of = |t: Timestamp| t.to_zoned(tz.clone()).datetime();
    let first_civil = civil_of(start - SignedDuration::from_hours(30));
    let last_civil = civil_of(to + SignedDuration::from_hours(30));
    let mut civil = first_civil
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()
        .expect("a civil minute");
    // fire[c] = the first minute instant whose wall clock shows c or later.
    let mut pending: Vec<(DateTime, bool, bool)> = Vec::new();
    while civil <= last_civil {
        let (o, c) = (open.matches(civil), close.matches(civil));
        if o || c {
            pending.push((civil, o, c));
        }
        civil = civil.checked_add(minute).expect("in range");
    }
    let mut events: BTreeMap<Timestamp, (bool, bool)> = BTreeMap::new();
    let mut next = 0;
    let mut t =
        Timestamp::from_second((start - SignedDuration::from_hours(30)).as_second() / 60 * 60)
            .expect("in range");
    let end = to + SignedDuration::from_hours(30);
    // Civil minutes before the first instant belong to no instant we look at.
    let wall = civil_of(t);
    while next < pending.len() && pending[next].0 < wall {
        next += 1;
    }
    while t <= end {
        let wall = civil_of(t);
        while next < pending.len() && pending[next].0 <= wall {
            let (_, o, c) = pending[next];
            let entry = events.entry(t).or_insert((false, false));
            entry.0 |= o;
            entry.1 |= c;
            next += 1;
        }
        t += minute;
    }
    let mut open_now = false;
    let mut out = Vec::new();
    for (at, (o, c)) in events {
        if at >= to {
            break;
        }
        if at > from && out.is_empty() {
            out.push((from, open_now));
        }
        // A tie keeps the state; a lone open opens, a lone close closes.
        if o != c && o != open_now {
            open_now = o;
            if at > from {
                out.push((at, o));
            }
        }
    }
    if out.is_empty() {
        out.push((from, open_now));
    }
    out
}

fn transition_near(tz: &TimeZone, which: usize) -> Timestamp {
    let start: Timestamp = "2026-01-01T00:00:00Z".parse().expect("instant");
    tz.following(start)
        .nth(which)
        .map(|t| t.timestamp())
        .expect("the zone changes its clocks in 2026")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cron_windows_match_a_brute_force_on_dst_nights(
        zone in 0usize..ZONES.len(),
        which in 0usize..2,
        before_minutes in 0i64..(36 * 60),
        open in cron(),
        close in cron(),
    ) {
        let tz = TimeZone::get(ZONES[zone]).expect("zone");
        let from = transition_near(&tz, which) - SignedDuration::from_mins(before_minutes);
        let to = from + SignedDuration::from_hours(48);
        let config = AvailabilityConfig {
            timezone: Some(ZONES[zone].to_owned()),
            default: Some(PresenceState::Away),
            schedule: vec![ScheduleConfig {
                name: "w".to_owned(),
                hours: None,
                days: None,
                open: Some(open.text()),
                close: Some(close.text()),
                state: PresenceState::Available,
            }],
            load: None,
        };
        let policy = match Policy::compile(&config, TimeZone::UTC) {
            Ok(policy) => policy,
            // Open and close that fire at the very same times are rejected.
            Err(errors) => {
                prop_assert!(
                    errors.iter().all(|e| e.message.contains("never opens")),
                    "{} / {}: {errors:?}", open.text(), close.text()
                );
                return Ok(());
            }
        };
        let expected = brute_force(&tz, &open, &close, from, to);
        let preview = policy.preview(from, to);
        prop_assert_eq!(preview.truncated_at, None);
        let got: Vec<(Timestamp, bool)> = preview
            .intervals
            .iter()
            .map(|i| (i.from, i.state == PresenceState::Available))
            .collect();
        prop_assert_eq!(
            &got, &expected,
            "{} to {} in {} from {}", open.text(), close.text(), ZONES[zone], from
        );
        // evaluate and next_change agree with it at and between the changes.
        for (index, (at, open_now)) in expected.iter().enumerate() {
            let presence = policy.evaluate(*at, &Default::default());
            prop_assert_eq!(presence.state == PresenceState::Available, *open_now, "at {}", at);
            let next = expected.get(index + 1).map(|(t, _)| *t);
            if let Some(next) = next {
                prop_assert_eq!(presence.until, Some(next), "until at {}", at);
                let just_before = next - SignedDuration::from_secs(1);
                let state = policy.evaluate(just_before, &Default::default()).state;
                prop_assert_eq!(state == PresenceState::Available, *open_now, "at {}", just_before);
            }
        }
    }
}
