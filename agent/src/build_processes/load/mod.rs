//! Foreign load: the machine's 1-minute load average and CPU use minus what
//! the agent's own builds cause, so a build never makes its own worker go
//! away.
//!
//! Builds are accounted per build. Each build runs in its own cgroup v2
//! under the agent's cgroup when that cgroup is delegated to the agent
//! (systemd `Delegate=yes`: writable, on a cgroup2 mount; see
//! [`super::build_cgroup`]); its `cpu.stat` `usage_usec` then counts every
//! process the build ever ran, including short-lived ones. Without cgroups
//! [`super::build_tree`] finds every process a build started (its step's
//! group, parent links, the build marker in the environment) and sums their
//! `utime+stime+cutime+cstime`, plus the agent's own `cutime+cstime`, which
//! grows by the whole tree's time when the agent reaps a finished step.
//!
//! The load average cannot be split by process; the sampler keeps its own
//! exponentially-decayed average of the builds' runnable tasks with the
//! kernel's 1-minute time constant and subtracts it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use nightshift_proto::wire::BuildId;
use nix::sys::signal::Signal;

use super::build_cgroup::{
    CgroupHost, CgroupSweeper, cgroup_usage_usec, signal_cgroup, sweep_stale,
};
use super::build_tree::{
    BUILD_MARKER, ProcessTracker, TrackedBuild, all_processes, environ_value, read_stat,
};
use super::priority::{BuildIsolation, BuildSettings, CgroupUse, ChildPriority};

/// Where builds' process trees live, so their CPU can be told apart, and how
/// builds are made to yield to the owner.
#[derive(Debug)]
pub struct BuildTrees {
    /// The agent's delegated cgroup, when builds get cgroups.
    cgroups: Option<CgroupHost>,
    /// `[builds]` as configured.
    settings: BuildSettings,
    /// `settings.memory_high` in bytes.
    memory_high: Option<u64>,
    /// `state_dir/running`: one file per running build holding its step's
    /// process group and its cgroup, so a restarted agent can kill what a
    /// crashed one left.
    records: Option<PathBuf>,
    inner: Mutex<TreesInner>,
    /// Removes ended builds' cgroups once their processes are reaped.
    sweeper: CgroupSweeper,
    /// The value of `NIGHTSHIFT_AGENT` in this agent's build processes.
    tag: String,
    /// Process-tree membership of builds without a cgroup. Locked only by
    /// scans (sampling, killing), never on the path that starts a build.
    tracker: Mutex<ProcessTracker>,
}

#[derive(Debug, Default)]
struct TreesInner {
    live: HashMap<BuildId, Tree>,
    /// CPU of build cgroups already removed, in microseconds.
    retired_usec: u64,
}

#[derive(Debug, Default)]
struct Tree {
    /// Process group of the running step.
    pgid: Option<i32>,
    cgroup: Option<PathBuf>,
}

/// Why builds cannot be set up.
#[derive(Debug)]
pub enum TreesError {
    /// `state_dir/running` cannot be created.
    Records(String),
    /// `[builds] cgroups = "required"` and there is no delegated cgroup.
    NoCgroup(String),
}

/// What the builds use right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildUsage {
    /// Total CPU time of every build tree so far (microseconds; grows).
    pub cpu_usec: u64,
    /// Build processes currently running or in uninterruptible sleep.
    pub runnable: u32,
}

