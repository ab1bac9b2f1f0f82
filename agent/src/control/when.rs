//! The times people type at the control plane: `--for 2h`, `--until 19:00`,
//! `until tomorrow`, full date-times — turned into instants in the policy's
//! time zone, and spans turned back into short human words (instants read
//! through `nightshift_proto::when`).

use jiff::civil::{DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};

/// Parses a duration such as `2h`, `30m`, `1h30m`, `90s`; must be positive.
pub fn parse_for(text: &str) -> Result<SignedDuration, String> {
    let duration = nightshift_policy::parse_duration(text)?;
    if duration <= SignedDuration::ZERO {
        return Err(format!("`{text}` is not a positive duration"));
    }
    Ok(duration)
}

/// Parses an end time, relative to `now` in `tz`:
/// - `HH:MM` (or `HH:MM:SS`): the next such time of day (today if still
///   ahead, else tomorrow);
/// - `tomorrow`: the start of the next day;
/// - `YYYY-MM-DDTHH:MM[:SS]` or with a space: that local date-time;
/// - an RFC 3339 instant with offset (`…Z`, `…+02:00`).
///
/// The result must lie after `now`.
pub fn parse_until(text: &str, now: Timestamp, tz: &TimeZone) -> Result<Timestamp, String> {
    let text = text.trim();
    let now_zoned = now.to_zoned(tz.clone());
    let at = if text.eq_ignore_ascii_case("tomorrow") {
        let tomorrow = now_zoned
            .date()
            .tomorrow()
            .map_err(|error| format!("`{text}`: {error}"))?;
        tomorrow
            .to_zoned(tz.clone())
            .map_err(|error| format!("`{text}`: {error}"))?
            .timestamp()
    } else if let Ok(instant) = text.parse::<Timestamp>() {
        instant
    } else if let Ok(civil) = text.replacen(' ', "T", 1).parse::<DateTime>() {
        civil
            .to_zoned(tz.clone())
            .map_err(|error| format!("`{text}`: {error}"))?
            .timestamp()
    } else if let Ok(time) = text.parse::<Time>() {
        next_time_of_day(&now_zoned, time).map_err(|error| format!("`{text}`: {error}"))?
    } else {
        return Err(format!(
            "`{text}` is not a time; try `19:00`, `tomorrow`, `2026-12-24T08:00` or an RFC 3339 instant"
        ));
    };
    if at <= now {
        return Err(format!(
            "`{text}` ({}) is not in the future",
            at.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M %Z")
        ));
    }
    Ok(at)
}

/// The next instant strictly after `now` whose local time of day is `time`
/// (a time inside a DST gap resolves to the instant after the gap).
fn next_time_of_day(now: &Zoned, time: Time) -> Result<Timestamp, jiff::Error> {
    let today = now
        .date()
        .to_datetime(time)
        .to_zoned(now.time_zone().clone())?;
    if today.timestamp() > now.timestamp() {
        return Ok(today.timestamp());
    }
    let tomorrow = now.date().tomorrow()?.to_datetime(time);
    Ok(tomorrow.to_zoned(now.time_zone().clone())?.timestamp())
}

/// A rounded span in words: `45 s`, `12 min`, `2 h 5 min`, `3 days 4 h`.
pub fn span_words(span: SignedDuration) -> String {
    let exact = span.as_secs().unsigned_abs();
    // Past a minute, round to the nearest minute: a 9 min 59 s deadline reads "10 min".
    let secs = if exact < 60 {
        exact
    } else {
        (exact + 30) / 60 * 60
    };
    let (days, hours, mins) = (secs / 86_400, (secs % 86_400) / 3600, (secs % 3600) / 60);
    if secs < 60 {
        format!("{secs} s")
    } else if secs < 3600 {
        format!("{mins} min")
    } else if days == 0 {
        if mins == 0 {
            format!("{hours} h")
        } else {
            format!("{hours} h {mins} min")
        }
    } else {
        let unit = if days == 1 { "day" } else { "days" };
        if hours == 0 {
            format!("{days} {unit}")
        } else {
            format!("{days} {unit} {hours} h")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(tz())
            .unwrap()
            .timestamp()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_for("2h").unwrap(), SignedDuration::from_hours(2));
        assert_eq!(parse_for("1h30m").unwrap(), SignedDuration::from_mins(90));
        assert!(parse_for("0m").is_err());
        assert!(parse_for("soon").unwrap_err().contains("`soon`"));
    }

    #[test]
    fn time_of_day_is_the_next_one() {
        let now = at("2026-11-23T12:00");
        assert_eq!(
            parse_until("19:00", now, &tz()).unwrap(),
            at("2026-11-23T19:00")
        );
        assert_eq!(
            parse_until("07:00", now, &tz()).unwrap(),
            at("2026-11-24T07:00")
        );
        assert_eq!(
            parse_until("12:00", now, &tz()).unwrap(),
            at("2026-11-24T12:00")
        );
        assert_eq!(
            parse_until("tomorrow", now, &tz()).unwrap(),
            at("2026-11-24T00:00")
        );
    }

    #[test]
    fn time_of_day_across_a_dst_change() {
        // Berlin springs forward on 2026-03-29 at 02:00 → 03:00.
        let now = at("2026-03-28T22:00");
        let until = parse_until("07:00", now, &tz()).unwrap();
        assert_eq!(until, at("2026-03-29T07:00"));
        assert_eq!(until.duration_since(now), SignedDuration::from_hours(8));
        // 02:30 does not exist that night: the instant after the gap.
        let gap = parse_until("02:30", now, &tz()).unwrap();
        assert_eq!(gap.to_zoned(tz()).time(), Time::constant(3, 30, 0, 0));
    }

    #[test]
    fn full_date_times_and_instants() {
        let now = at("2026-11-23T12:00");
        assert_eq!(
            parse_until("2026-12-24T08:00", now, &tz()).unwrap(),
            at("2026-12-24T08:00")
        );
        assert_eq!(
            parse_until("2026-12-24 08:00", now, &tz()).unwrap(),
            at("2026-12-24T08:00")
        );
        assert_eq!(
            parse_until("2026-11-23T18:00:00Z", now, &tz()).unwrap(),
            at("2026-11-23T19:00")
        );
        assert!(
            parse_until("2026-01-01T08:00", now, &tz())
                .unwrap_err()
                .contains("not in the future")
        );
        assert!(
            parse_until("teatime", now, &tz())
                .unwrap_err()
                .contains("`teatime`")
        );
        assert!(parse_until("25:00", now, &tz()).is_err());
    }

    #[test]
    fn words() {
        assert_eq!(span_words(SignedDuration::from_secs(42)), "42 s");
        assert_eq!(span_words(SignedDuration::from_mins(125)), "2 h 5 min");
        assert_eq!(span_words(SignedDuration::from_secs(599)), "10 min");
        assert_eq!(span_words(SignedDuration::from_secs(3599)), "1 h");
        assert_eq!(span_words(SignedDuration::from_hours(76)), "3 days 4 h");
    }
}
