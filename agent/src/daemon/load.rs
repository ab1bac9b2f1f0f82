//! Foreign load: the machine's 1-minute load average and CPU use minus what
//! the agent's own builds cause, so a build never makes its own worker go
//! away.
//!
//! Builds are accounted per process tree. Each build runs in its own cgroup
//! v2 under the agent's cgroup when that cgroup is delegated to the agent
//! (systemd `Delegate=yes`: writable, on a cgroup2 mount); its `cpu.stat`
//! `usage_usec` then counts every process the build ever ran, including
//! short-lived ones. Without cgroups each step runs in its own process group
//! and the runner sums `utime+stime+cutime+cstime` of the live members from
//! `/proc/<pid>/stat`, plus the agent's own `cutime+cstime`, which grows by
//! the whole tree's time when the agent reaps a finished step.
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

/// Where builds' process trees live, so their CPU can be told apart.
#[derive(Debug)]
pub struct BuildTrees {
    /// The agent's own delegated cgroup, when builds get cgroups.
    cgroup_parent: Option<PathBuf>,
    /// `state_dir/running`: one file per running build holding its step's
    /// process group and its cgroup, so a restarted agent can kill what a
    /// crashed one left.
    records: Option<PathBuf>,
    inner: Mutex<TreesInner>,
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

/// What the builds use right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildUsage {
    /// Total CPU time of every build tree so far (microseconds; grows).
    pub cpu_usec: u64,
    /// Build processes currently running or in uninterruptible sleep.
    pub runnable: u32,
}

impl BuildTrees {
    /// Uses cgroups when the agent's cgroup is delegated and writable,
    /// process groups otherwise.
    /// Records running process groups under `state_dir/running`.
    pub fn detect(state_dir: &Path) -> std::io::Result<BuildTrees> {
        let records = state_dir.join("running");
        fs_err::create_dir_all(&records)?;
        Ok(BuildTrees {
            cgroup_parent: delegated_cgroup(),
            records: Some(records),
            inner: Mutex::default(),
        })
    }

