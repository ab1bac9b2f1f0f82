//! Times and durations as the admin pages show them, in the master's local time zone.

use super::*;

/// A moment as an admin reads it in `tz`: `14:02` on the day of `now`,
/// `Tue 24 Nov 09:05` on another day of the same year, and
/// `Sun 23 Nov 2025 09:05` in another year.
pub fn short_time(t: Timestamp, now: Timestamp, tz: &TimeZone) -> String {
    let (at, today) = (t.to_zoned(tz.clone()), now.to_zoned(tz.clone()));
    let format = if at.date() == today.date() {
        "%H:%M"
    } else if at.year() == today.year() {
        "%a %-d %b %H:%M"
    } else {
        "%a %-d %b %Y %H:%M"
    };
    at.strftime(format).to_string()
}

/// A moment in full, for a tooltip: `2026-11-23 14:02:11 CET`.
pub fn full_time(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
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

/// A `<time>` element: the short local time, the full one as a tooltip.
pub fn time_html(t: Timestamp, now: Timestamp, tz: &TimeZone) -> String {
    let machine = Timestamp::from_second(t.as_second()).unwrap_or(t);
    format!(
        "<time datetime=\"{}\" title=\"{}\">{}</time>",
        escape(&machine.to_string()),
        escape(&full_time(t, tz)),
        escape(&short_time(t, now, tz)),
    )
}

/// A builder's estimated duration as people say it: `40 s`, `5 min`
/// (rounded up: an estimate is a promise not to take longer), `1 h 20 min`.
pub fn estimate_words(secs: u64) -> String {
    if secs < 60 {
        return format!("{} s", secs.max(1));
    }
    let minutes = secs.div_ceil(60);
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h} h"),
        (h, m) => format!("{h} h {m} min"),
    }
}
