//! When a window's cron pair really fires: every civil minute an expression
//! matches, mapped to one instant by a single DST rule, and the open/close
//! events merged so that a window's membership and next boundary are exact.
//!
//! The rule, the same for every expression (lists, ranges, steps alike):
//! - a civil time that exists once is that instant;
//! - a civil time in a spring-forward gap fires at the first instant after
//!   the gap (the transition itself);
//! - a civil time on the fall-back night fires once, at its first
//!   occurrence (the earlier offset); the repeated hour fires nothing.
//!
//! This mapping never goes backwards in time as the civil time goes forward,
//! so firings are found by walking civil days. Open and close firing at the
//! same instant are a *tie*: the window stays as it was just before (one window
//! ends as the next begins, or an empty window). Only lone opens and lone
//! closes change the window.

use croner::{Cron, Weekday};
use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use jiff::{Timestamp, ToSpan};

/// How far a walk goes: the Gregorian calendar repeats every 400 years, so a
/// civil pattern that does not occur within 401 years never occurs.
const WALK_DAYS: i64 = 401 * 366;

/// The civil side of a 5-field cron: which minutes and hours, and which days.
#[derive(Debug, Clone)]
pub(crate) struct CronTimes {
    cron: Cron,
    minutes: u64,
    hours: u32,
}

impl CronTimes {
    pub(crate) fn new(cron: Cron) -> CronTimes {
        let minutes = (0..60u32)
            .filter(|&m| cron.pattern.minute_match(m).unwrap_or(false))
            .fold(0u64, |bits, m| bits | 1 << m);
        let hours = (0..24u32)
            .filter(|&h| cron.pattern.hour_match(h).unwrap_or(false))
            .fold(0u32, |bits, h| bits | 1 << h);
        CronTimes {
            cron,
            minutes,
            hours,
        }
    }

    pub(crate) fn cron(&self) -> &Cron {
        &self.cron
    }

    /// Whether the expression fires on some minute of `date`.
    pub(crate) fn fires_on(&self, date: Date) -> bool {
        if self.minutes == 0 || self.hours == 0 {
            return false;
        }
        let month = date.month() as u32;
        let weekday = Weekday::from_days_from_sunday(date.weekday().to_sunday_zero_offset() as u32);
        self.cron.pattern.month_match(month).unwrap_or(false)
            && self
                .cron
                .pattern
                .day_match(i32::from(date.year()), month, date.day() as u32, weekday)
                .unwrap_or(false)
    }

    /// The civil times of day it fires at (on a day it fires), in order.
    fn times(&self) -> impl Iterator<Item = (i8, i8)> + '_ {
        (0..24i8)
            .filter(|&h| self.hours & (1 << h) != 0)
            .flat_map(move |h| {
                (0..60i8)
                    .filter(move |&m| self.minutes & (1 << m) != 0)
                    .map(move |m| (h, m))
            })
    }

    /// Whether every minute this fires at is also a minute `other` fires at.
    fn times_within(&self, other: &CronTimes) -> bool {
        self.minutes & !other.minutes == 0 && self.hours & !other.hours == 0
    }

    /// Whether this fires on the same civil minutes as `other` every day both fire.
    fn same_times(&self, other: &CronTimes) -> bool {
        self.minutes == other.minutes && self.hours == other.hours
    }

    /// Whether some day of the 400-year cycle has a firing of `self` that
    /// `other` does not share (a firing that `other` cannot tie).
    fn ever_fires_without(&self, other: &CronTimes) -> bool {
        if !self.times_within(other) {
            return (0..146_097).any(|n| self.fires_on(cycle_day(n)));
        }
        (0..146_097).any(|n| {
            let date = cycle_day(n);
            self.fires_on(date) && !other.fires_on(date)
        })
    }
}

fn cycle_day(n: i64) -> Date {
    jiff::civil::date(2000, 1, 1)
        .checked_add(n.days())
        .unwrap_or(jiff::civil::date(2000, 1, 1))
}

/// The instant a civil time fires at in `tz`, by the rule in the module docs.
pub(crate) fn firing_instant(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the later offset the time lies before the transition;
            // the transition that follows is the end of the gap.
            let probe = after.to_timestamp(dt).ok()?;
            tz.following(probe).next().map(|t| t.timestamp())
        }
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(dt).ok(),
    }
}

/// One instant at which a window's open and/or close fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Event {
    pub at: Timestamp,
    pub opens: bool,
    pub closes: bool,
}

impl Event {
    /// What the window is after this event, if the event changes it: a lone
    /// open opens, a lone close closes, a tie keeps it as it was.
    pub(crate) fn leaves_open(&self) -> Option<bool> {
        (self.opens != self.closes).then_some(self.opens)
    }
}

/// An open/close cron pair in a zone, with what can ever happen precomputed.
#[derive(Debug, Clone)]
pub(crate) struct CronPair {
    pub open: CronTimes,
    pub close: CronTimes,
    /// Some open fires without a close at the same civil minute.
    pub lone_open: bool,
    /// Some close fires without an open at the same civil minute.
    pub lone_close: bool,
}

/// Where an instant stands relative to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Membership {
    pub inside: bool,
    /// When the window last opened (inside) or closed (outside), if ever.
    pub since: Option<Timestamp>,
}

impl CronPair {
    pub(crate) fn new(open: Cron, close: Cron) -> CronPair {
        let open = CronTimes::new(open);
        let close = CronTimes::new(close);
        let lone_open = open.ever_fires_without(&close);
        let lone_close = close.ever_fires_without(&open);
        CronPair {
            open,
            close,
            lone_open,
            lone_close,
        }
    }