    /// Process-group accounting only.
    #[cfg(test)]
    pub fn without_cgroups() -> BuildTrees {
        BuildTrees {
            cgroup_parent: None,
            records: None,
            inner: Mutex::default(),
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
        let processes = all_processes_with_pid();
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
            let marker = format!("NIGHTSHIFT_BUILD_ID={build}");
            let mut victims: Vec<i32> = processes
                .iter()
                .filter(|(pid, stat)| Some(stat.pgrp) == pgid && environ_has(*pid, &marker))
                .map(|(pid, _)| *pid)
                .collect();
            // Only a cgroup of ours: under our parent, named like ours.
            let cgroup = recorded_cgroup.filter(|dir| {
                self.cgroup_parent.as_deref() == dir.parent()
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
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
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
        match &self.cgroup_parent {
            Some(parent) => format!("one cgroup per build under {}", parent.display()),
            None => "one process group per step (no delegated cgroup v2)".to_owned(),
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
        let cgroup = self.cgroup_parent.as_ref().and_then(|parent| {
            let dir = parent.join(format!(
                "nightshift-{}-build-{build_id}",
                std::process::id()
            ));
            match fs_err::create_dir(&dir) {
                Ok(()) => Some(dir),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Some(dir),
                Err(error) => {
                    tracing::warn!(
                        "cannot create cgroup {}: {error}; build {build_id} is accounted by process group",
                        dir.display()
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
            if let Err(error) = fs_err::remove_dir(&cgroup) {
                tracing::warn!("cannot remove cgroup {}: {error}", cgroup.display());
            }
        }
    }

    /// Sums what every build uses. Reads `/proc` and cgroup files.
    pub fn usage(&self) -> BuildUsage {
        let inner = self.lock();
        let mut cpu_usec = inner.retired_usec;
        let mut runnable = 0;
        let mut groups = Vec::new();
        for tree in inner.live.values() {
            match &tree.cgroup {
                Some(cgroup) => {
                    cpu_usec += cgroup_usage_usec(cgroup).unwrap_or(0);
                    runnable += cgroup_runnable(cgroup);
                }
                None => groups.extend(tree.pgid),
            }
        }
        drop(inner);
        let ticks = clock_ticks_per_sec();
        // Steps the agent already reaped, with everything they reaped. With
        // cgroups their time is in the cgroup already; counting it here too
        // would count it twice.
        if self.cgroup_parent.is_none()
            && let Some(me) = read_stat(Path::new("/proc/self/stat"))
        {
            cpu_usec += (me.cutime + me.cstime) * 1_000_000 / ticks;
        }
        if !groups.is_empty() {
            for process in all_processes() {
                if groups.contains(&process.pgrp) {
                    cpu_usec += (process.utime + process.stime + process.cutime + process.cstime)
                        * 1_000_000
                        / ticks;
                    if process.running {
                        runnable += 1;
                    }
                }
            }
        }
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

/// The agent's own cgroup v2 directory when it may create child cgroups and
/// move processes into them.
fn delegated_cgroup() -> Option<PathBuf> {
    let own = fs_err::read_to_string("/proc/self/cgroup").ok()?;
    let relative = own.lines().find_map(|line| line.strip_prefix("0::"))?;
    let mount = cgroup2_mount()?;
    let dir = mount.join(relative.trim_start_matches('/'));
    let writable = |path: &Path| nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok();
    if dir.join("cgroup.procs").is_file() && writable(&dir) && writable(&dir.join("cgroup.procs")) {
        Some(dir)
    } else {
        None
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs_err::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn cgroup_usage_usec(cgroup: &Path) -> Option<u64> {
    let stat = fs_err::read_to_string(cgroup.join("cpu.stat")).ok()?;
    stat.lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|value| value.trim().parse().ok())
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

/// The fields of `/proc/<pid>/stat` that accounting needs (times in ticks).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcStat {
    pgrp: i32,
    running: bool,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name may contain spaces and parentheses: fields start
    // after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |index: usize| fields.get(index)?.parse::<u64>().ok();
    Some(ProcStat {
        running: matches!(*fields.first()?, "R" | "D"),
        pgrp: fields.get(2)?.parse().ok()?,
        utime: number(11)?,
        stime: number(12)?,
        cutime: number(13)?,
        cstime: number(14)?,
    })
}

fn read_stat(path: &Path) -> Option<ProcStat> {
    parse_stat(&fs_err::read_to_string(path).ok()?)
}

fn environ_has(pid: i32, entry: &str) -> bool {
    fs_err::read(format!("/proc/{pid}/environ"))
        .map(|environ| {
            environ
                .split(|b| *b == 0)
                .any(|item| item == entry.as_bytes())
        })
        .unwrap_or(false)
}

fn all_processes_with_pid() -> Vec<(i32, ProcStat)> {
    let Ok(entries) = fs_err::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, read_stat(&entry.path().join("stat"))?))
        })
        .collect()
}

fn all_processes() -> Vec<ProcStat> {
    all_processes_with_pid()
        .into_iter()
        .map(|(_, stat)| stat)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (my (odd) cmd) R 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 123 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                pgrp: 4242,
                running: true,
                utime: 250,
                stime: 50,
                cutime: 7,
                cstime: 3,
            })
        );
        assert_eq!(parse_stat("12 (sh) S"), None);
    }

    #[test]
    fn a_process_group_is_found_and_counted() {
        // Our own process group contains at least this test process.
        let me = read_stat(Path::new("/proc/self/stat")).unwrap();
        let trees = BuildTrees::without_cgroups();
        trees.begin(1);
        trees.set_step_group(1, Some(me.pgrp));
        let usage = trees.usage();
        assert!(usage.cpu_usec > 0, "{usage:?}");
        trees.end(1);
    }

    async fn run_build(trees: &Arc<BuildTrees>, build_id: BuildId, command: &str) -> Duration {
        use super::super::clock::SystemClock;
        use super::super::runner::{self, BuildRequest, RunnerEvent, RunnerSettings};
        let work = tempfile::tempdir().unwrap();
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let started = std::time::Instant::now();
        let _control = runner::spawn(
            BuildRequest {
                build_id,
                builder: "burn".into(),
                steps: vec![nightshift_proto::wire::StepSpec {
                    name: "burn".into(),
                    command: command.into(),
                    timeout_secs: None,
                    env: Default::default(),
                    workdir: None,
                    needs_grant: false,
                }],
                properties: Default::default(),
            },
            Arc::new(RunnerSettings {
                workdir: work.path().to_owned(),
                kill_grace: Duration::from_millis(500),
            }),
            trees.clone(),
            Arc::new(SystemClock),
            events_tx,
        );
        loop {
            let event = tokio::time::timeout(Duration::from_secs(120), events.recv())
                .await
                .expect("the build ends")
                .expect("the runner reports");
            if let RunnerEvent::Finished { result } = event {
                assert_eq!(
                    result.outcome,
                    nightshift_proto::wire::Outcome::Success,
                    "{}",
                    result.log
                );
                return started.elapsed();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cpu_burning_build_is_counted_as_the_builds_own_load() {
        let trees = Arc::new(BuildTrees::without_cgroups());
        let mut sampler = LoadSampler::new().unwrap();
        assert_eq!(sampler.sample(&trees, Timestamp::now()), None);
        let sampling = {
            let trees = trees.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(1500));
                sampler.sample(&trees, Timestamp::now())
            })
        };
        // A grandchild burns CPU for two seconds.
        let elapsed = run_build(
            &trees,
            1,
            "sh -c 'end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done'",
        )
        .await;
        let sample = sampling
            .await
            .unwrap()
            .expect("a second sample has a value");
        assert!(elapsed >= Duration::from_secs(1));
        // Even on a busy two-core machine the loop gets a good share of a
        // core; without build accounting this figure would be zero.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!(
            sample.build_cpu_percent > 20.0 / cpus,
            "build share {} of {:?}",
            sample.build_cpu_percent,
            sample
        );
        assert!(
            sample.cpu_percent
                <= (sample.raw_cpu_percent - sample.build_cpu_percent).max(0.0) + 1e-9
        );
    }

    #[tokio::test]
    async fn short_lived_build_processes_are_counted_after_they_exit() {
        let trees = Arc::new(BuildTrees::without_cgroups());
        let before = trees.usage().cpu_usec;
        // Hundreds of processes that each burn a little CPU and exit.
        let elapsed = run_build(
            &trees,
            2,
            "for n in $(seq 1 40); do sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'; done",
        )
        .await;
        let used = Duration::from_micros(trees.usage().cpu_usec - before);
        assert!(
            used >= elapsed / 4,
            "the build ran {elapsed:?} but only {used:?} of CPU was attributed to it"
        );
    }

    #[tokio::test]
    async fn with_a_delegated_cgroup_builds_are_accounted_by_their_cgroup() {
        let state = tempfile::tempdir().unwrap();
        let trees = Arc::new(BuildTrees::detect(state.path()).unwrap());
        let Some(parent) = trees.cgroup_parent.clone() else {
            eprintln!("no writable cgroup v2 here; the process-group tests cover this host");
            return;
        };
        let before = trees.usage().cpu_usec;
        let elapsed = run_build(
            &trees,
            3,
            "test \"$(cat /proc/self/cgroup | grep '^0::' | cut -d/ -f2-)\" != '' || exit 7; \
             for n in $(seq 1 40); do sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'; done",
        )
        .await;
        let used = Duration::from_micros(trees.usage().cpu_usec - before);
        assert!(
            used >= elapsed / 4,
            "the build ran {elapsed:?} but its cgroup accounted only {used:?}"
        );
        assert!(
            !parent
                .join(format!("nightshift-{}-build-3", std::process::id()))
                .exists(),
            "the build's cgroup is removed when it ends"
        );
    }

    #[test]
    fn a_recorded_leftover_cgroup_is_emptied_and_a_neighbours_is_not() {
        let state = tempfile::tempdir().unwrap();
        let trees = BuildTrees::detect(state.path()).unwrap();
        let Some(parent) = trees.cgroup_parent.clone() else {
            eprintln!("no writable cgroup v2 here; the process-group test covers this host");
            return;
        };
        let tag = std::process::id();
        let ours = parent.join(format!("nightshift-{tag}0-build-5"));
        let neighbours = parent.join(format!("nightshift-{tag}1-build-5"));
        let spawn_in = |cgroup: &Path| {
            fs_err::create_dir_all(cgroup).unwrap();
            let child = std::process::Command::new("sleep")
                .arg("300")
                .spawn()
                .unwrap();
            fs_err::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
            child
        };
        let mut leftover = spawn_in(&ours);
        let mut neighbour = spawn_in(&neighbours);
        fs_err::write(
            state.path().join("running/5"),
            format!("-\n{}\n", ours.display()),
        )
        .unwrap();

        let report = trees.kill_leftovers();
        assert!(
            report.iter().any(|line| line.contains("build 5")),
            "{report:?}"
        );
        let status = leftover.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(
            neighbour.try_wait().unwrap().is_none(),
            "another agent's build cgroup was touched"
        );
        let _ = neighbour.kill();
        let _ = neighbour.wait();
        std::thread::sleep(Duration::from_millis(50));
        let _ = fs_err::remove_dir(&ours);
        let _ = fs_err::remove_dir(&neighbours);
    }

    #[test]
    fn leftovers_of_a_crashed_agent_are_killed_and_nothing_else() {
        use std::os::unix::process::CommandExt;
        let state = tempfile::tempdir().unwrap();
        let trees = BuildTrees::detect(state.path()).unwrap();
        let spawn = |build: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg("sleep 300 & wait")
                .env("NIGHTSHIFT_BUILD_ID", build)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut leftover = spawn("77");
        // A process group that is recorded but is not that build's.
        let mut stranger = spawn("78");
        let leftover_pid = leftover.id() as i32;
        fs_err::write(state.path().join("running/77"), leftover_pid.to_string()).unwrap();
        fs_err::write(
            state.path().join("running/79"),
            (stranger.id() as i32).to_string(),
        )
        .unwrap();
        // Let `sh` start its child so there is a grandchild to kill too.
        std::thread::sleep(Duration::from_millis(200));

        let report = trees.kill_leftovers();
        assert!(
            report.iter().any(|line| line.contains("build 77")),
            "{report:?}"
        );
        let status = leftover.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "an unrelated group was killed"
        );
        assert!(
            fs_err::read_dir(state.path().join("running"))
                .unwrap()
                .next()
                .is_none()
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(leftover_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
