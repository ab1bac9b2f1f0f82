//! Standalone cron schedules (5 fields, as in schedule windows) for callers
//! outside the availability model, e.g. the master's timed builds: the next
//! firing instant after a given one, in a given time zone, with the same DST
//! rule as the windows (a time in the spring-forward gap fires at the first
//! instant after the gap; on the fall-back night a time fires once).

use croner::Cron;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::window::parse_cron;

/// A parsed 5-field cron expression (`minute hour day-of-month month
/// day-of-week`, or `@daily` and friends).
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    cron: Cron,
}

impl CronSchedule {
    /// Parses `expr`; the error names the field that is wrong.
    pub fn parse(expr: &str) -> Result<CronSchedule, String> {
        let cron = parse_cron(expr)?;
        Ok(CronSchedule {
            expr: expr.to_owned(),
            cron,
        })
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The first instant strictly after `after` at which the schedule fires
    /// in `tz`; `None` if it never fires again.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let mut probe = after.to_zoned(tz.clone());
        // On the fall-back night a wall-clock time occurs twice; the second
        // occurrence (same civil time, one offset later) is skipped.
        for _ in 0..4 {
            let next = self.cron.find_next_occurrence(&probe, false).ok()?;
            let earlier = next
                .timestamp()
                .checked_sub(jiff::SignedDuration::from_hours(1))
                .ok()
                .map(|t| t.to_zoned(tz.clone()));
            let repeat = earlier
                .is_some_and(|e| e.datetime() == next.datetime() && e.offset() != next.offset());
            if !repeat {
                return Some(next.timestamp());
            }
            probe = next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, tz: &TimeZone) -> Timestamp {
        text.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(tz.clone())
            .unwrap()
            .timestamp()
    }

    #[test]
    fn nightly_fires_at_local_time_across_midnight() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let nightly = CronSchedule::parse("0 2 * * *").unwrap();
        let from = at("2026-03-10T23:59:59", &berlin);
        assert_eq!(
            nightly.next_after(from, &berlin),
            Some(at("2026-03-11T02:00:00", &berlin))
        );
        // Exactly at the instant: the next one is tomorrow's.
        let fired = at("2026-03-11T02:00:00", &berlin);
        assert_eq!(
            nightly.next_after(fired, &berlin),
            Some(at("2026-03-12T02:00:00", &berlin))
        );
        let midnight = CronSchedule::parse("0 0 * * mon-fri").unwrap();
        // Friday 00:00 -> Monday 00:00.
        assert_eq!(
            midnight.next_after(at("2026-03-13T00:00:00", &berlin), &berlin),
            Some(at("2026-03-16T00:00:00", &berlin))
        );
    }

    #[test]
    fn spring_forward_gap_fires_right_after_the_gap() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let nightly = CronSchedule::parse("30 2 * * *").unwrap();
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let next = nightly
            .next_after(at("2026-03-29T01:00:00", &berlin), &berlin)
            .unwrap();
        assert_eq!(next.to_string(), "2026-03-29T01:00:00Z"); // 03:00 CEST
        let after = nightly.next_after(next, &berlin).unwrap();
        assert_eq!(after, at("2026-03-30T02:30:00", &berlin));
    }

    #[test]
    fn fall_back_night_fires_once() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let nightly = CronSchedule::parse("30 2 * * *").unwrap();
        // 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 occurs twice.
        let first = nightly
            .next_after(at("2026-10-25T00:00:00", &berlin), &berlin)
            .unwrap();
        assert_eq!(first.to_string(), "2026-10-25T00:30:00Z"); // 02:30 CEST
        let second = nightly.next_after(first, &berlin).unwrap();
        assert_eq!(second, at("2026-10-26T02:30:00", &berlin));
    }

    #[test]
    fn bad_expressions_name_the_field() {
        let err = CronSchedule::parse("0 25 * * *").unwrap_err();
        assert!(err.contains("hour"), "{err}");
        assert!(CronSchedule::parse("0 2 * *").unwrap_err().contains("5"));
    }
}
