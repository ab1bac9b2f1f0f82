//! How builds yield to the owner: the `[builds]` settings of `worker.toml`
//! (CPU and I/O priority, cgroup `cpu.weight`, an optional `memory.high`
//! ceiling, whether cgroups are used) and the code that applies them to a
//! step's process between fork and exec.
//!
//! Priorities set on the step's first process are inherited by everything
//! it starts (fork keeps the scheduling policy, nice value and I/O priority),
//! so a build cannot outrank the owner by starting a new session or group.
#![allow(
    unsafe_code,
    reason = "ioprio_set and SCHED_IDLE have no safe wrapper in nix or std; each block says why it is sound"
)]

use serde::{Deserialize, Serialize};

/// `[builds] cpu_priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuPriority {
    /// `SCHED_IDLE` (and nice 19): the build gets a CPU only when nothing
    /// else wants it.
    #[default]
    Idle,
    /// Nice 19 in the normal scheduling class.
    Low,
    /// As the agent runs.
    Normal,
}

/// `[builds] io_priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoPriority {
    /// The idle I/O class: disk time only when nobody else uses the disk.
    #[default]
    Idle,
    /// Best-effort class, lowest level (7).
    Low,
    /// As the agent runs.
    Normal,
}

/// `[builds] cgroups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CgroupUse {
    /// One cgroup per build when the agent's cgroup is delegated to it,
    /// process-tree accounting otherwise.
    #[default]
    Auto,
    /// Refuse to start without a delegated cgroup.
    Required,
    /// Never create cgroups; account builds by process tree.
    Off,
}

/// The default `cpu.weight` of a build's cgroup: the lowest there is (the
/// owner's processes have the default 100).
pub const DEFAULT_CPU_WEIGHT: u32 = 1;

/// `[builds]` as written in `worker.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSettings {
    #[serde(default)]
    pub cgroups: CgroupUse,
    #[serde(default)]
    pub cpu_priority: CpuPriority,
    #[serde(default)]
    pub io_priority: IoPriority,
    /// `cpu.weight` of each build's cgroup, 1..=10000 (cgroup mode with the
    /// cpu controller only).
    #[serde(default = "default_cpu_weight")]
    pub cpu_weight: u32,
    /// `memory.high` of each build's cgroup: bytes with an optional K/M/G/T
    /// suffix (powers of 1024) or a percentage of the machine's memory.
    #[serde(default)]
    pub memory_high: Option<String>,
}

fn default_cpu_weight() -> u32 {
    DEFAULT_CPU_WEIGHT
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            cgroups: CgroupUse::default(),
            cpu_priority: CpuPriority::default(),
            io_priority: IoPriority::default(),
            cpu_weight: DEFAULT_CPU_WEIGHT,
            memory_high: None,
        }
    }
}

/// A `memory_high` value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryLimit {
    Bytes(u64),
    /// Percent of the machine's memory (0 < p ≤ 100).
    Percent(f64),
}

impl MemoryLimit {
    /// Reads `"4G"`, `"512M"`, `"1073741824"`, `"75%"`.
    pub fn parse(text: &str) -> Result<MemoryLimit, String> {
        let trimmed = text.trim();
        let bad = || {
            format!(
                "\"{text}\" is not a memory size; write bytes with an optional K, M, G or T suffix (\"4G\", \"512M\") or a share of the machine's memory (\"75%\")"
            )
        };
        if let Some(percent) = trimmed.strip_suffix('%') {
            let value: f64 = percent.trim().parse().map_err(|_| bad())?;
            if !(value > 0.0 && value <= 100.0) {
                return Err(format!(
                    "\"{text}\": a share of the machine's memory must be more than 0% and at most 100%"
                ));
            }
            return Ok(MemoryLimit::Percent(value));
        }
        let upper = trimmed.to_ascii_uppercase();
        let digits_end = upper
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(upper.len());
        let (number, suffix) = upper.split_at(digits_end);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let shift = match suffix.trim() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(bad()),
        };
        let bytes = number
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("\"{text}\" is too large"))?;
        if bytes < 16 << 20 {
            return Err(format!(
                "\"{text}\" is below 16M; a build cannot run in that little memory"
            ));
        }
        Ok(MemoryLimit::Bytes(bytes))
    }

    /// The limit in bytes, given the machine's memory.
    pub fn bytes(self, total_memory: u64) -> u64 {
        match self {
            MemoryLimit::Bytes(bytes) => bytes,
            MemoryLimit::Percent(percent) => (total_memory as f64 * percent / 100.0) as u64,
        }
    }
}

impl BuildSettings {
    /// Problems with the settings, each with its key.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(1..=10000).contains(&self.cpu_weight) {
            problems.push((
                "builds.cpu_weight",
                format!(
                    "cpu_weight {} is out of range; cgroup weights go from 1 (lowest) to 10000",
                    self.cpu_weight
                ),
            ));
        }
        if let Some(text) = &self.memory_high
            && let Err(problem) = MemoryLimit::parse(text)
        {
            problems.push(("builds.memory_high", problem));
        }
        problems
    }

    /// The `memory_high` ceiling in bytes (validated at load).
    pub fn memory_high_bytes(&self) -> Option<u64> {
        let limit = MemoryLimit::parse(self.memory_high.as_deref()?).ok()?;
        Some(limit.bytes(total_memory()))
    }

    /// What a step's first process applies to itself before exec.
    pub fn child_priority(&self) -> ChildPriority {
        ChildPriority {
            cpu: self.cpu_priority,
            io: self.io_priority,
        }
    }
}

