//! The supervised CI agent as a process: started in its own process group
//! inside the build accounting, recorded in `state_dir/supervised.pid`
//! (pid and kernel start time, so a reused pid is never mistaken for it),
//! found again after a crash, watched for exit through a pidfd, and looked
//! at for child processes (a running job).
#![allow(
    unsafe_code,
    reason = "signalling and re-parenting the supervised CI agent use syscalls without a safe wrapper; each block says why it is sound"
)]

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use nightshift_proto::wire::BuildId;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use super::settings::SuperviseSettings;
use crate::build_processes::load::BuildTrees;

/// The build id the supervised agent is accounted under in [`BuildTrees`]
/// (the master's build ids never come near it).
pub const SUPERVISED_BUILD_ID: BuildId = u64::MAX;
/// The environment variable that marks the agent as this worker's, so a
/// leftover is recognised (and a neighbour's agent is never touched).
pub const MARKER_VAR: &str = "NIGHTSHIFT_SUPERVISED";
const PIDFILE: &str = "supervised.pid";

/// The marker value: the state directory identifies the worker.
pub fn marker(state_dir: &Path) -> String {
    format!("{MARKER_VAR}={}", state_dir.display())
}

/// A CI agent that a previous run of this worker started and left running.
#[derive(Debug)]
pub struct Leftover {
    pub pid: i32,
    /// Becomes readable when the process exits.
    pub exit: AsyncFd<OwnedFd>,
}

/// Looks for a CI agent left by a crashed run (pidfile, same start time,
/// our marker in its environment). Call before `BuildTrees::kill_leftovers`:
/// a found one is taken out of the build records so it is stopped
/// gracefully (its job finishes) rather than killed.
pub fn claim_leftover(state_dir: &Path) -> Option<Leftover> {
    let pidfile = state_dir.join(PIDFILE);
    let text = fs_err::read_to_string(&pidfile).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    let start: u64 = fields.next()?.parse().ok()?;
    let alive = pid > 0
        && stat_fields(pid).is_some_and(|stat| stat.start_time == start)
        && environ_has(pid, &marker(state_dir));
    if !alive {
        let _ = fs_err::remove_file(&pidfile);
        return None;
    }
    let exit = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(
                "a CI agent left by an earlier run (pid {pid}) is still running but cannot be watched ({error}); stopping it at once"
            );
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = fs_err::remove_file(&pidfile);
            return None;
        }
    };
    // The build record would make `kill_leftovers` SIGKILL it; it is
    // stopped gracefully by the supervisor instead.
    let _ = fs_err::remove_file(
        state_dir
            .join("running")
            .join(SUPERVISED_BUILD_ID.to_string()),
    );
    Some(Leftover { pid, exit })
}

fn pidfd_open(pid: i32) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `fd` is an open pidfd that the AsyncFd owns (and closes)
    // for its whole lifetime.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|error| std::io::Error::other(error.to_string()))
}

/// Starts the agent: own process group, the build cgroup when there is one,
/// the marker in its environment, the configured user. Records it in the
/// build accounting and the pidfile.
pub fn start(
    settings: &SuperviseSettings,
    state_dir: &Path,
    trees: &BuildTrees,
) -> std::io::Result<tokio::process::Child> {
    fs_err::create_dir_all(&settings.workdir)?;
    let mut command = tokio::process::Command::new(&settings.command);
    command
        .args(&settings.args)
        .current_dir(&settings.workdir)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false)
        .env(MARKER_VAR, state_dir.display().to_string());
    let user = match &settings.user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .map_err(std::io::Error::from)?
                .ok_or_else(|| std::io::Error::other(format!("no user named \"{name}\"")))?,
        ),
        None => None,
    };
    let groups = match &user {
        Some(user) => {
            let name = std::ffi::CString::new(user.name.as_str()).map_err(std::io::Error::other)?;
            command
                .env("HOME", &user.dir)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name);
            Some(nix::unistd::getgrouplist(&name, user.gid).map_err(std::io::Error::from)?)
        }
        None => None,
    };
    command.envs(&settings.env);
    let cgroup = trees.begin(SUPERVISED_BUILD_ID);
    let procs = cgroup
        .map(|dir| std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes()))
        .transpose()
        .map_err(std::io::Error::other)?;
    let ids = user.map(|user| (user.uid.as_raw(), user.gid.as_raw()));
    let groups: Option<Vec<libc::gid_t>> =
        groups.map(|groups| groups.iter().map(|gid| gid.as_raw()).collect());
    // SAFETY: the closure only makes async-signal-safe system calls (open,
    // write, close, setgroups, setgid, setuid) on memory prepared before
    // the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    // Failure leaves it in the agent's cgroup; the process
                    // group accounting still covers it.
                    let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if let Some((uid, gid)) = ids {
                let groups = groups.as_deref().unwrap_or(&[]);
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            trees.end(SUPERVISED_BUILD_ID);
            return Err(error);
        }
    };
    if let Some(pid) = child.id() {
        let pid = pid as i32;
        trees.set_step_group(SUPERVISED_BUILD_ID, Some(pid));
        let start = stat_fields(pid).map_or(0, |stat| stat.start_time);
        let pidfile = state_dir.join(PIDFILE);
        if let Err(error) = fs_err::write(&pidfile, format!("{pid} {start}\n")) {
            tracing::warn!(
                "cannot write {}: {error}; a crash of this agent would leave the CI agent unrecognised",
                pidfile.display()
            );
        }
    }
    Ok(child)
}