impl BuildTrees {
    /// Uses cgroups when the agent's cgroup is delegated and writable (and
    /// `[builds] cgroups` allows), process trees otherwise. Records running
    /// builds under `state_dir/running`.
    pub fn detect(state_dir: &Path, settings: &BuildSettings) -> Result<BuildTrees, TreesError> {
        let records = state_dir.join("running");
        fs_err::create_dir_all(&records).map_err(|error| {
            TreesError::Records(format!(
                "cannot create the build records directory: {error}"
            ))
        })?;
        let cgroups = match settings.cgroups {
            CgroupUse::Off => None,
            CgroupUse::Auto => CgroupHost::detect(),
            CgroupUse::Required => Some(CgroupHost::detect().ok_or_else(|| {
                TreesError::NoCgroup("[builds] cgroups = \"required\" but the agent's cgroup is not a writable cgroup v2 delegated to it (run it from a systemd unit with Delegate=yes, or set cgroups = \"auto\")".to_owned())
            })?),
        };
        if let Some(host) = &cgroups {
            for note in &host.notes {
                tracing::info!("{note}");
            }
            let stale = sweep_stale(&host.parent);
            if stale > 0 {
                tracing::info!("removed {stale} empty build cgroup(s) left by earlier agent runs");
            }
        }
        Ok(BuildTrees {
            cgroups,
            memory_high: settings.memory_high_bytes(),
            settings: settings.clone(),
            records: Some(records),
            inner: Mutex::default(),
            sweeper: CgroupSweeper::default(),
            tag: std::process::id().to_string(),
            tracker: Mutex::new(ProcessTracker::new(
                std::process::id() as i32,
                std::process::id().to_string(),
            )),
        })
    }