/// The machine's memory in bytes (0 when unknown).
pub fn total_memory() -> u64 {
    let Ok(meminfo) = fs_err::read_to_string("/proc/meminfo") else {
        return 0;
    };
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The priorities a step's process takes on (copyable into a pre-exec hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildPriority {
    pub cpu: CpuPriority,
    pub io: IoPriority,
}

const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
const IOPRIO_CLASS_BE: libc::c_int = 2;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;

impl ChildPriority {
    /// Lowers the calling process's priorities. Only async-signal-safe
    /// system calls: safe between fork and exec. Failures are ignored (a
    /// kernel without `SCHED_IDLE` still gets nice 19); nothing here can
    /// raise a priority.
    pub fn apply_to_self(self) {
        // SAFETY: plain system calls on the calling process with valid
        // arguments; no memory is allocated or shared.
        unsafe {
            match self.cpu {
                CpuPriority::Idle => {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                }
                CpuPriority::Low => {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
                CpuPriority::Normal => {}
            }
            let io = match self.io {
                IoPriority::Idle => Some(IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT),
                IoPriority::Low => Some((IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7),
                IoPriority::Normal => None,
            };
            if let Some(value) = io {
                libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value);
            }
        }
    }
}

/// What the status page and `worker status --json` show about how builds
/// are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildIsolation {
    /// `cgroup` (one per build) or `process-tree`.
    pub accounting: String,
    /// Where build cgroups are created, in cgroup mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    pub cpu_priority: CpuPriority,
    pub io_priority: IoPriority,
    /// The configured `cpu.weight`, and whether build cgroups get it.
    pub cpu_weight: u32,
    pub cpu_weight_applied: bool,
    /// The `memory.high` ceiling in bytes, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high_bytes: Option<u64>,
    pub memory_high_applied: bool,
    /// Why a configured setting is not in effect, in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_and_shares_parse() {
        assert_eq!(MemoryLimit::parse("4G"), Ok(MemoryLimit::Bytes(4 << 30)));
        assert_eq!(
            MemoryLimit::parse("512 MiB"),
            Ok(MemoryLimit::Bytes(512 << 20))
        );
        assert_eq!(
            MemoryLimit::parse("1073741824"),
            Ok(MemoryLimit::Bytes(1 << 30))
        );
        assert_eq!(MemoryLimit::parse("75%"), Ok(MemoryLimit::Percent(75.0)));
        assert_eq!(MemoryLimit::Percent(50.0).bytes(8 << 30), 4 << 30);
        for bad in ["", "lots", "4X", "0%", "120%", "1K", "-3G", "99999999999T"] {
            assert!(MemoryLimit::parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(MemoryLimit::parse("4X").unwrap_err().contains("\"4X\""));
    }

    #[test]
    fn defaults_favour_the_owner() {
        let settings = BuildSettings::default();
        assert_eq!(settings.cpu_priority, CpuPriority::Idle);
        assert_eq!(settings.io_priority, IoPriority::Idle);
        assert_eq!(settings.cpu_weight, 1);
        assert_eq!(settings.cgroups, CgroupUse::Auto);
        assert!(settings.problems().is_empty());
    }

    #[test]
    fn a_child_applies_idle_priorities_that_its_children_inherit() {
        use std::os::unix::process::CommandExt;
        let priority = ChildPriority {
            cpu: CpuPriority::Idle,
            io: IoPriority::Idle,
        };
        let mut command = std::process::Command::new("sh");
        // The grandchild reports its scheduling policy (field 41 of stat),
        // nice value (field 19) and I/O priority class via ionice when present.
        command
            .arg("-c")
            .arg("sh -c 'cut -d\" \" -f19,41 /proc/$$/stat'");
        // SAFETY: apply_to_self only makes async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || {
                priority.apply_to_self();
                Ok(())
            });
        }
        let output = command.output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields, ["19", "5"], "nice 19 and SCHED_IDLE (5): {text}");

        // The I/O priority: the idle class.
        let mut sleeper = std::process::Command::new("sleep");
        sleeper.arg("30");
        // SAFETY: as above.
        unsafe {
            sleeper.pre_exec(move || {
                priority.apply_to_self();
                Ok(())
            });
        }
        let mut sleeper = sleeper.spawn().unwrap();
        // SAFETY: ioprio_get reads another process's I/O priority.
        let io = unsafe {
            libc::syscall(
                libc::SYS_ioprio_get,
                IOPRIO_WHO_PROCESS,
                sleeper.id() as libc::c_int,
            )
        };
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert_eq!(io >> IOPRIO_CLASS_SHIFT, IOPRIO_CLASS_IDLE as libc::c_long);
    }
}