/// The agent is gone: forget it in the accounting and the pidfile, and kill
/// whatever it left in its process group.
pub fn forget(pid: i32, state_dir: &Path, trees: &BuildTrees) {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    trees.end(SUPERVISED_BUILD_ID);
    let _ = fs_err::remove_file(state_dir.join(PIDFILE));
}

/// Sends `signal` to the agent itself (its jobs are its business); SIGKILL
/// goes to the whole process group.
pub fn signal(pid: i32, signal: Signal) -> nix::Result<()> {
    if signal == Signal::SIGKILL {
        killpg(Pid::from_raw(pid), Signal::SIGKILL).or_else(|_| kill(Pid::from_raw(pid), signal))
    } else {
        kill(Pid::from_raw(pid), signal)
    }
}

/// Whether `pid` has child processes (a job, for agents that run jobs as
/// children). One walk over `/proc`.
pub fn has_children(pid: i32) -> bool {
    let Ok(entries) = fs_err::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat_fields)
        .any(|stat| stat.ppid == pid)
}

struct StatFields {
    ppid: i32,
    start_time: u64,
}

fn stat_fields(pid: i32) -> Option<StatFields> {
    let text = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'. Then: state ppid pgrp ... starttime (field 22).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(StatFields {
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn environ_has(pid: i32, entry: &str) -> bool {
    fs_err::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|data| data.split(|b| *b == 0).any(|item| item == entry.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_reads_parent_and_start_time() {
        let me = std::process::id() as i32;
        let stat = stat_fields(me).unwrap();
        assert_eq!(stat.ppid, nix::unistd::getppid().as_raw());
        assert!(stat.start_time > 0);
    }

    #[tokio::test]
    async fn a_leftover_is_claimed_only_with_our_marker_and_start_time() {
        let state = tempfile::tempdir().unwrap();
        let trees = BuildTrees::without_cgroups();
        let settings = SuperviseSettings {
            kind: super::super::settings::SupervisedKind::Command,
            command: "sleep".into(),
            args: vec!["30".into()],
            graceful_signal: Signal::SIGTERM,
            hard_signal: Signal::SIGKILL,
            stop_timeout: std::time::Duration::from_secs(5),
            workdir: state.path().join("work"),
            user: None,
            env: Default::default(),
            reluctant: Default::default(),
        };
        let mut child = start(&settings, state.path(), &trees).unwrap();
        let pid = child.id().unwrap() as i32;
        assert!(state.path().join(PIDFILE).exists());
        assert!(!has_children(pid));

        // Another worker's state dir does not recognise it.
        let other = tempfile::tempdir().unwrap();
        fs_err::copy(state.path().join(PIDFILE), other.path().join(PIDFILE)).unwrap();
        assert!(claim_leftover(other.path()).is_none());
        assert!(
            !other.path().join(PIDFILE).exists(),
            "a stale pidfile is removed"
        );

        let leftover = claim_leftover(state.path()).expect("our own agent is recognised");
        assert_eq!(leftover.pid, pid);
        signal(pid, Signal::SIGTERM).unwrap();
        let _ = child.wait().await;
        // The pidfd reports the exit.
        let ready =
            tokio::time::timeout(std::time::Duration::from_secs(10), leftover.exit.readable())
                .await;
        assert!(ready.is_ok());
        forget(pid, state.path(), &trees);
        assert!(!state.path().join(PIDFILE).exists());
        assert!(claim_leftover(state.path()).is_none());
    }
}
