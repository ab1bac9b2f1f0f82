//! How an instant reads to people, the same in both binaries' CLIs and pages:
//! [`short_time`] relative to "now" in a time zone, [`zone_label`] naming
//! that zone, and [`short_duration`] for how long something took.

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A moment as people read it in `tz`, seen at `now`: `14:02` on the same
/// local day, `Sat 07:00` within six days either way, `Wed 1 Jul 12:00`
/// further off in the same year, and `Sun 23 Nov 2025 10:05` in another
/// year. It reads after "at", "until", "since" and "from" alike.
pub fn short_time(t: Timestamp, now: Timestamp, tz: &TimeZone) -> String {
    let (at, today) = (t.to_zoned(tz.clone()), now.to_zoned(tz.clone()));
    let clock = at.strftime("%H:%M").to_string();
    let days = (at.date() - today.date()).get_days();
    match days {
        0 => clock,
        -6..=6 => format!("{} {clock}", at.strftime("%a")),
        _ if at.year() == today.year() => at.strftime("%a %-d %b %H:%M").to_string(),
        _ => at.strftime("%a %-d %b %Y %H:%M").to_string(),
    }
}

/// The zone times are shown in, as a reader needs it: `Europe/Berlin (CET,
/// UTC+01:00)`, `UTC`, or `local time (…)` when the zone has no IANA name.
pub fn zone_label(tz: &TimeZone, now: Timestamp) -> String {
    let at = now.to_zoned(tz.clone());
    let offset = at.strftime("%:z").to_string();
    let abbreviation = at.strftime("%Z").to_string();
    let name = tz.iana_name().unwrap_or("local time");
    if matches!(name, "UTC" | "Etc/UTC") && offset == "+00:00" {
        return "UTC".to_owned();
    }
    if abbreviation.is_empty() || abbreviation.starts_with(['+', '-']) {
        format!("{name} (UTC{offset})")
    } else {
        format!("{name} ({abbreviation}, UTC{offset})")
    }
}

/// How long from `start` to `end`: `42s`, `3m05s`, `3h12m`, `2d03h`; a
/// negative span (clocks apart) reads `0s`.
pub fn short_duration(start: Timestamp, end: Timestamp) -> String {
    let secs = end.as_second().saturating_sub(start.as_second()).max(0);
    let (days, hours, minutes, seconds) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    /// Central Europe with its DST rule, no tz database needed.
    fn cet() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    #[test]
    fn a_time_reads_by_how_far_its_local_day_is_from_today() {
        let now = at("2026-11-23T13:30:00Z"); // Monday 14:30 CET
        let check = |t: &str, tz: &TimeZone, expect: &str| {
            assert_eq!(short_time(at(t), now, tz), expect, "{t}");
        };
        let (cet, utc) = (cet(), TimeZone::UTC);
        check("2026-11-23T13:02:59.123456789Z", &cet, "14:02");
        check("2026-11-22T22:59:59Z", &cet, "Sun 23:59"); // Sunday in CET...
        check("2026-11-22T23:00:00Z", &cet, "00:00"); // ...local midnight: today
        check("2026-11-22T23:10:00Z", &utc, "Sun 23:10"); // Sunday in UTC
        check("2026-11-23T23:30:00Z", &cet, "Tue 00:30"); // after local midnight
        check("2026-11-23T23:30:00Z", &utc, "23:30");
        check("2026-11-29T06:00:00Z", &cet, "Sun 07:00"); // six days ahead
        check("2026-11-17T06:00:00Z", &cet, "Tue 07:00"); // six days back
        check("2026-11-30T06:00:00Z", &cet, "Mon 30 Nov 07:00"); // a week ahead
        check("2026-07-01T10:00:00Z", &cet, "Wed 1 Jul 12:00"); // summer time
        check("2025-11-23T09:05:00Z", &cet, "Sun 23 Nov 2025 10:05"); // other year
        check("2027-01-04T18:00:00Z", &cet, "Mon 4 Jan 2027 19:00");
    }

    #[test]
    fn days_are_local_days_across_a_dst_change() {
        // Sunday 2026-03-29: CET → CEST at 02:00 local; that day has 23 hours.
        let now = at("2026-03-28T22:30:00Z"); // Saturday 23:30 CET
        let cet = cet();
        assert_eq!(
            short_time(at("2026-03-29T01:00:00Z"), now, &cet),
            "Sun 03:00"
        );
        assert_eq!(
            short_time(at("2026-03-29T22:30:00Z"), now, &cet),
            "Mon 00:30"
        );
    }

    #[test]
    fn the_time_zone_is_labelled() {
        let now = at("2026-11-23T10:30:00Z");
        assert_eq!(zone_label(&TimeZone::UTC, now), "UTC");
        assert_eq!(
            zone_label(&TimeZone::get("Europe/Berlin").unwrap(), now),
            "Europe/Berlin (CET, UTC+01:00)"
        );
        assert_eq!(
            zone_label(
                &TimeZone::get("Europe/Berlin").unwrap(),
                at("2026-07-01T10:00:00Z")
            ),
            "Europe/Berlin (CEST, UTC+02:00)"
        );
        assert_eq!(
            zone_label(&TimeZone::get("America/New_York").unwrap(), now),
            "America/New_York (EST, UTC-05:00)"
        );
        assert_eq!(zone_label(&cet(), now), "local time (CET, UTC+01:00)");
    }

    #[test]
    fn durations_read_short() {
        let start = at("2026-11-23T10:00:00Z");
        let check = |end: &str, expect: &str| {
            assert_eq!(short_duration(start, at(end)), expect, "{end}");
        };
        check("2026-11-23T10:00:00Z", "0s");
        check("2026-11-23T10:00:42.9Z", "42s");
        check("2026-11-23T10:01:00Z", "1m00s");
        check("2026-11-23T10:03:05Z", "3m05s");
        check("2026-11-23T11:02:00Z", "1h02m");
        check("2026-11-23T13:12:59Z", "3h12m");
        check("2026-11-24T09:59:59Z", "23h59m");
        check("2026-11-25T13:00:00Z", "2d03h");
        check("2026-11-23T09:00:00Z", "0s"); // end before start
    }
}
