//! Build cgroups: finds the cgroup v2 subtree delegated to the agent
//! (systemd `Delegate=yes`), moves the agent into a leaf `agent/` of it so
//! controllers can be enabled for builds (cgroup v2 lets only cgroups
//! without processes of their own hand controllers down), and creates one
//! cgroup per build with a low `cpu.weight` and an optional `memory.high`.
#![allow(
    unsafe_code,
    reason = "the cgroup syscalls used here have no safe wrapper; each block says why it is sound"
)]

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

/// The name of the leaf the agent moves itself into.
const AGENT_LEAF: &str = "agent";

/// The delegated cgroup builds are created in.
#[derive(Debug, Clone)]
pub struct CgroupHost {
    /// Where build cgroups are created.
    pub parent: PathBuf,
    /// Whether build cgroups have the cpu controller (`cpu.weight`).
    pub cpu: bool,
    /// Whether build cgroups have the memory controller (`memory.high`).
    pub memory: bool,
    /// What could not be set up, in words.
    pub notes: Vec<String>,
}

impl CgroupHost {
    /// The agent's cgroup when it is delegated to it (writable, on a cgroup2
    /// mount), made ready for build cgroups; `None` without one.
    pub fn detect() -> Option<CgroupHost> {
        let own = own_cgroup()?;
        let mount = cgroup2_mount()?;
        let dir = mount.join(own.trim_start_matches('/'));
        if !(dir.join("cgroup.procs").is_file()
            && writable(&dir)
            && writable(&dir.join("cgroup.procs")))
        {
            return None;
        }
        Some(CgroupHost::prepare(dir, own == "/"))
    }

    /// Moves the agent into a leaf of `dir` when it is alone there and
    /// enables the cpu and memory controllers for `dir`'s children.
    fn prepare(dir: PathBuf, is_root: bool) -> CgroupHost {
        let mut notes = Vec::new();
        let me = std::process::id().to_string();
        let procs = read(&dir.join("cgroup.procs"));
        let alone = procs.lines().all(|pid| pid.trim() == me);
        if is_root {
            notes.push(
                "the agent runs in the root cgroup; build cgroups get the controllers the root already hands down".to_owned(),
            );
        } else if !alone {
            notes.push(format!(
                "other processes share the agent's cgroup {}; build cgroups get only the controllers it already hands down (run the agent alone in a cgroup with Delegate=yes)",
                dir.display()
            ));
        } else {
            let leaf = dir.join(AGENT_LEAF);
            let moved = match fs_err::create_dir(&leaf) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(error) => Err(error),
            }
            .and_then(|()| fs_err::write(leaf.join("cgroup.procs"), &me));
            match moved {
                Ok(()) => {
                    let available = read(&dir.join("cgroup.controllers"));
                    let wanted: Vec<&str> = ["cpu", "memory"]
                        .into_iter()
                        .filter(|name| available.split_whitespace().any(|c| c == *name))
                        .collect();
                    if !wanted.is_empty() {
                        let line = wanted
                            .iter()
                            .map(|name| format!("+{name}"))
                            .collect::<Vec<_>>()
                            .join(" ");
                        if let Err(error) = fs_err::write(dir.join("cgroup.subtree_control"), &line)
                        {
                            notes.push(format!(
                                "cannot enable {line} in {}: {error}",
                                dir.display()
                            ));
                        }
                    }
                }
                Err(error) => notes.push(format!(
                    "cannot move the agent into {}: {error}; build cgroups get only the controllers {} already hands down",
                    leaf.display(),
                    dir.display()
                )),
            }
        }
        let enabled = read(&dir.join("cgroup.subtree_control"));
        let has = |name: &str| enabled.split_whitespace().any(|c| c == name);
        let (cpu, memory) = (has("cpu"), has("memory"));
        for (on, name, what) in [
            (cpu, "cpu", "cpu.weight"),
            (memory, "memory", "memory.high"),
        ] {
            if !on {
                let available = read(&dir.join("cgroup.controllers"));
                notes.push(format!(
                    "no {name} controller for build cgroups under {} (available: {}), so {what} is not applied",
                    dir.display(),
                    if available.trim().is_empty() {
                        "none"
                    } else {
                        available.trim()
                    }
                ));
            }
        }
        CgroupHost {
            parent: dir,
            cpu,
            memory,
            notes,
        }
    }

    /// Creates (or reuses) a build's cgroup and sets its limits. Limits that
    /// cannot be written are logged; the cgroup still accounts the build.
    pub fn create(
        &self,
        name: &str,
        cpu_weight: u32,
        memory_high: Option<u64>,
    ) -> std::io::Result<PathBuf> {
        let dir = self.parent.join(name);
        match fs_err::create_dir(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
        let mut limits = Vec::new();
        if self.cpu {
            limits.push(("cpu.weight", cpu_weight.to_string()));
        }
        if self.memory {
            limits.push((
                "memory.high",
                memory_high.map_or_else(|| "max".to_owned(), |bytes| bytes.to_string()),
            ));
        }
        for (file, value) in limits {
            if let Err(error) = fs_err::write(dir.join(file), &value) {
                tracing::warn!("cannot set {file} = {value} in {}: {error}", dir.display());
            }
        }
        Ok(dir)
    }
}

