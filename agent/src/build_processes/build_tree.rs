//! Which processes are the agent's builds when builds have no cgroup: every
//! process a build started, whatever process group or session it moved to.
//!
//! A process belongs to a build when it is in the group of that build's
//! running step, when its parent belongs to it (parent links, remembered
//! across samples so a double-forked orphan adopted by init stays counted),
//! or when its environment carries this agent's build marker
//! (`NIGHTSHIFT_AGENT=<agent pid>` with `NIGHTSHIFT_BUILD_ID=<id>`, set on
//! every step). `timeout`, `setsid` and double forks leave the group and the
//! parent chain but keep the environment.
//!
//! CPU is counted as the live members' own and reaped-children time, plus the
//! agent's reaped-children time; a member that vanishes while its parent is
//! outside the build (init reaped it) keeps its last-seen time in a retired
//! total, so the figure does not fall back when an escaped process exits.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use nightshift_proto::wire::BuildId;

/// The environment variable naming the agent a build process belongs to
/// (its [`ProcessTracker`] tag: the agent's pid).
pub const AGENT_MARKER: &str = "NIGHTSHIFT_AGENT";
/// The environment variable naming the build.
pub const BUILD_MARKER: &str = "NIGHTSHIFT_BUILD_ID";

/// A process identity that survives pid reuse: pid and start time.
type ProcessKey = (i32, u64);

/// The fields of `/proc/<pid>/stat` that accounting needs (times in ticks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub running: bool,
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
    /// Start time in ticks since boot.
    pub starttime: u64,
}

impl ProcStat {
    fn key(&self) -> ProcessKey {
        (self.pid, self.starttime)
    }

    fn total_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses one `/proc/<pid>/stat` line.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name may contain spaces and parentheses: fields start
    // after the last `)`.
    let pid = text.split_whitespace().next()?.parse().ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |index: usize| fields.get(index)?.parse::<u64>().ok();
    Some(ProcStat {
        pid,
        running: matches!(*fields.first()?, "R" | "D"),
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        utime: number(11)?,
        stime: number(12)?,
        cutime: number(13)?,
        cstime: number(14)?,
        starttime: number(19)?,
    })
}

pub fn read_stat(path: &Path) -> Option<ProcStat> {
    parse_stat(&fs_err::read_to_string(path).ok()?)
}

/// Every process on the machine (one `/proc` walk).
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = fs_err::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            entry.file_name().to_str()?.parse::<i32>().ok()?;
            read_stat(&entry.path().join("stat"))
        })
        .collect()
}

/// The value of `name` in a process's environment, when readable.
pub fn environ_value(pid: i32, name: &str) -> Option<String> {
    let environ = fs_err::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ.split(|b| *b == 0).find_map(|item| {
        item.strip_prefix(prefix.as_bytes())
            .map(|value| String::from_utf8_lossy(value).into_owned())
    })
}

/// A build without a cgroup, as the tracker sees it.
#[derive(Debug, Clone, Copy)]
pub struct TrackedBuild {
    pub build_id: BuildId,
    /// Process group of the running step.
    pub pgid: Option<i32>,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    build_id: BuildId,
    ppid: i32,
    ticks: u64,
}

/// What one scan found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TreeUsage {
    /// CPU ticks of every build process ever seen (grows).
    pub ticks: u64,
    /// Build processes running or in uninterruptible sleep.
    pub runnable: u32,
}

/// Remembers build membership between scans.
#[derive(Debug)]
pub struct ProcessTracker {
    agent_pid: i32,
    /// The value of [`AGENT_MARKER`] this agent's build processes carry.
    tag: String,
    members: HashMap<ProcessKey, Member>,
    /// Marker lookups already done, by process identity (an environment is
    /// fixed at exec; a process that execs again keeps its marker).
    markers: HashMap<ProcessKey, Option<BuildId>>,
    retired_ticks: u64,
}

impl ProcessTracker {
    /// Tracks builds of the agent `agent_pid` whose processes carry
    /// `AGENT_MARKER=tag`.
    pub fn new(agent_pid: i32, tag: String) -> ProcessTracker {
        ProcessTracker {
            agent_pid,
            tag,
            members: HashMap::new(),
            markers: HashMap::new(),
            retired_ticks: 0,
        }
    }

