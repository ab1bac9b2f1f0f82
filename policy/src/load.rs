//! Foreign-load hysteresis: samples of load not caused by the worker's own builds in,
//! a verdict (and the instant it would next flip) out.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::config::LoadConfig;
use crate::duration::format_duration;
use crate::state::PresenceState;

/// One measurement of load that is **not** the worker's own: the agent must
/// subtract its builds before feeding the monitor, or a build would make its
/// own worker go away. [`ForeignLoadSample::from_totals`] does the subtraction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForeignLoadSample {
    pub at: Timestamp,
    /// 1-minute load average minus the worker's own runnable build tasks.
    pub load1: f64,
    /// CPU use (0–100, all cores) minus the worker's own builds' share.
    pub cpu_percent: f64,
}

impl ForeignLoadSample {
    /// Foreign load from system totals and the worker's own share, each
    /// difference clamped at 0. `own_running_tasks` is the number of the
    /// worker's build processes that are runnable (each adds about 1 to load1);
    /// `own_cpu_percent` is the builds' CPU use on the same 0–100 scale.
    pub fn from_totals(
        at: Timestamp,
        total_load1: f64,
        own_running_tasks: f64,
        total_cpu_percent: f64,
        own_cpu_percent: f64,
    ) -> ForeignLoadSample {
        ForeignLoadSample {
            at,
            load1: non_negative(total_load1 - own_running_tasks),
            cpu_percent: non_negative(total_cpu_percent - own_cpu_percent),
        }
    }
}

fn non_negative(value: f64) -> f64 {
    if value.is_finite() && value > 0.0 {
        value
    } else {
        0.0
    }
}

/// What the load thresholds say right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadVerdict {
    /// Whether foreign load holds the worker back now.
    pub high: bool,
    /// The state the load gives while `high` (configured, `away` by default).
    pub state: PresenceState,
    /// Human text, e.g. `foreign load 6.2 > 4.0 for 2m`.
    pub reason: String,
    /// When the current verdict began (when the condition had held for `for`).
    pub since: Timestamp,
    /// When the verdict flips if the latest sample's condition keeps holding.
    pub pending_change: Option<Timestamp>,
}

/// Applies hysteresis to foreign-load samples: a threshold must hold for
/// `for` before the verdict goes high, and the resume condition must hold for
/// `for` before it goes back.
#[derive(Debug, Clone)]
pub struct LoadMonitor {
    max_load1: Option<f64>,
    max_cpu_percent: Option<f64>,
    resume_load1: Option<f64>,
    resume_cpu_percent: Option<f64>,
    hold: SignedDuration,
    state: PresenceState,
    /// The settled verdict and when it began.
    high: bool,
    high_since: Option<Timestamp>,
    /// The condition of the latest decisive sample and when it began.
    condition: Option<(bool, Timestamp)>,
    last: Option<ForeignLoadSample>,
}

impl LoadMonitor {
    /// A monitor for these thresholds. Validation is [`crate::Policy::compile`]'s
    /// job; a resume threshold above its max is treated as the max.
    pub fn new(config: &LoadConfig) -> LoadMonitor {
        let resume = |resume: Option<f64>, max: Option<f64>| match (resume, max) {
            (Some(r), Some(m)) => Some(r.min(m)),
            (None, m) => m,
            (Some(_), None) => None,
        };
        LoadMonitor {
            max_load1: config.max_load1,
            max_cpu_percent: config.max_cpu_percent,
            resume_load1: resume(config.resume_load1, config.max_load1),
            resume_cpu_percent: resume(config.resume_cpu_percent, config.max_cpu_percent),
            hold: config.hold.0.max(SignedDuration::ZERO),
            state: config.state,
            high: false,
            high_since: None,
            condition: None,
            last: None,
        }
    }

    fn is_over(&self, sample: &ForeignLoadSample) -> bool {
        self.max_load1.is_some_and(|max| sample.load1 > max)
            || self
                .max_cpu_percent
                .is_some_and(|max| sample.cpu_percent > max)
    }

    fn is_under(&self, sample: &ForeignLoadSample) -> bool {
        self.resume_load1.is_none_or(|r| sample.load1 <= r)
            && self
                .resume_cpu_percent
                .is_none_or(|r| sample.cpu_percent <= r)
    }