/// Sends `signal` to every process in `cgroup`; SIGKILL goes through
/// `cgroup.kill` where the kernel has it (no process can fork past it).
/// Returns how many processes were signalled (as far as known).
pub fn signal_cgroup(cgroup: &Path, signal: Signal) -> usize {
    let pids: Vec<i32> = read(&cgroup.join("cgroup.procs"))
        .lines()
        .filter_map(|pid| pid.trim().parse().ok())
        .collect();
    if signal == Signal::SIGKILL && fs_err::write(cgroup.join("cgroup.kill"), "1").is_ok() {
        return pids.len();
    }
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
    }
    pids.len()
}

fn read(path: &Path) -> String {
    fs_err::read_to_string(path).unwrap_or_default()
}

fn writable(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access() only reads the NUL-terminated path.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
}

/// The agent's cgroup v2 path relative to the mount (`0::` line).
fn own_cgroup() -> Option<String> {
    let own = fs_err::read_to_string("/proc/self/cgroup").ok()?;
    own.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs_err::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

pub fn cgroup_usage_usec(cgroup: &Path) -> Option<u64> {
    let stat = fs_err::read_to_string(cgroup.join("cpu.stat")).ok()?;
    stat.lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|value| value.trim().parse().ok())
}

/// How many build cgroups may wait for removal at once; past it the oldest
/// is left for the next agent start to sweep (see [`sweep_stale`]).
const MAX_PENDING_REMOVALS: usize = 256;

/// Removes ended builds' cgroups once the kernel lets it: a cgroup cannot be
/// removed while its killed processes are not yet reaped (by init, or by
/// whoever adopted them), which can take a while on a busy machine or under
/// an init that reaps lazily. One thread retries every pending removal with
/// backoff (100 ms doubling to 5 s) for as long as the agent runs.
#[derive(Debug, Clone, Default)]
pub struct CgroupSweeper {
    shared: std::sync::Arc<SweeperShared>,
}

#[derive(Debug, Default)]
struct SweeperShared {
    pending: std::sync::Mutex<SweeperState>,
    wake: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct SweeperState {
    paths: std::collections::VecDeque<PathBuf>,
    thread_started: bool,
}

impl CgroupSweeper {
    /// Removes `cgroup` now if it is empty, else as soon as it can be.
    pub fn remove(&self, cgroup: PathBuf) {
        if try_remove(&cgroup) {
            return;
        }
        let mut state = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.paths.len() >= MAX_PENDING_REMOVALS
            && let Some(dropped) = state.paths.pop_front()
        {
            tracing::warn!(
                "{} build cgroups wait for removal; {} is left for the next start",
                MAX_PENDING_REMOVALS,
                dropped.display()
            );
        }
        state.paths.push_back(cgroup);
        if !state.thread_started {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("cgroup-sweeper".to_owned())
                .spawn(move || sweep(&shared));
            match spawned {
                Ok(_) => state.thread_started = true,
                Err(error) => tracing::warn!("cannot start the cgroup sweeper: {error}"),
            }
        }
        self.shared.wake.notify_one();
    }

    /// How many build cgroups still wait for removal.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .paths
            .len()
    }
}

/// `rmdir`; true when the cgroup is gone (removed now or already).
fn try_remove(cgroup: &Path) -> bool {
    match fs_err::remove_dir(cgroup) {
        Ok(()) => true,
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

fn sweep(shared: &SweeperShared) {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(5);
    let mut delay = FIRST;
    let mut state = shared
        .pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if state.paths.is_empty() {
            delay = FIRST;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        let (next, _) = shared
            .wake
            .wait_timeout(state, delay)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state = next;
        let before = state.paths.len();
        state.paths.retain(|cgroup| !try_remove(cgroup));
        delay = if state.paths.len() < before {
            FIRST
        } else {
            (delay * 2).min(LONGEST)
        };
    }
}

/// Removes empty build cgroups under `parent` left by agents that are gone
/// (their pid is in the name: `nightshift-<pid>-build-<id>`). A cgroup that
/// still holds processes cannot be removed, so nothing running is touched.
/// Returns how many were removed.
pub fn sweep_stale(parent: &Path) -> usize {
    let Ok(entries) = fs_err::read_dir(parent) else {
        return 0;
    };
    let own = std::process::id();
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(pid) = name
                .strip_prefix("nightshift-")
                .and_then(|rest| rest.split_once("-build-"))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                return false;
            };
            // Gone agents only; this agent's own are swept as its builds end.
            pid != own && !Path::new(&format!("/proc/{pid}")).exists()
        })
        .filter(|entry| fs_err::remove_dir(entry.path()).is_ok())
        .count()
}
