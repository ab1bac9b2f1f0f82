//! The compiled policy: windows, default and load thresholds, combined with manual,
//! master and stopping inputs into a presence, its next change, a preview and admission.

use std::fmt;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};
use serde::{Deserialize, Serialize};

use crate::config::{AvailabilityConfig, LoadConfig};
use crate::duration::format_duration;
use crate::firing::CronPair;
use crate::load::{LoadMonitor, LoadVerdict};
use crate::state::{Presence, PresenceState, Source};
use crate::window::{DaySet, Window, crontab_reading_differs, parse_cron, parse_hours};

mod compile;
mod evaluate;
mod lookahead;
mod tracker;

use compile::*;
pub use tracker::*;

/// A problem in the availability config, located by its key path
/// (e.g. `availability.schedule[1].days`); the config loader turns the path
/// into file, line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

/// Whose policy this is: a worker's own (`worker.toml`), or the schedule the
/// master's admin gives a worker in `master.toml` (every presence it yields
/// carries [`Source::Master`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyOwner {
    #[default]
    Worker,
    Master,
}

/// How to compile: the key path of the section (for errors) and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// Key path of the availability section, e.g. `availability` or `worker[2].availability`.
    pub path: String,
    pub owner: PolicyOwner,
    /// Key path of the schedule array when it is not `{path}.schedule`
    /// (e.g. `worker[2].schedule` in a file that puts it there).
    pub schedule_path: Option<String>,
    /// Key path of the time zone when it is not `{path}.timezone`.
    pub timezone_path: Option<String>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            path: "availability".to_owned(),
            owner: PolicyOwner::Worker,
            schedule_path: None,
            timezone_path: None,
        }
    }
}

impl CompileOptions {
    /// The key path of `key` (relative to the availability section) for errors.
    fn key_path(&self, key: &str) -> String {
        let relocated = |prefix: &str, override_path: &Option<String>| {
            override_path
                .as_ref()
                .and_then(|path| key.strip_prefix(prefix).map(|rest| format!("{path}{rest}")))
        };
        if let Some(path) = relocated("schedule", &self.schedule_path) {
            return path;
        }
        if let Some(path) = relocated("timezone", &self.timezone_path) {
            return path;
        }
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

/// The owner's choice, set with `worker set-availability` or the local page.
/// The agent persists it so it survives a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualOverride {
    pub state: PresenceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub set_at: Timestamp,
    /// When it ends by itself (`--for` / `--until`); `None` = until `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

impl ManualOverride {
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// The master's side: an admin pause, or a master-side schedule's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterOverride {
    pub state: PresenceState,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

impl MasterOverride {
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|until| now < until)
    }

    /// The override a master-side schedule gives (a presence evaluated with a
    /// policy from [`Policy::compile_for_master`]): its state until it changes.
    pub fn from_presence(presence: &Presence) -> MasterOverride {
        MasterOverride {
            state: presence.state,
            reason: presence.reason.clone(),
            until: presence.until,
        }
    }
}

/// Everything besides the clock that the presence depends on. `Default` = nothing
/// set: schedules and default alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub manual: Option<ManualOverride>,
    pub master: Option<MasterOverride>,
    /// A graceful stop is in progress: `away` with source `stopping`, beats all.
    pub stopping: bool,
    /// The load monitor's latest verdict (`None`: no load policy or no sample yet).
    pub load: Option<LoadVerdict>,
}

/// A stretch of time with one state, as the schedules alone give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval {
    pub from: Timestamp,
    pub to: Timestamp,
    pub state: PresenceState,
    pub source: Source,
}

impl Interval {
    /// The interval's ends in `tz` (for display in the policy's zone).
    pub fn zoned(&self, tz: &TimeZone) -> (Zoned, Zoned) {
        (self.from.to_zoned(tz.clone()), self.to.to_zoned(tz.clone()))
    }
}

/// What [`Policy::preview`] answers: the intervals, and where they stop short
/// of the span asked for when it had too many changes to follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    pub intervals: Vec<Interval>,
    /// `Some(t)`: the span had more than [`MAX_PREVIEW_CHANGES`] changes; the
    /// intervals are exact and end at `t`, nothing after `t` was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated_at: Option<Timestamp>,
}

/// Validated, ready-to-evaluate availability policies.
#[derive(Debug, Clone)]
pub struct Policy {
    tz: TimeZone,
    zone_name: String,
    default: PresenceState,
    default_explicit: bool,
    windows: Vec<Window>,
    load: Option<LoadConfig>,
    owner: PolicyOwner,
    warnings: Vec<PolicyError>,
}

/// The verdict of the schedules and default alone at one instant.
struct ScheduleVerdict {
    state: PresenceState,
    source: Source,
    reason: String,
    since: Option<Timestamp>,
}

/// How many schedule changes [`Policy::preview`] follows before it stops and
/// says so (a year of a window that opens and closes every few minutes).
pub const MAX_PREVIEW_CHANGES: usize = 100_000;

/// How many coming changes [`Policy::evaluate`] looks through for the one
/// that changes the state (its `until`).
pub const MAX_UNTIL_STEPS: usize = 1_000;

/// How many changes [`Policy::fits`] follows before it answers "does not fit".
const MAX_STEPS: usize = 100_000;

impl Policy {
    /// What is valid but may not mean what its writer thinks (a cron day
    /// field read differently by Linux crontab, a window that never opens),
    /// located like errors. `worker check` and `master check` print them.
    pub fn warnings(&self) -> &[PolicyError] {
        &self.warnings
    }

    /// The zone the schedules are written in.
    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    /// The zone's name as the owner wrote it (or the system zone's name).
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    /// The state outside every window (configured or implied).
    pub fn default_state(&self) -> PresenceState {
        self.default
    }

    /// The load thresholds, if any.
    pub fn load_config(&self) -> Option<&LoadConfig> {
        self.load.as_ref()
    }

    /// A fresh monitor for the load thresholds, if any.
    pub fn load_monitor(&self) -> Option<LoadMonitor> {
        self.load.as_ref().map(LoadMonitor::new)
    }

    /// The names of the schedule windows, in config order.
    pub fn schedule_names(&self) -> Vec<&str> {
        self.windows.iter().map(|w| w.name.as_str()).collect()
    }

    /// One line per policy, e.g. `nights: available 19:00–07:00 Europe/Berlin, every day`.
    pub fn describe(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .windows
            .iter()
            .map(|w| {
                format!(
                    "{}: {} {}",
                    w.name,
                    w.state,
                    w.describe_when(&self.zone_name)
                )
            })
            .collect();
        let default_line = if self.windows.is_empty() {
            format!("default: {} at all times (no schedule)", self.default)
        } else if self.default_explicit {
            format!("default: {} outside the schedules", self.default)
        } else {
            format!(
                "default: {} outside the schedules (implied; set `default` to change)",
                self.default
            )
        };
        lines.push(default_line);
        if let Some(load) = &self.load {
            lines.push(describe_load(load));
        }
        lines
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} – {}: {} ({})",
            self.from, self.to, self.state, self.source
        )
    }
}
