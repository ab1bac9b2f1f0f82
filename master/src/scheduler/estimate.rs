//! How long a builder's builds take, as a worker's owner sees them: from
//! the hand-out (the master's clock) to the end the agent reports (its
//! clock) — the same span, on the same clocks, that admission compares with
//! the worker's availability (`now + estimate` against the agent's `until`),
//! so a skew between the two clocks cancels out. The estimate is an upper
//! bound, not a typical run: the longest of the builder's last successful
//! builds plus a margin scaled to their spread, so that a build slower than
//! every recent one still ends before a window it was admitted into closes.
//! Kept in memory per builder (seeded from the store at start, updated as
//! builds finish; O(1) per build).

use std::collections::{HashMap, VecDeque};

use jiff::SignedDuration;

/// Successful builds remembered per builder.
pub const WINDOW: usize = 20;
/// Fewer successful builds than this: the duration is unknown.
pub const MIN_SAMPLES: usize = 3;
/// The least margin added to the longest recent run: covers the hand-out
/// itself and a loaded machine's jitter for builds of a few seconds.
pub const MIN_MARGIN: SignedDuration = SignedDuration::from_secs(1);
/// The margin is at least this share of the longest run, in percent.
pub const MARGIN_PERCENT: i32 = 10;

/// One builder's recent durations and their bound.
#[derive(Debug, Default)]
struct History {
    recent: VecDeque<SignedDuration>,
    estimate: Option<SignedDuration>,
}

/// The duration estimates of every builder.
#[derive(Debug, Default)]
pub struct Estimates {
    builders: HashMap<String, History>,
}

impl Estimates {
    /// Remembers a successful build of `builder` that took `took` from its
    /// hand-out to its end (the oldest of a full window is forgotten).
    /// Costs O(WINDOW log WINDOW).
    pub fn record(&mut self, builder: &str, took: SignedDuration) {
        if took.is_negative() {
            return;
        }
        let history = match self.builders.get_mut(builder) {
            Some(history) => history,
            None => self.builders.entry(builder.to_owned()).or_default(),
        };
        if history.recent.len() == WINDOW {
            history.recent.pop_front();
        }
        history.recent.push_back(took);
        history.estimate = bound(&history.recent);
    }

    /// The estimated duration of a build of `builder`; `None` until it has
    /// [`MIN_SAMPLES`] successful builds.
    pub fn get(&self, builder: &str) -> Option<SignedDuration> {
        self.builders.get(builder)?.estimate
    }

    /// Every known estimate, for the API.
    pub fn all(&self) -> impl Iterator<Item = (&str, SignedDuration)> {
        self.builders
            .iter()
            .filter_map(|(name, h)| Some((name.as_str(), h.estimate?)))
    }
}

/// The longest of `samples` plus a margin: half the spread between their
/// median and the longest, at least [`MARGIN_PERCENT`] of the longest and
/// at least [`MIN_MARGIN`]. `None` below [`MIN_SAMPLES`].
pub fn bound(samples: &VecDeque<SignedDuration>) -> Option<SignedDuration> {
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    let mut sorted: Vec<SignedDuration> = samples.iter().copied().collect();
    sorted.sort_unstable();
    let longest = *sorted.last()?;
    let median = sorted[(sorted.len() - 1) / 2];
    let margin = ((longest - median) / 2)
        .max(longest / 100 * MARGIN_PERCENT)
        .max(MIN_MARGIN);
    Some(longest.saturating_add(margin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: i64) -> SignedDuration {
        SignedDuration::from_secs(s)
    }

    #[test]
    fn unknown_until_three_builds_then_the_longest_plus_a_margin() {
        let mut estimates = Estimates::default();
        estimates.record("b", secs(50));
        estimates.record("b", secs(40));
        assert_eq!(estimates.get("b"), None);
        estimates.record("b", secs(60));
        // Longest 60 s, median 50 s: half the spread is 5 s, a tenth of the
        // longest 6 s; the larger counts.
        assert_eq!(estimates.get("b"), Some(secs(66)));
        assert_eq!(estimates.get("other"), None);
        // Ten builds 10..=100 s: longest 100 s, median 50 s, margin 25 s.
        let mut ten = Estimates::default();
        for s in 1..=10 {
            ten.record("t", secs(10 * s));
        }
        assert_eq!(ten.get("t"), Some(secs(125)));
        // Negative durations (a clock jump) are ignored.
        ten.record("t", secs(-3));
        assert_eq!(ten.get("t"), Some(secs(125)));
    }

    #[test]
    fn short_builds_get_at_least_the_least_margin() {
        let mut estimates = Estimates::default();
        for ms in [200, 250, 300] {
            estimates.record("quick", SignedDuration::from_millis(ms));
        }
        assert_eq!(
            estimates.get("quick"),
            Some(SignedDuration::from_millis(300) + MIN_MARGIN)
        );
    }

    #[test]
    fn no_recent_build_is_longer_than_the_estimate() {
        // Durations with an outlier: the estimate bounds every one of them,
        // and the slowest by its margin.
        let mut estimates = Estimates::default();
        let runs = [61, 58, 63, 240, 60, 59, 62, 57, 64, 60];
        for s in runs {
            estimates.record("b", secs(s));
        }
        let estimate = estimates.get("b").unwrap();
        assert!(runs.iter().all(|s| secs(*s) < estimate), "{estimate}");
        // Median (the lower middle one) 60 s, longest 240 s: half the
        // spread, 90 s.
        assert_eq!(estimate, secs(330));
    }

    #[test]
    fn only_the_last_window_counts() {
        let mut estimates = Estimates::default();
        for _ in 0..WINDOW {
            estimates.record("b", secs(3600));
        }
        assert_eq!(estimates.get("b"), Some(secs(3960)));
        for _ in 0..WINDOW {
            estimates.record("b", secs(60));
        }
        assert_eq!(estimates.get("b"), Some(secs(66)));
        assert_eq!(estimates.all().collect::<Vec<_>>(), vec![("b", secs(66))]);
    }
}
