//! Window-aware admission: whether a build, by its builder's estimated
//! duration, fits in what is left of a worker's availability (plus the
//! owner's `overrun` grace), and the words for a build that waits for a
//! window. Pure: `now`, the estimate and the zone are inputs.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{PresenceState, format_duration};
use nightshift_proto::when::short_time;
use nightshift_proto::wire::Window;

use crate::config::Admission;

/// What admission needs to know about the build.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BuildFacts {
    pub now: Timestamp,
    /// The builder's estimated duration; `None`: unknown, every worker fits.
    pub estimate: Option<SignedDuration>,
    /// What to do when no worker fits at all.
    pub admission: Admission,
    /// The zone the wait reasons are written in (the master's).
    pub zone: TimeZone,
}

impl BuildFacts {
    /// Facts with no estimate: admission never says no.
    #[cfg(test)]
    pub fn unknown(now: Timestamp) -> BuildFacts {
        BuildFacts {
            now,
            estimate: None,
            admission: Admission::Fit,
            zone: TimeZone::UTC,
        }
    }

    /// Whether the build, started at `from`, ends by `until` plus `overrun`
    /// (`until == None`: nothing known ends the availability).
    pub fn fits(&self, from: Timestamp, until: Option<Timestamp>, overrun: SignedDuration) -> bool {
        let (Some(estimate), Some(until)) = (self.estimate, until) else {
            return true;
        };
        match (from.checked_add(estimate), until.checked_add(overrun)) {
            (Ok(end), Ok(limit)) => end <= limit,
            _ => false,
        }
    }

    /// The presence a worker that takes builds now competes with for this
    /// build: an `available` one whose run, by the estimate, would go past
    /// the instant it turns `reluctant` (plus the owner's overrun) ranks as
    /// `reluctant` — the owner lends that time only when nobody else can
    /// take the build. Unknown estimate: it ranks as it is.
    pub fn ranks_as(
        &self,
        state: PresenceState,
        reluctant_from: Option<Timestamp>,
        overrun: SignedDuration,
    ) -> PresenceState {
        if state == PresenceState::Available && !self.fits(self.now, reluctant_from, overrun) {
            PresenceState::Reluctant
        } else {
            state
        }
    }

    /// When a worker that cannot take the build now could start it in a
    /// window that fits: `window`'s start (or now, when it started already).
    pub fn fitting_start(
        &self,
        window: Option<Window>,
        overrun: SignedDuration,
    ) -> Option<Timestamp> {
        self.estimate?;
        let window = window?;
        let from = window.from.max(self.now);
        self.fits(from, window.until, overrun).then_some(from)
    }

    /// `1h20m` (or `an unknown time`), to the second: an estimate is no
    /// more precise than that.
    pub fn estimate_text(&self) -> String {
        self.estimate.map_or_else(
            || "an unknown time".to_owned(),
            |estimate| format_duration(jiff::SignedDuration::from_secs(estimate.as_secs().max(1))),
        )
    }

    /// The instant as [`short_time`] reads it, in the zone.
    pub fn when(&self, at: Timestamp) -> String {
        short_time(at, self.now, &self.zone)
    }
}

/// The earlier of two instants, `None` being "never" (the agent's outlook
/// and the master-side schedule each limit a worker's availability).
pub(super) fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The best worker that could take the build now but whose availability
/// would cut it: its name and when its availability ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CutShort<'a> {
    pub name: &'a str,
    pub until: Timestamp,
}

/// The earliest chance to run the build in a window that fits, on a worker
/// that cannot take it now (busy, or not in a window yet).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct LaterFit<'a> {
    pub name: &'a str,
    /// `None`: as soon as it has room (it is busy now, and fits).
    pub opens: Option<Timestamp>,
}

/// The decision when no worker can take the build now in a window that
/// fits, but `cut` could take it: start it on `cut` (`Ok`) only when no
/// later chance fits at all and the builder says `best-effort`; otherwise
/// the words for what the build waits for.
pub(super) fn when_none_fits<'a>(
    build: &BuildFacts,
    cut: CutShort<'a>,
    later: Option<LaterFit<'a>>,
) -> Result<&'a str, String> {
    let estimate = build.estimate_text();
    match later {
        Some(LaterFit { name, opens: None }) => Err(format!(
            "a window that fits {estimate}: {} ends at {}; {name} fits once it has room",
            cut.name,
            build.when(cut.until)
        )),
        Some(LaterFit {
            name,
            opens: Some(opens),
        }) => Err(format!(
            "a window that fits {estimate}: {} ends at {}; {name} opens at {}",
            cut.name,
            build.when(cut.until),
            build.when(opens)
        )),
        None => match build.admission {
            Admission::BestEffort => Ok(cut.name),
            Admission::Fit => Err(format!(
                "no window fits {estimate} before {} ({} ends then; admission = \"fit\")",
                build.when(cut.until),
                cut.name
            )),
        },
    }
}

/// The earlier of two later chances (a busy worker that fits beats any
/// window that opens later).
pub(super) fn earlier<'a>(a: Option<LaterFit<'a>>, b: LaterFit<'a>) -> LaterFit<'a> {
    match a {
        // `None` (as soon as it has room) orders before any instant.
        Some(a) if a.opens <= b.opens => a,
        _ => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PresenceState::{Available, Away, Reluctant};

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    #[test]
    fn the_earliest_limit_wins_and_none_is_never() {
        let (six, seven) = (at("2026-12-01T06:00:00Z"), at("2026-12-01T07:00:00Z"));
        assert_eq!(earliest(Some(seven), Some(six)), Some(six));
        assert_eq!(earliest(None, Some(seven)), Some(seven));
        assert_eq!(earliest(Some(six), None), Some(six));
        assert_eq!(earliest(None, None), None);
    }

    #[test]
    fn a_run_into_reluctant_time_ranks_as_reluctant() {
        let now = at("2026-12-01T06:00:00Z");
        let build = |mins: Option<i64>| BuildFacts {
            estimate: mins.map(SignedDuration::from_mins),
            ..BuildFacts::unknown(now)
        };
        let seven = Some(at("2026-12-01T07:00:00Z"));
        let mins = SignedDuration::from_mins;
        // (estimate, state now, turns reluctant at, overrun, ranks as)
        let cases = [
            (Some(60), Available, seven, mins(0), Available),
            (Some(61), Available, seven, mins(0), Reluctant),
            (Some(61), Available, seven, mins(1), Available),
            (Some(600), Available, None, mins(0), Available),
            (None, Available, seven, mins(0), Available),
            (Some(1), Available, Some(now), mins(0), Reluctant),
            (Some(600), Reluctant, None, mins(0), Reluctant),
            (Some(600), Away, seven, mins(0), Away),
        ];
        for (estimate, state, reluctant_from, overrun, expect) in cases {
            assert_eq!(
                build(estimate).ranks_as(state, reluctant_from, overrun),
                expect,
                "estimate {estimate:?} min, {state}, reluctant from {reluctant_from:?}, overrun {overrun}"
            );
        }
    }
}
