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
    /// Validates a worker's availability config. `system_tz` applies when
    /// `timezone` is unset. Reports every problem at once.
    pub fn compile(
        cfg: &AvailabilityConfig,
        system_tz: TimeZone,
    ) -> Result<Policy, Vec<PolicyError>> {
        Policy::compile_with(cfg, system_tz, &CompileOptions::default())
    }

    /// Validates a master-side schedule for a worker: its presences carry
    /// [`Source::Master`]; `path` locates errors (e.g. `worker[2].availability`).
    pub fn compile_for_master(
        cfg: &AvailabilityConfig,
        system_tz: TimeZone,
        path: &str,
    ) -> Result<Policy, Vec<PolicyError>> {
        Policy::compile_with(
            cfg,
            system_tz,
            &CompileOptions {
                path: path.to_owned(),
                owner: PolicyOwner::Master,
                ..CompileOptions::default()
            },
        )
    }

    /// Validates with explicit options.
    pub fn compile_with(
        cfg: &AvailabilityConfig,
        system_tz: TimeZone,
        options: &CompileOptions,
    ) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let at = |key: &str, message: String| PolicyError {
            path: options.key_path(key),
            message,
        };

        let (tz, zone_name) = match &cfg.timezone {
            Some(name) => match TimeZone::get(name) {
                Ok(tz) => (tz, name.clone()),
                Err(_) => {
                    errors.push(at(
                        "timezone",
                        format!(
                            "unknown time zone \"{name}\", expected an IANA name such as \"Europe/Berlin\" or \"UTC\""
                        ),
                    ));
                    (TimeZone::UTC, name.clone())
                }
            },
            None => {
                let name = system_tz.iana_name().unwrap_or("local time").to_owned();
                (system_tz, name)
            }
        };

        if cfg.default == Some(PresenceState::Offline) {
            errors.push(at(
                "default",
                "`offline` means not connected and cannot be chosen; use `away` to take no builds"
                    .to_owned(),
            ));
        }

        let mut windows = Vec::new();
        for (index, entry) in cfg.schedule.iter().enumerate() {
            let key = |field: &str| format!("schedule[{index}].{field}");
            let mut entry_ok = true;
            let name = entry.name.trim();
            if name.is_empty() {
                errors.push(at(
                    &key("name"),
                    "a schedule needs a non-empty name".to_owned(),
                ));
                entry_ok = false;
            } else if name.chars().any(|c| c.is_control()) {
                errors.push(at(
                    &key("name"),
                    format!("schedule name {name:?} has control characters"),
                ));
                entry_ok = false;
            } else if cfg.schedule[..index]
                .iter()
                .any(|other| other.name.trim() == name)
            {
                errors.push(at(
                    &key("name"),
                    format!("schedule name \"{name}\" is used twice; names must be unique"),
                ));
                entry_ok = false;
            }
            if entry.state == PresenceState::Offline {
                errors.push(at(
                    &key("state"),
                    "`offline` means not connected and cannot be scheduled; use `away`".to_owned(),
                ));
                entry_ok = false;
            }
            let window = match (&entry.hours, &entry.open, &entry.close) {
                (Some(hours), None, None) => {
                    let hours = parse_hours(hours).map_err(|m| errors.push(at(&key("hours"), m)));
                    let days = match &entry.days {
                        Some(days) => {
                            DaySet::parse(days).map_err(|m| errors.push(at(&key("days"), m)))
                        }
                        None => Ok(DaySet::ALL),
                    };
                    match (hours, days) {
                        (Ok((open, close)), Ok(days)) => {
                            Window::from_hours(name.to_owned(), entry.state, open, close, days)
                                .map_err(|m| errors.push(at(&key("hours"), m)))
                                .ok()
                        }
                        _ => None,
                    }
                }
                (None, Some(open), Some(close)) => {
                    if entry.days.is_some() {
                        errors.push(at(
                            &key("days"),
                            "`days` goes with `hours`; with `open`/`close` put the days in the cron day-of-week field".to_owned(),
                        ));
                    }
                    for (field, text) in [("open", open), ("close", close)] {
                        if let Some(message) = crontab_reading_differs(text) {
                            warnings.push(at(&key(field), message));
                        }
                    }
                    let open_cron = parse_cron(open).map_err(|m| errors.push(at(&key("open"), m)));
                    let close_cron =
                        parse_cron(close).map_err(|m| errors.push(at(&key("close"), m)));
                    match (open_cron, close_cron) {
                        (Ok(open_cron), Ok(close_cron)) => {
                            let mut fires = true;
                            for (field, cron, text) in
                                [("open", &open_cron, open), ("close", &close_cron, close)]
                            {
                                if Window::never_fires(cron, &tz) {
                                    errors.push(at(
                                        &key(field),
                                        format!("cron expression \"{text}\" never fires"),
                                    ));
                                    fires = false;
                                }
                            }
                            let pair = fires.then(|| CronPair::new(open_cron, close_cron));
                            match pair {
                                Some(pair) if !pair.lone_open && !pair.lone_close => {
                                    errors.push(at(
                                        &key("close"),
                                        format!(
                                            "open = \"{open}\" and close = \"{close}\" fire at the same times, so the window never opens; make close fire when the window should end (for a window that is always open, set `default` instead)"
                                        ),
                                    ));
                                    None
                                }
                                Some(pair) => {
                                    if !pair.lone_open {
                                        warnings.push(at(
                                            &key("open"),
                                            format!(
                                                "every time open = \"{open}\" fires, close = \"{close}\" fires too, so this window never opens"
                                            ),
                                        ));
                                    }
                                    Some(Window::from_cron(
                                        name.to_owned(),
                                        entry.state,
                                        pair,
                                        open.clone(),
                                        close.clone(),
                                    ))
                                }
                                None => None,
                            }
                        }
                        _ => None,
                    }
                }
                (Some(_), _, _) => {
                    let extra = if entry.open.is_some() {
                        "open"
                    } else {
                        "close"
                    };
                    errors.push(at(
                        &key(extra),
                        "give either `hours` (with optional `days`) or `open` and `close`, not both".to_owned(),
                    ));
                    None
                }
                (None, Some(_), None) => {
                    errors.push(at(
                        &key("close"),
                        "`open` needs a `close` cron expression too, e.g. close = \"0 7 * * *\""
                            .to_owned(),
                    ));
                    None
                }
                (None, None, Some(_)) => {
                    errors.push(at(
                        &key("open"),
                        "`close` needs an `open` cron expression too, e.g. open = \"0 19 * * *\""
                            .to_owned(),
                    ));
                    None
                }
                (None, None, None) => {
                    errors.push(at(
                        &key("hours"),
                        "a schedule needs `hours` (e.g. \"19:00-07:00\") or `open` and `close` cron expressions".to_owned(),
                    ));
                    None
                }
            };
            if let Some(window) = window
                && entry_ok
            {
                windows.push(window);
            }
        }

        if let Some(load) = &cfg.load {
            validate_load(load, &mut |key, message| {
                errors.push(at(&format!("load.{key}"), message))
            });
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        let default_explicit = cfg.default.is_some();
        let default =
            cfg.default
                .unwrap_or(if cfg.schedule.iter().any(|s| s.state.takes_builds()) {
                    PresenceState::Away
                } else {
                    PresenceState::Available
                });
        Ok(Policy {
            tz,
            zone_name,
            default,
            default_explicit,
            windows,
            load: cfg.load.clone(),
            owner: options.owner,
            warnings,
        })
    }

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

    fn schedule_source(&self, name: &str) -> Source {
        match self.owner {
            PolicyOwner::Worker => Source::Schedule(name.to_owned()),
            PolicyOwner::Master => Source::Master,
        }
    }

    fn default_source(&self) -> Source {
        match self.owner {
            PolicyOwner::Worker => Source::Default,
            PolicyOwner::Master => Source::Master,
        }
    }

    fn zoned(&self, at: Timestamp) -> Zoned {
        at.to_zoned(self.tz.clone())
    }

    fn schedule_verdict(&self, now: &Zoned) -> ScheduleVerdict {
        let memberships: Vec<_> = self
            .windows
            .iter()
            .map(|w| (w, w.membership(now)))
            .collect();
        let deciding = memberships.iter().filter(|(_, m)| m.inside).fold(
            None::<&(&Window, crate::window::Membership)>,
            |best, item| match best {
                Some(best) if best.0.state >= item.0.state => Some(best),
                _ => Some(item),
            },
        );
        let prefix = match self.owner {
            PolicyOwner::Worker => "",
            PolicyOwner::Master => "master-side ",
        };
        match deciding {
            Some((window, membership)) => ScheduleVerdict {
                state: window.state,
                source: self.schedule_source(&window.name),
                reason: format!(
                    "inside {prefix}schedule {} ({} {})",
                    window.name,
                    window.short_when(),
                    self.zone_name
                ),
                since: membership.since,
            },
            None => {
                let reason = match memberships.as_slice() {
                    [] => format!("{prefix}default state (no schedule)"),
                    [(window, _)] => format!(
                        "outside {prefix}schedule {} ({} {})",
                        window.name,
                        window.short_when(),
                        self.zone_name
                    ),
                    _ => format!("outside every {prefix}schedule"),
                };
                ScheduleVerdict {
                    state: self.default,
                    source: self.default_source(),
                    reason,
                    since: memberships.iter().filter_map(|(_, m)| m.since).max(),
                }
            }
        }
    }

    /// The presence at `now`: stopping beats everything, an unexpired manual
    /// override beats the automatic sources, and among the automatic sources
    /// (master, load, schedules/default) the most restrictive wins (on a tie:
    /// master, then load, then the schedule). `until` is the instant the
    /// *state* next changes (an override that ends into the same state, or a
    /// window that hands over to another with the same state, is not one);
    /// the agent re-evaluates earlier, at [`Policy::next_change`];
    /// `since` is when the deciding condition began where known, else `now`
    /// (use [`PresenceTracker`] to keep `since` across evaluations).
    pub fn evaluate(&self, now: Timestamp, inputs: &Inputs) -> Presence {
        let mut presence = self.presence_at(now, inputs, false);
        presence.until = self.state_ends(now, inputs, presence.state);
        presence
    }

    /// The presence at `now` with `until` left unset: [`Policy::evaluate`]
    /// without its look-ahead through coming changes, for callers that only
    /// compare states and reasons (and re-evaluate at every change anyway).
    pub fn evaluate_without_until(&self, now: Timestamp, inputs: &Inputs) -> Presence {
        self.presence_at(now, inputs, false)
    }

    /// When the presence *state* next differs from `state` (not merely its
    /// reason or source): walks the coming changes, taking a pending load
    /// verdict as flipped once its deadline passes. `None` when no change is
    /// known within [`MAX_UNTIL_STEPS`] changes.
    fn state_ends(
        &self,
        now: Timestamp,
        inputs: &Inputs,
        state: PresenceState,
    ) -> Option<Timestamp> {
        // A source that holds without end at or above anything the schedules
        // can give keeps the state for good: nothing to walk.
        let schedules_at_most = self
            .windows
            .iter()
            .map(|w| w.state)
            .fold(self.default, PresenceState::max);
        let holds_for_good = |at: Timestamp| {
            let master = inputs
                .master
                .as_ref()
                .filter(|m| m.until.is_none() && m.is_active(at))
                .map(|m| m.state);
            let load = inputs
                .load
                .as_ref()
                .filter(|l| l.high && l.pending_change.is_none())
                .map(|l| l.state);
            master
                .into_iter()
                .chain(load)
                .max()
                .is_some_and(|floor| floor == state && floor >= schedules_at_most)
        };
        let mut at = now;
        for _ in 0..MAX_UNTIL_STEPS {
            let manual_decides = inputs.manual.as_ref().is_some_and(|m| m.is_active(at));
            if !manual_decides && holds_for_good(at) {
                return None;
            }
            let next = self.next_change(at, inputs)?;
            if self.presence_at(next, inputs, true).state != state {
                return Some(next);
            }
            at = next;
        }
        None
    }

    /// The presence at `now` without `until`. With `predict_load`, a load
    /// verdict whose `pending_change` is at or before `now` counts as flipped.
    fn presence_at(&self, now: Timestamp, inputs: &Inputs, predict_load: bool) -> Presence {
        let until = None;
        if inputs.stopping {
            return Presence {
                state: PresenceState::Away,
                reason: "finishing the current builds, then exiting".to_owned(),
                source: Source::Stopping,
                since: now,
                until: None,
            };
        }
        if let Some(manual) = inputs.manual.as_ref().filter(|m| m.is_active(now)) {
            let reason = match &manual.reason {
                Some(reason) if !reason.trim().is_empty() => format!("set by hand: {reason}"),
                _ => "set by hand".to_owned(),
            };
            return Presence {
                state: manual.state,
                reason,
                source: Source::Manual,
                since: manual.set_at.min(now),
                until,
            };
        }
        let schedule = self.schedule_verdict(&self.zoned(now));
        let mut best = Presence {
            state: schedule.state,
            reason: schedule.reason,
            source: schedule.source,
            since: schedule.since.unwrap_or(now).min(now),
            until,
        };
        let load_high = |load: &LoadVerdict| {
            let flipped = predict_load && load.pending_change.is_some_and(|t| t <= now);
            load.high != flipped
        };
        if let Some(load) = inputs.load.as_ref().filter(|l| load_high(l))
            && load.state >= best.state
        {
            best.state = load.state;
            best.reason = load.reason.clone();
            best.source = Source::Load;
            best.since = load.since.min(now);
        }
        if let Some(master) = inputs.master.as_ref().filter(|m| m.is_active(now))
            && master.state >= best.state
        {
            best.state = master.state;
            best.reason = master.reason.clone();
            best.source = Source::Master;
            best.since = now;
        }
        best
    }

    /// When a re-evaluation is due: the earliest instant after `now` at which
    /// the presence can change (a window boundary, a manual or master override
    /// ending, a load hysteresis deadline). `None`: nothing known will change it.
    pub fn next_change(&self, now: Timestamp, inputs: &Inputs) -> Option<Timestamp> {
        if inputs.stopping {
            return None;
        }
        let after = |t: Option<Timestamp>| t.filter(|t| *t > now);
        if let Some(manual) = inputs.manual.as_ref().filter(|m| m.is_active(now)) {
            return after(manual.until);
        }
        let mut next = self.next_schedule_change(&self.zoned(now));
        let mut consider = |t: Option<Timestamp>| {
            if let Some(t) = after(t) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(master) = inputs.master.as_ref().filter(|m| m.is_active(now)) {
            consider(master.until);
        }
        if let Some(load) = &inputs.load {
            consider(load.pending_change);
        }
        next
    }

    fn next_schedule_change(&self, now: &Zoned) -> Option<Timestamp> {
        self.windows
            .iter()
            .filter_map(|w| w.next_boundary(now, w.membership(now).inside))
            .min()
    }

    /// The intervals in `[from, to)` as the schedules and default alone give
    /// them: contiguous, in order, neighbours with equal state and source
    /// merged. A span with more than [`MAX_PREVIEW_CHANGES`] changes is cut
    /// there, and [`Preview::truncated_at`] says where.
    pub fn preview(&self, from: Timestamp, to: Timestamp) -> Preview {
        self.preview_limited(from, to, MAX_PREVIEW_CHANGES)
    }

    /// [`Policy::preview`] with a chosen limit on the changes followed.
    pub fn preview_limited(&self, from: Timestamp, to: Timestamp, max_changes: usize) -> Preview {
        let max_changes = max_changes.max(1);
        let mut intervals: Vec<Interval> = Vec::new();
        if from >= to {
            return Preview {
                intervals,
                truncated_at: None,
            };
        }
        // Each window's own changes in the span, merged into one timeline.
        let start = self.zoned(from);
        let mut inside: Vec<bool> = self
            .windows
            .iter()
            .map(|w| w.membership(&start).inside)
            .collect();
        let mut changes: Vec<(Timestamp, usize, bool)> = Vec::new();
        for (index, window) in self.windows.iter().enumerate() {
            changes.extend(
                window
                    .changes_between(&self.tz, from, to, inside[index], max_changes + 1)
                    .into_iter()
                    .map(|(at, open)| (at, index, open)),
            );
        }
        changes.sort_by_key(|(at, index, _)| (*at, *index));
        let mut at = from;
        let mut pending = changes.into_iter().peekable();
        let mut steps = 0;
        loop {
            while let Some((_, index, open)) = pending.next_if(|(t, _, _)| *t <= at) {
                inside[index] = open;
            }
            let (state, source) = self.verdict_of(&inside);
            let end = pending.peek().map_or(to, |(t, _, _)| *t);
            match intervals.last_mut() {
                Some(last) if last.state == state && last.source == source => last.to = end,
                _ => intervals.push(Interval {
                    from: at,
                    to: end,
                    state,
                    source,
                }),
            }
            if end >= to {
                break;
            }
            steps += 1;
            at = end;
            if steps >= max_changes {
                return Preview {
                    intervals,
                    truncated_at: Some(at),
                };
            }
        }
        Preview {
            intervals,
            truncated_at: None,
        }
    }

    /// The state and source the schedules give when `inside[i]` says which
    /// windows are open (the same choice as [`Policy::evaluate`] makes).
    fn verdict_of(&self, inside: &[bool]) -> (PresenceState, Source) {
        let mut best: Option<&Window> = None;
        for (window, _) in self.windows.iter().zip(inside).filter(|(_, open)| **open) {
            match best {
                Some(b) if b.state >= window.state => {}
                _ => best = Some(window),
            }
        }
        match best {
            Some(window) => (window.state, self.schedule_source(&window.name)),
            None => (self.default, self.default_source()),
        }
    }

    /// Whether a build of length `expected` started at `now` would end before
    /// the policies next take the worker away (load is taken as it is now).
    pub fn fits(&self, now: Timestamp, inputs: &Inputs, expected: SignedDuration) -> bool {
        if !self.presence_at(now, inputs, false).state.takes_builds() {
            return false;
        }
        let Ok(end) = now.checked_add(expected.max(SignedDuration::ZERO)) else {
            return false;
        };
        let mut at = now;
        for _ in 0..MAX_STEPS {
            let Some(next) = self.next_change(at, inputs) else {
                return true;
            };
            if next >= end {
                return true;
            }
            if !self.presence_at(next, inputs, true).state.takes_builds() {
                return false;
            }
            at = next;
        }
        false
    }

    /// When the schedules next make the worker take builds, from `now` (`now`
    /// itself if they do already), within `horizon`.
    pub fn next_available(&self, now: Timestamp, horizon: SignedDuration) -> Option<Timestamp> {
        let end = now.checked_add(horizon).ok()?;
        let mut from = now;
        loop {
            let preview = self.preview(from, end);
            if let Some(found) = preview.intervals.iter().find(|i| i.state.takes_builds()) {
                return Some(found.from);
            }
            from = preview.truncated_at?;
        }
    }
}

