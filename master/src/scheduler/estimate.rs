//! How long a builder's builds take: a high percentile of its last
//! successful builds' durations, kept in memory per builder (seeded from the
//! store at start, updated as builds finish; O(1) per build).

use std::collections::{HashMap, VecDeque};

use jiff::SignedDuration;

/// Successful builds remembered per builder.
pub const WINDOW: usize = 20;
/// Fewer successful builds than this: the duration is unknown.
pub const MIN_SAMPLES: usize = 3;
/// The percentile taken (a build this long or shorter in 9 of 10 runs).
pub const PERCENTILE: usize = 90;

/// One builder's recent durations and their percentile.
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
    /// Remembers a successful build of `builder` that took `took` (the
    /// oldest of a full window is forgotten). Costs O(WINDOW log WINDOW).
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
        history.estimate = percentile(&history.recent);
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

/// The [`PERCENTILE`]th percentile (nearest rank) of `samples`.
fn percentile(samples: &VecDeque<SignedDuration>) -> Option<SignedDuration> {
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    let mut sorted: Vec<SignedDuration> = samples.iter().copied().collect();
    sorted.sort_unstable();
    let rank = (PERCENTILE * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: i64) -> SignedDuration {
        SignedDuration::from_secs(s)
    }

    #[test]
    fn unknown_until_three_builds_then_the_ninetieth_percentile() {
        let mut estimates = Estimates::default();
        estimates.record("b", secs(5));
        estimates.record("b", secs(4));
        assert_eq!(estimates.get("b"), None);
        estimates.record("b", secs(6));
        // Nearest rank of 90 % of 3 is the 3rd: the longest.
        assert_eq!(estimates.get("b"), Some(secs(6)));
        assert_eq!(estimates.get("other"), None);
        // Ten builds 1..=10 s: the 9th.
        let mut ten = Estimates::default();
        for s in 1..=10 {
            ten.record("t", secs(s));
        }
        assert_eq!(ten.get("t"), Some(secs(9)));
        // Negative durations (a clock jump) are ignored.
        ten.record("t", secs(-3));
        assert_eq!(ten.get("t"), Some(secs(9)));
    }

    #[test]
    fn only_the_last_window_counts() {
        let mut estimates = Estimates::default();
        for _ in 0..WINDOW {
            estimates.record("b", secs(3600));
        }
        assert_eq!(estimates.get("b"), Some(secs(3600)));
        for _ in 0..WINDOW {
            estimates.record("b", secs(60));
        }
        assert_eq!(estimates.get("b"), Some(secs(60)));
        assert_eq!(estimates.all().collect::<Vec<_>>(), vec![("b", secs(60))]);
    }
}