    /// Whether a scan is worth doing: builds run or their processes live.
    pub fn is_idle(&self, builds: &[TrackedBuild]) -> bool {
        builds.is_empty() && self.members.is_empty()
    }

    /// Classifies `processes` (a fresh `/proc` walk); returns the usage of
    /// every build process and the pids of each build's members.
    pub fn scan(
        &mut self,
        processes: &[ProcStat],
        builds: &[TrackedBuild],
    ) -> (TreeUsage, HashMap<BuildId, Vec<i32>>) {
        let by_pid: HashMap<i32, &ProcStat> = processes.iter().map(|p| (p.pid, p)).collect();
        let groups: HashMap<i32, BuildId> = builds
            .iter()
            .filter_map(|build| Some((build.pgid?, build.build_id)))
            .collect();
        let mut resolved: HashMap<i32, Option<BuildId>> = HashMap::new();
        let mut seen: HashSet<ProcessKey> = HashSet::new();
        for process in processes {
            seen.insert(process.key());
            self.resolve(process.pid, &by_pid, &groups, &mut resolved);
        }
        // Members gone since the last scan: their time moved into their
        // parent's reaped-children time when the parent was ours.
        let agent_pid = self.agent_pid;
        let mut retired = 0;
        self.members.retain(|key, member| {
            if seen.contains(key) {
                return true;
            }
            let parent_counted = member.ppid == agent_pid
                || by_pid
                    .get(&member.ppid)
                    .is_some_and(|parent| resolved.get(&parent.pid).copied().flatten().is_some());
            if !parent_counted {
                retired += member.ticks;
            }
            false
        });
        self.retired_ticks += retired;
        self.markers.retain(|key, _| seen.contains(key));

        let mut usage = TreeUsage {
            ticks: self.retired_ticks,
            runnable: 0,
        };
        let mut pids: HashMap<BuildId, Vec<i32>> = HashMap::new();
        for process in processes {
            let Some(build_id) = resolved.get(&process.pid).copied().flatten() else {
                continue;
            };
            self.members.insert(
                process.key(),
                Member {
                    build_id,
                    ppid: process.ppid,
                    ticks: process.total_ticks(),
                },
            );
            usage.ticks += process.total_ticks();
            if process.running {
                usage.runnable += 1;
            }
            pids.entry(build_id).or_default().push(process.pid);
        }
        (usage, pids)
    }

    /// The build `pid` belongs to, following parent links (iteratively:
    /// chains can be long).
    fn resolve(
        &mut self,
        pid: i32,
        by_pid: &HashMap<i32, &ProcStat>,
        groups: &HashMap<i32, BuildId>,
        resolved: &mut HashMap<i32, Option<BuildId>>,
    ) -> Option<BuildId> {
        let mut chain = Vec::new();
        let mut current = pid;
        let answer = loop {
            if let Some(known) = resolved.get(&current) {
                break *known;
            }
            let Some(process) = by_pid.get(&current) else {
                break None;
            };
            if let Some(build) = self.direct_membership(process, groups) {
                resolved.insert(current, Some(build));
                break Some(build);
            }
            chain.push(current);
            if process.ppid <= 1 || process.ppid == self.agent_pid || chain.len() > 4096 {
                break None;
            }
            current = process.ppid;
        };
        for pid in chain {
            resolved.insert(pid, answer);
        }
        answer
    }

