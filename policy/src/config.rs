//! The `[availability]` section as written in `worker.toml` (and a worker's schedule in `master.toml`).

use serde::{Deserialize, Serialize};

use crate::duration::DurationSpec;
use crate::state::PresenceState;

/// The owner's availability policies, as written. Compile with
/// [`crate::Policy::compile`] to validate and evaluate them.
///
/// When `default` is unset, the worker is `away` outside its windows if any
/// window makes it `available` or `reluctant` (a volunteer who writes "nights"
/// means "not by day"), and `available` otherwise (windows that only make it
/// `away` carve time out of an otherwise available machine).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityConfig {
    /// IANA time zone of the schedules, e.g. `Europe/Berlin`; default: the system zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The state outside every window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<PresenceState>,
    /// Named time windows (`[[availability.schedule]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleConfig>,
    /// Load thresholds (`[availability.load]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadConfig>,
    /// How far past the end of its availability the owner lets a build run
    /// (`overrun = "15m"`); the master starts no build whose estimate would
    /// end later. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrun: Option<DurationSpec>,
}

/// One named window: either `hours` (+ optional `days`) or `open` + `close` cron.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    /// `"19:00-07:00"`; a window that crosses midnight belongs to the day it opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<String>,
    /// `"mon-fri"`, `"sat,sun"`: the days the window opens; default every day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<String>,
    /// 5-field cron: when the window opens, e.g. `"0 19 * * *"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<String>,
    /// 5-field cron: when the window closes, e.g. `"0 7 * * *"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close: Option<String>,
    /// The state inside the window (`available`, `reluctant` or `away`).
    #[serde(default = "available")]
    pub state: PresenceState,
}

fn available() -> PresenceState {
    PresenceState::Available
}

/// Thresholds on foreign load (load and CPU use not caused by the worker's own builds).
///
/// The worker goes `state` (default `away`) once `load1 > max_load1` or
/// `cpu_percent > max_cpu_percent` has held for `for`; it comes back once
/// `load1 <= resume_load1` and `cpu_percent <= resume_cpu_percent` have held
/// for `for`. The resume thresholds default to the max thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_load1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_load1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_cpu_percent: Option<f64>,
    /// How long a condition must hold before the state changes, both ways.
    #[serde(rename = "for", default = "default_hold")]
    pub hold: DurationSpec,
    /// The state while the load is high: `away` (default) or `reluctant`.
    #[serde(default = "away")]
    pub state: PresenceState,
    /// How often the agent samples the load.
    #[serde(default = "default_sample_every")]
    pub sample_every: DurationSpec,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            max_load1: None,
            max_cpu_percent: None,
            resume_load1: None,
            resume_cpu_percent: None,
            hold: default_hold(),
            state: away(),
            sample_every: default_sample_every(),
        }
    }
}

fn default_hold() -> DurationSpec {
    DurationSpec::from_secs(120)
}

fn default_sample_every() -> DurationSpec {
    DurationSpec::from_secs(5)
}

fn away() -> PresenceState {
    PresenceState::Away
}