    /// Feeds one foreign-load sample (in time order; older samples are
    /// ignored) and returns the verdict as of `sample.at`.
    pub fn observe(&mut self, sample: ForeignLoadSample) -> LoadVerdict {
        if self.last.is_some_and(|last| sample.at < last.at) {
            return self.verdict_at(sample.at);
        }
        // Between the resume and max thresholds the previous condition continues.
        let condition = if self.is_over(&sample) {
            Some(true)
        } else if self.is_under(&sample) {
            Some(false)
        } else {
            None
        };
        if let Some(over) = condition
            && self.condition.is_none_or(|(previous, _)| previous != over)
        {
            self.condition = Some((over, sample.at));
        }
        self.last = Some(sample);
        self.verdict_at(sample.at)
    }

    /// The verdict at `now`, settling a pending flip whose deadline has come
    /// (the latest sample's condition is taken to have held until `now`).
    pub fn verdict_at(&mut self, now: Timestamp) -> LoadVerdict {
        if let Some(deadline) = self.next_deadline()
            && deadline <= now
            && let Some((over, _)) = self.condition
        {
            self.high = over;
            self.high_since = Some(deadline);
        }
        self.verdict(now)
    }

    /// When the verdict flips if the latest condition keeps holding.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let (over, began) = self.condition?;
        if over == self.high {
            return None;
        }
        began.checked_add(self.hold).ok()
    }

    /// Whether load currently holds the worker back.
    pub fn is_high(&self) -> bool {
        self.high
    }

    fn verdict(&self, now: Timestamp) -> LoadVerdict {
        let reason = match (&self.last, self.high) {
            (None, _) => "no load sample yet".to_owned(),
            (Some(sample), true) => format!(
                "foreign load is high ({}) for {} or more",
                self.describe_sample(sample),
                format_duration(self.hold)
            ),
            (Some(sample), false) => {
                format!("foreign load is fine ({})", self.describe_sample(sample))
            }
        };
        LoadVerdict {
            high: self.high,
            state: self.state,
            reason,
            since: self.high_since.unwrap_or(now),
            pending_change: self.next_deadline(),
        }
    }

    fn describe_sample(&self, sample: &ForeignLoadSample) -> String {
        let mut parts = Vec::new();
        if let Some(max) = self.max_load1 {
            parts.push(format!("load {:.1}, max {max:.1}", sample.load1));
        }
        if let Some(max) = self.max_cpu_percent {
            parts.push(format!("CPU {:.0}%, max {max:.0}%", sample.cpu_percent));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::DurationSpec;

    fn monitor() -> LoadMonitor {
        LoadMonitor::new(&LoadConfig {
            max_load1: Some(4.0),
            resume_load1: Some(2.0),
            hold: DurationSpec::from_secs(120),
            ..LoadConfig::default()
        })
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn sample(secs: i64, load1: f64) -> ForeignLoadSample {
        ForeignLoadSample {
            at: at(secs),
            load1,
            cpu_percent: 0.0,
        }
    }

    #[test]
    fn from_totals_subtracts_own_and_clamps() {
        let s = ForeignLoadSample::from_totals(at(0), 3.0, 5.0, 90.0, 40.0);
        assert_eq!(s.load1, 0.0);
        assert_eq!(s.cpu_percent, 50.0);
        let s = ForeignLoadSample::from_totals(at(0), f64::NAN, 0.0, 10.0, 20.0);
        assert_eq!((s.load1, s.cpu_percent), (0.0, 0.0));
    }

    #[test]
    fn between_thresholds_keeps_the_condition() {
        let mut m = monitor();
        assert!(!m.observe(sample(0, 5.0)).high);
        // 3.0 is neither over 4.0 nor under 2.0: the over condition continues.
        assert!(!m.observe(sample(60, 3.0)).high);
        assert!(m.observe(sample(120, 3.0)).high);
        assert!(m.observe(sample(200, 3.0)).high);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn older_samples_are_ignored() {
        let mut m = monitor();
        m.observe(sample(100, 5.0));
        m.observe(sample(50, 0.0));
        assert_eq!(m.next_deadline(), Some(at(220)));
    }
}