    /// The events of one civil day, in time order, equal instants merged.
    /// A day on which both fire at the very same minutes (and no offset
    /// change is near) has only ties and yields nothing.
    fn day_events(&self, tz: &TimeZone, date: Date, out: &mut Vec<Event>) {
        out.clear();
        let opens = self.open.fires_on(date);
        let closes = self.close.fires_on(date);
        if !opens && !closes {
            return;
        }
        let offset = steady_offset(tz, date);
        if opens && closes && self.open.same_times(&self.close) && offset.is_some() {
            return;
        }
        let instant = |h: i8, m: i8| {
            let dt = date.to_datetime(jiff::civil::time(h, m, 0, 0));
            match offset {
                Some(offset) => offset.to_timestamp(dt).ok(),
                None => firing_instant(tz, dt),
            }
        };
        let mut push = |at: Option<Timestamp>, opens: bool| {
            let Some(at) = at else { return };
            out.push(Event {
                at,
                opens,
                closes: !opens,
            });
        };
        if opens {
            for (h, m) in self.open.times() {
                push(instant(h, m), true);
            }
        }
        if closes {
            for (h, m) in self.close.times() {
                push(instant(h, m), false);
            }
        }
        out.sort_by_key(|e| e.at);
        out.dedup_by(|later, earlier| {
            if later.at == earlier.at {
                earlier.opens |= later.opens;
                earlier.closes |= later.closes;
                true
            } else {
                false
            }
        });
    }

    /// Visits events in time order (`forward`) or reverse, starting on civil
    /// day `start`, until `visit` returns true. Equal instants from
    /// neighbouring days are merged before they are visited.
    fn walk(
        &self,
        tz: &TimeZone,
        start: Date,
        forward: bool,
        mut visit: impl FnMut(Event) -> bool,
    ) -> bool {
        let mut day_buffer = Vec::new();
        let mut pending: Option<Event> = None;
        let mut date = start;
        for _ in 0..WALK_DAYS {
            self.day_events(tz, date, &mut day_buffer);
            let events: Box<dyn Iterator<Item = &Event>> = if forward {
                Box::new(day_buffer.iter())
            } else {
                Box::new(day_buffer.iter().rev())
            };
            for event in events {
                match pending.as_mut() {
                    Some(p) if p.at == event.at => {
                        p.opens |= event.opens;
                        p.closes |= event.closes;
                    }
                    _ => {
                        if let Some(p) = pending.replace(*event)
                            && visit(p)
                        {
                            return true;
                        }
                    }
                }
            }
            let next = if forward {
                date.tomorrow()
            } else {
                date.yesterday()
            };
            match next {
                Ok(next) => date = next,
                Err(_) => break,
            }
        }
        pending.is_some_and(visit)
    }

    /// Whether the window is open at `at` (events at `at` included).
    pub(crate) fn membership(&self, tz: &TimeZone, at: Timestamp) -> Membership {
        let outside = Membership {
            inside: false,
            since: None,
        };
        if !self.lone_open && !self.lone_close {
            return outside;
        }
        let start = at
            .to_zoned(tz.clone())
            .date()
            .tomorrow()
            .unwrap_or(Date::MAX);
        let mut found = outside;
        self.walk(tz, start, false, |event| {
            if event.at > at {
                return false;
            }
            match event.leaves_open() {
                Some(inside) => {
                    found = Membership {
                        inside,
                        since: Some(event.at),
                    };
                    true
                }
                None => false,
            }
        });
        found
    }

    /// The first instant strictly after `at` where the window closes (if
    /// `inside`) or opens (if not). Ties and repeated opens/closes are no change.
    pub(crate) fn next_boundary(
        &self,
        tz: &TimeZone,
        at: Timestamp,
        inside: bool,
    ) -> Option<Timestamp> {
        if (inside && !self.lone_close) || (!inside && !self.lone_open) {
            return None;
        }
        let start = at
            .to_zoned(tz.clone())
            .date()
            .yesterday()
            .unwrap_or(Date::MIN);
        let mut found = None;
        self.walk(tz, start, true, |event| {
            if event.at <= at {
                return false;
            }
            if event.leaves_open() == Some(!inside) {
                found = Some(event.at);
                return true;
            }
            false
        });
        found
    }
}

impl CronPair {
    /// The instants in `(from, to)` where the window changes, with what it
    /// is after each, given whether it is `inside` at `from`; at most `limit`.
    pub(crate) fn changes_between(
        &self,
        tz: &TimeZone,
        from: Timestamp,
        to: Timestamp,
        mut inside: bool,
        limit: usize,
    ) -> Vec<(Timestamp, bool)> {
        let mut changes = Vec::new();
        if !self.lone_open && !self.lone_close {
            return changes;
        }
        let start = from
            .to_zoned(tz.clone())
            .date()
            .yesterday()
            .unwrap_or(Date::MIN);
        self.walk(tz, start, true, |event| {
            if event.at <= from {
                return false;
            }
            if event.at >= to || changes.len() >= limit {
                return true;
            }
            if let Some(open) = event.leaves_open()
                && open != inside
            {
                inside = open;
                changes.push((event.at, open));
            }
            false
        });
        changes
    }
}

/// The zone's offset throughout `date` and the days around it, when it does
/// not change there (the fast path: civil time minus one offset).
fn steady_offset(tz: &TimeZone, date: Date) -> Option<Offset> {
    let around = |days: i64| {
        date.checked_add(days.days())
            .ok()?
            .to_datetime(jiff::civil::Time::midnight())
            .to_zoned(TimeZone::UTC)
            .ok()
            .map(|z| z.timestamp())
    };
    let from = around(-2)?;
    let to = around(3)?;
    match tz.following(from).next() {
        Some(transition) if transition.timestamp() <= to => None,
        _ => Some(tz.to_offset(from)),
    }
}