fn validate_load(load: &LoadConfig, report: &mut dyn FnMut(&str, String)) {
    if load.max_load1.is_none() && load.max_cpu_percent.is_none() {
        report(
            "max_load1",
            "the load section needs `max_load1` or `max_cpu_percent` (or both), e.g. max_load1 = 4.0".to_owned(),
        );
    }
    let checks = [
        ("max_load1", load.max_load1, 10_000.0),
        ("resume_load1", load.resume_load1, 10_000.0),
        ("max_cpu_percent", load.max_cpu_percent, 100.0),
        ("resume_cpu_percent", load.resume_cpu_percent, 100.0),
    ];
    for (key, value, max) in checks {
        if let Some(value) = value
            && !(value.is_finite() && (0.0..=max).contains(&value))
        {
            report(key, format!("{value} is out of range (0 to {max})"));
        }
    }
    for (resume_key, resume, max_key, max) in [
        (
            "resume_load1",
            load.resume_load1,
            "max_load1",
            load.max_load1,
        ),
        (
            "resume_cpu_percent",
            load.resume_cpu_percent,
            "max_cpu_percent",
            load.max_cpu_percent,
        ),
    ] {
        match (resume, max) {
            (Some(_), None) => report(resume_key, format!("`{resume_key}` needs `{max_key}`")),
            (Some(r), Some(m)) if r > m => report(
                resume_key,
                format!(
                    "{resume_key} = {r} is above {max_key} = {m}; the resume threshold must be at or below it"
                ),
            ),
            _ => {}
        }
    }
    if !matches!(load.state, PresenceState::Away | PresenceState::Reluctant) {
        report(
            "state",
            format!(
                "load can make the worker `away` or `reluctant`, not `{}`",
                load.state
            ),
        );
    }
    if load.sample_every.0 < SignedDuration::from_secs(1) {
        report(
            "sample_every",
            format!(
                "sample_every = \"{}\" is too short; use at least 1s",
                load.sample_every
            ),
        );
    }
}