    /// Membership a process has by itself: remembered, by group, by marker.
    fn direct_membership(
        &mut self,
        process: &ProcStat,
        groups: &HashMap<i32, BuildId>,
    ) -> Option<BuildId> {
        if let Some(member) = self.members.get(&process.key()) {
            return Some(member.build_id);
        }
        if let Some(build) = groups.get(&process.pgrp) {
            return Some(*build);
        }
        if process.pid == self.agent_pid {
            return None;
        }
        let tag = &self.tag;
        *self.markers.entry(process.key()).or_insert_with(|| {
            if environ_value(process.pid, AGENT_MARKER)? != *tag {
                return None;
            }
            environ_value(process.pid, BUILD_MARKER)?.parse().ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: i32, ppid: i32, pgrp: i32, ticks: u64) -> ProcStat {
        ProcStat {
            pid,
            ppid,
            pgrp,
            running: true,
            utime: ticks,
            stime: 0,
            cutime: 0,
            cstime: 0,
            starttime: pid as u64,
        }
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (my (odd) cmd) R 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 123 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                pid: 4242,
                ppid: 1,
                pgrp: 4242,
                running: true,
                utime: 250,
                stime: 50,
                cutime: 7,
                cstime: 3,
                starttime: 123,
            })
        );
        assert_eq!(parse_stat("12 (sh) S"), None);
    }

    #[test]
    fn children_that_left_the_group_stay_in_the_build_after_their_parent_exits() {
        // Pids here are far above any real process, so no marker is read.
        let agent = 2_000_000_000;
        let mut tracker = ProcessTracker::new(agent, "none".into());
        let builds = [TrackedBuild {
            build_id: 7,
            pgid: Some(2_000_000_100),
        }];
        // The step (group 100) ran `setsid` (group 200), which forked a burner.
        let first = [
            stat(agent, 1, agent, 1),
            stat(2_000_000_100, agent, 2_000_000_100, 5),
            stat(2_000_000_200, 2_000_000_100, 2_000_000_200, 1),
            stat(2_000_000_201, 2_000_000_200, 2_000_000_200, 50),
            stat(2_000_000_300, 1, 2_000_000_300, 999), // the owner's
        ];
        let (usage, pids) = tracker.scan(&first, &builds);
        assert_eq!(usage.ticks, 56);
        assert_eq!(usage.runnable, 3);
        let mut members = pids[&7].clone();
        members.sort_unstable();
        assert_eq!(members, [2_000_000_100, 2_000_000_200, 2_000_000_201]);

        // The intermediate exits; its child is adopted by init and burns on.
        // The step reaped the intermediate: its tick is in the step's cutime.
        let second = [
            stat(agent, 1, agent, 1),
            stat(2_000_000_100, agent, 2_000_000_100, 6),
            stat(2_000_000_201, 1, 2_000_000_200, 80),
            stat(2_000_000_300, 1, 2_000_000_300, 1999),
        ];
        let (usage, pids) = tracker.scan(&second, &builds);
        assert_eq!(usage.ticks, 86);
        assert!(pids[&7].contains(&2_000_000_201));

        // The orphan exits too (init reaps it): its time stays counted.
        let third = [
            stat(agent, 1, agent, 1),
            stat(2_000_000_100, agent, 2_000_000_100, 6),
        ];
        let (usage, _) = tracker.scan(&third, &builds);
        assert_eq!(usage.ticks, 86);
        // The step ends and the agent reaps it: its time is in the agent's
        // cutime now (counted by the caller), the orphan's stays retired.
        let (usage, _) = tracker.scan(&[stat(agent, 1, agent, 1)], &[]);
        assert_eq!(usage.ticks, 80);
        assert!(tracker.is_idle(&[]));
    }

    #[test]
    fn a_process_carrying_this_agents_marker_is_found_and_another_agents_is_not() {
        use std::os::unix::process::CommandExt;
        let me = std::process::id() as i32;
        let spawn = |agent: i32| {
            std::process::Command::new("sleep")
                .arg("30")
                .env(AGENT_MARKER, agent.to_string())
                .env(BUILD_MARKER, "42")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut ours = spawn(me);
        let mut theirs = spawn(me + 1);
        // Let both exec so their environments are the new ones.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut tracker = ProcessTracker::new(me, me.to_string());
        let builds = [TrackedBuild {
            build_id: 42,
            pgid: None,
        }];
        let processes: Vec<ProcStat> = all_processes()
            .into_iter()
            .filter(|p| p.pid != me)
            .collect();
        let (_, pids) = tracker.scan(&processes, &builds);
        let found = pids.get(&42).cloned().unwrap_or_default();
        assert!(found.contains(&(ours.id() as i32)), "{found:?}");
        assert!(!found.contains(&(theirs.id() as i32)), "{found:?}");
        for child in [&mut ours, &mut theirs] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
