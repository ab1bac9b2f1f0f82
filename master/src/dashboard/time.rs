//! Times and durations as the admin pages show them, in the master's local time zone.

use super::*;

/// A moment in full, for a tooltip: `2026-11-23 14:02:11 CET`.
pub fn full_time(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
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