    /// Process-tree accounting only, at normal priority (tests measure
    /// builds' CPU on busy machines), with a marker of its own: tests run
    /// many of these in one process.
    #[cfg(test)]
    pub fn without_cgroups() -> BuildTrees {
        use std::sync::atomic::{AtomicU32, Ordering};
        static INSTANCES: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-test-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::Relaxed)
        );
        BuildTrees {
            cgroups: None,
            settings: BuildSettings {
                cpu_priority: super::priority::CpuPriority::Normal,
                io_priority: super::priority::IoPriority::Normal,
                ..BuildSettings::default()
            },
            memory_high: None,
            records: None,
            inner: Mutex::default(),
            sweeper: CgroupSweeper::default(),
            tag: tag.clone(),
            tracker: Mutex::new(ProcessTracker::new(std::process::id() as i32, tag)),
        }
    }

    /// The value of `NIGHTSHIFT_AGENT` in this agent's build processes.
    pub fn agent_tag(&self) -> &str {
        &self.tag
    }

    /// Builds in cgroups under `parent` (a cgroup a test created), records
    /// under `state_dir/running`.
    #[cfg(test)]
    pub fn under_cgroup(state_dir: &Path, parent: &Path) -> BuildTrees {
        let records = state_dir.join("running");
        fs_err::create_dir_all(&records).unwrap();
        BuildTrees {
            cgroups: Some(CgroupHost {
                parent: parent.to_owned(),
                cpu: false,
                memory: false,
                notes: Vec::new(),
            }),
            records: Some(records),
            ..BuildTrees::without_cgroups()
        }
    }

    /// The priorities a step's process takes on before exec.
    pub fn child_priority(&self) -> ChildPriority {
        self.settings.child_priority()
    }

    /// How builds are run, for the status page and `worker status --json`.
    pub fn isolation(&self) -> BuildIsolation {
        let mut notes = Vec::new();
        let (cpu_applied, memory_applied) = match &self.cgroups {
            Some(host) => {
                notes.extend(host.notes.iter().cloned());
                (host.cpu, host.memory && self.memory_high.is_some())
            }
            None => {
                notes.push(if self.settings.cgroups == CgroupUse::Off {
                    "builds have no cgroup ([builds] cgroups = \"off\"), so cpu.weight and memory.high are not applied".to_owned()
                } else {
                    "builds have no cgroup (the agent's cgroup is not a cgroup v2 delegated to it), so cpu.weight and memory.high are not applied".to_owned()
                });
                (false, false)
            }
        };
        BuildIsolation {
            accounting: if self.cgroups.is_some() {
                "cgroup".to_owned()
            } else {
                "process-tree".to_owned()
            },
            cgroup_parent: self
                .cgroups
                .as_ref()
                .map(|host| host.parent.display().to_string()),
            cpu_priority: self.settings.cpu_priority,
            io_priority: self.settings.io_priority,
            cpu_weight: self.settings.cpu_weight,
            cpu_weight_applied: cpu_applied,
            memory_high_bytes: self.memory_high,
            memory_high_applied: memory_applied,
            notes,
        }
    }

    /// Kills what builds of a previous agent run left behind (the agent was
    /// killed or crashed mid-build; the master re-queued those builds). Only
    /// builds this agent recorded under `state_dir/running` are touched: the
    /// processes in their cgroup, and the processes of their recorded
    /// process group that carry that build's `NIGHTSHIFT_BUILD_ID`. Other
    /// agents sharing the same cgroup (tests, several agents in one unit)
    /// are left alone.
    /// Returns one line per cleaned-up build, for the log.
    pub fn kill_leftovers(&self) -> Vec<String> {
        let mut report = Vec::new();
        let Some(records) = &self.records else {
            return report;
        };
        let Ok(entries) = fs_err::read_dir(records) else {
            return report;
        };
        let processes = all_processes();
        for entry in entries.flatten() {
            let path = entry.path();
            let build = entry.file_name().to_string_lossy().into_owned();
            let text = fs_err::read_to_string(&path).unwrap_or_default();
            let mut lines = text.lines();
            let pgid = lines
                .next()
                .and_then(|line| line.trim().parse::<i32>().ok());
            let recorded_cgroup = lines
                .next()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(PathBuf::from);
            let mut victims: Vec<i32> = processes
                .iter()
                .filter(|stat| {
                    Some(stat.pgrp) == pgid
                        && environ_value(stat.pid, BUILD_MARKER).as_deref() == Some(build.as_str())
                })
                .map(|stat| stat.pid)
                .collect();
            // Only a cgroup of ours: under our parent, named like ours.
            let cgroup = recorded_cgroup.filter(|dir| {
                self.cgroups.as_ref().map(|host| host.parent.as_path()) == dir.parent()
                    && dir
                        .file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with("nightshift-"))
                    && dir.is_dir()
            });
            if let Some(dir) = &cgroup {
                let pids = fs_err::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                victims.extend(
                    pids.lines()
                        .filter_map(|pid| pid.trim().parse::<i32>().ok()),
                );
            }
            victims.sort_unstable();
            victims.dedup();
            for pid in &victims {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if let Some(dir) = &cgroup {
                // Removal fails while the killed processes are not yet
                // reaped; a build with the same id reuses the directory.
                let _ = fs_err::remove_dir(dir);
            }
            if !victims.is_empty() {
                report.push(format!(
                    "killed {} leftover process(es) of build {build} from a previous run",
                    victims.len()
                ));
            }
            let _ = fs_err::remove_file(&path);
        }
        report
    }
    /// Records a running build (`Some`, with its current step's process
    /// group when one runs) or forgets it (`None`, the build ended).
    fn record(&self, build_id: BuildId, running: Option<Option<i32>>) {
        let Some(records) = &self.records else {
            return;
        };
        let path = records.join(build_id.to_string());
        let cgroup = self
            .lock()
            .live
            .get(&build_id)
            .and_then(|tree| tree.cgroup.clone());
        let result = match running {
            Some(pgid) => fs_err::write(
                &path,
                format!(
                    "{}\n{}\n",
                    pgid.map_or_else(|| "-".to_owned(), |pgid| pgid.to_string()),
                    cgroup
                        .map(|dir| dir.display().to_string())
                        .unwrap_or_default()
                ),
            ),
            None => match fs_err::remove_file(&path) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(error) = result {
            tracing::warn!(
                "cannot record build {build_id}'s process group in {}: {error}",
                path.display()
            );
        }
    }

    /// How builds are told apart, for the log.
    pub fn describe(&self) -> String {
        match &self.cgroups {
            Some(host) => format!("one cgroup per build under {}", host.parent.display()),
            None => "process tree (no delegated cgroup v2)".to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TreesInner> {
        // A panic while holding this lock cannot leave it inconsistent
        // (plain inserts and removes), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A build starts: creates its cgroup when possible, returning it.
    /// The name carries the agent's pid: agents sharing a parent cgroup
    /// (several agents in one unit, the tests) never share a build's cgroup
    /// even when their masters number builds alike.
    pub fn begin(&self, build_id: BuildId) -> Option<PathBuf> {
        let cgroup = self.cgroups.as_ref().and_then(|host| {
            let name = format!("nightshift-{}-build-{build_id}", std::process::id());
            match host.create(&name, self.settings.cpu_weight, self.memory_high) {
                Ok(dir) => Some(dir),
                Err(error) => {
                    tracing::warn!(
                        "cannot create cgroup {name} under {}: {error}; build {build_id} is accounted by process tree",
                        host.parent.display()
                    );
                    None
                }
            }
        });
        self.lock().live.insert(
            build_id,
            Tree {
                pgid: None,
                cgroup: cgroup.clone(),
            },
        );
        self.record(build_id, Some(None));
        cgroup
    }

    pub fn set_step_group(&self, build_id: BuildId, pgid: Option<i32>) {
        if let Some(tree) = self.lock().live.get_mut(&build_id) {
            tree.pgid = pgid;
        }
        self.record(build_id, Some(pgid));
    }

    /// A build ended: keeps its CPU time in the total and removes its cgroup.
    pub fn end(&self, build_id: BuildId) {
        self.record(build_id, None);
        let mut inner = self.lock();
        if let Some(tree) = inner.live.remove(&build_id)
            && let Some(cgroup) = tree.cgroup
        {
            inner.retired_usec += cgroup_usage_usec(&cgroup).unwrap_or(0);
            // Killed processes leave the cgroup only once reaped.
            self.sweeper.remove(cgroup);
        }
    }

    /// Sends `signal` to every process of a build: its running step's
    /// group, its cgroup, and every process it started that left the group
    /// (found by [`ProcessTracker`]). Reads `/proc`; call off the runtime's
    /// core threads when it matters.
    pub fn signal_build(&self, build_id: BuildId, signal: Signal) {
        let (pgid, cgroup) = match self.lock().live.get(&build_id) {
            Some(tree) => (tree.pgid, tree.cgroup.clone()),
            None => return,
        };
        if let Some(pgid) = pgid.filter(|pgid| *pgid > 1) {
            // ESRCH (the group is already gone) is the expected case at the end.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
        }
        match cgroup {
            Some(cgroup) => {
                signal_cgroup(&cgroup, signal);
            }
            None => {
                let (_, members) = self.scan_trees();
                for pid in members.get(&build_id).into_iter().flatten() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
                }
            }
        }
    }

    /// Process-tree membership of the builds without a cgroup.
    fn scan_trees(&self) -> (super::build_tree::TreeUsage, HashMap<BuildId, Vec<i32>>) {
        let builds: Vec<TrackedBuild> = self
            .lock()
            .live
            .iter()
            .filter(|(_, tree)| tree.cgroup.is_none())
            .map(|(build_id, tree)| TrackedBuild {
                build_id: *build_id,
                pgid: tree.pgid,
            })
            .collect();
        let mut tracker = self
            .tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tracker.is_idle(&builds) {
            return Default::default();
        }
        tracker.scan(&all_processes(), &builds)
    }

    /// Sums what every build uses. Reads `/proc` and cgroup files.
    pub fn usage(&self) -> BuildUsage {
        let inner = self.lock();
        let mut cpu_usec = inner.retired_usec;
        let mut runnable = 0;
        for tree in inner.live.values() {
            if let Some(cgroup) = &tree.cgroup {
                cpu_usec += cgroup_usage_usec(cgroup).unwrap_or(0);
                runnable += cgroup_runnable(cgroup);
            }
        }
        drop(inner);
        let ticks = clock_ticks_per_sec();
        // Steps the agent already reaped, with everything they reaped. With
        // cgroups their time is in the cgroup already; counting it here too
        // would count it twice.
        if self.cgroups.is_none()
            && let Some(me) = read_stat(Path::new("/proc/self/stat"))
        {
            cpu_usec += (me.cutime + me.cstime) * 1_000_000 / ticks;
        }
        let (trees, _) = self.scan_trees();
        cpu_usec += trees.ticks * 1_000_000 / ticks;
        runnable += trees.runnable;
        BuildUsage { cpu_usec, runnable }
    }
}

/// One foreign-load sample, with the raw figures it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadMeasurement {
    pub at: Timestamp,
    /// 1-minute load average not caused by builds.
    pub load1: f64,
    /// CPU use of the whole machine in percent, not counting builds.
    pub cpu_percent: f64,
    pub raw_load1: f64,
    pub raw_cpu_percent: f64,
    /// CPU use of the builds in percent of the whole machine.
    pub build_cpu_percent: f64,
}

/// Takes foreign-load samples; call [`LoadSampler::sample`] on an interval.
pub struct LoadSampler {
    system: sysinfo::System,
    last: Option<(tokio::time::Instant, u64)>,
    builds_runnable_avg: f64,
}

impl LoadSampler {
    pub fn new() -> Result<LoadSampler, String> {
        let mut system =
            sysinfo::System::new().map_err(|error| format!("cannot read system load: {error}"))?;
        system.refresh_cpu_usage();
        Ok(LoadSampler {
            system,
            last: None,
            builds_runnable_avg: 0.0,
        })
    }

    /// The foreign load since the previous call; `None` on the first call
    /// (CPU use is a difference between two samples).
    pub fn sample(&mut self, trees: &BuildTrees, at: Timestamp) -> Option<LoadMeasurement> {
        let now = tokio::time::Instant::now();
        self.system.refresh_cpu_usage();
        let usage = trees.usage();
        let raw_load1 = sysinfo::System::load_average()
            .map(|load| load.one)
            .unwrap_or(0.0);
        let raw_cpu_percent = f64::from(self.system.global_cpu_usage());
        let cpus = self.system.cpus().len().max(1) as f64;
        let previous = self.last.replace((now, usage.cpu_usec));
        let (then, then_usec) = previous?;
        let elapsed = now
            .saturating_duration_since(then)
            .max(Duration::from_millis(1));
        let build_cpu_percent =
            (usage.cpu_usec.saturating_sub(then_usec) as f64 / elapsed.as_micros() as f64 / cpus
                * 100.0)
                .clamp(0.0, 100.0);
        // The kernel's 1-minute average: weight exp(-dt/60 s) for the past.
        let decay = (-elapsed.as_secs_f64() / 60.0).exp();
        self.builds_runnable_avg =
            self.builds_runnable_avg * decay + f64::from(usage.runnable) * (1.0 - decay);
        Some(LoadMeasurement {
            at,
            load1: (raw_load1 - self.builds_runnable_avg).max(0.0),
            cpu_percent: (raw_cpu_percent - build_cpu_percent).max(0.0),
            raw_load1,
            raw_cpu_percent,
            build_cpu_percent,
        })
    }
}

fn cgroup_runnable(cgroup: &Path) -> u32 {
    let Ok(procs) = fs_err::read_to_string(cgroup.join("cgroup.procs")) else {
        return 0;
    };
    procs
        .lines()
        .filter_map(|pid| read_stat(&Path::new("/proc").join(pid.trim()).join("stat")))
        .filter(|process| process.running)
        .count() as u32
}

fn clock_ticks_per_sec() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => 100,
    }
}

#[cfg(test)]
mod tests;