fn describe_load(load: &LoadConfig) -> String {
    let mut over = Vec::new();
    let mut under = Vec::new();
    if let Some(max) = load.max_load1 {
        over.push(format!("1-minute load > {max}"));
        under.push(format!("load ≤ {}", load.resume_load1.unwrap_or(max)));
    }
    if let Some(max) = load.max_cpu_percent {
        over.push(format!("CPU > {max}%"));
        under.push(format!("CPU ≤ {}%", load.resume_cpu_percent.unwrap_or(max)));
    }
    let hold = format_duration(load.hold.0);
    format!(
        "load: {} when {} for {hold} (not counting own builds); back when {} for {hold}; sampled every {}",
        load.state,
        over.join(" or "),
        under.join(" and "),
        load.sample_every
    )
}

/// Keeps `since` across evaluations: a fresh presence with the same state and
/// source as the current one keeps the current `since`.
#[derive(Debug, Clone, Default)]
pub struct PresenceTracker {
    current: Option<Presence>,
}

/// What an update changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// Nothing visible changed.
    Unchanged,
    /// Same state and source; reason or until changed.
    Details,
    /// State or source changed (or the first presence).
    State,
}

impl PresenceTracker {
    pub fn new() -> PresenceTracker {
        PresenceTracker::default()
    }

    pub fn current(&self) -> Option<&Presence> {
        self.current.as_ref()
    }

    /// Takes a fresh evaluation and says what changed.
    pub fn update(&mut self, mut fresh: Presence) -> PresenceChange {
        let change = match &self.current {
            Some(current) if current.state == fresh.state && current.source == fresh.source => {
                fresh.since = current.since;
                if current.reason == fresh.reason && current.until == fresh.until {
                    PresenceChange::Unchanged
                } else {
                    PresenceChange::Details
                }
            }
            _ => PresenceChange::State,
        };
        self.current = Some(fresh);
        change
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
