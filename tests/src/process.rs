//! Process helpers: pidfd exit waits, signals, and spawned processes whose output is read line by line.

use crate::*;

/// Resolves when process `pid` has exited (a pidfd turns readable), without
/// reaping it, so its `Child` still gets the exit status.
#[allow(unsafe_code, reason = "pidfd_open has no safe wrapper in nix or std")]
pub(super) async fn process_exited(pid: u32) -> anyhow::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (or -1); it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        bail!(
            "cannot watch process {pid}: pidfd_open: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is a descriptor pidfd_open just opened for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `fd` is an open descriptor the AsyncFd owns (and so keeps
    // open, unchanged) until it is dropped.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow!("cannot register a pidfd with tokio: {e}"))?;
    let _ready = watched.readable().await?;
    Ok(())
}

pub(super) fn send_signal(pid: u32, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .with_context(|| format!("cannot signal process {pid}"))
}

/// Waits (on a pidfd, not by polling) for `child` to exit, then reaps it;
/// kills it after `deadline`.
pub(super) async fn wait_child(
    child: &mut Child,
    deadline: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    match tokio::time::timeout(deadline, process_exited(child.id())).await {
        Ok(exited) => {
            exited?;
            Ok(child.wait()?)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not exit within {deadline:?}", child.id());
        }
    }
}

/// A process a test started, its stdout read line by line as it comes (a
/// thread per process); killed on drop.
pub struct Spawned {
    name: String,
    child: Option<Child>,
    lines: tokio::sync::watch::Receiver<Vec<String>>,
}

impl Spawned {
    /// Spawns `command` with stdin closed and stdout read here (stderr as
    /// the caller set it).
    pub fn start(name: &str, mut command: Command) -> anyhow::Result<Spawned> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (sender, lines) = tokio::sync::watch::channel(Vec::new());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sender.send_modify(|seen| seen.push(line));
            }
        });
        Ok(Spawned {
            name: name.to_owned(),
            child: Some(child),
            lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.borrow().clone()
    }

    /// Waits for a stdout line matching `matches` and returns it; fails at
    /// once if the process exits (or closes stdout) first, and after
    /// [`DEADLINE`].
    pub async fn wait_line(
        &self,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let find = |seen: &Vec<String>| seen.iter().find(|l| matches(l)).cloned();
        let mut lines = self.lines.clone();
        let pid = self.pid();
        let outcome = tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                seen = lines.wait_for(|seen| find(seen).is_some()) => seen.ok().and_then(|seen| find(&seen)),
                _ = process_exited(pid) => None,
            }
        })
        .await;
        match outcome {
            Ok(Some(line)) => Ok(line),
            // It may have printed the line just before it ended.
            Ok(None) => find(&self.lines.borrow()).with_context(|| {
                format!(
                    "{} ended before it printed {what}; its stdout:\n{}",
                    self.name,
                    self.lines().join("\n")
                )
            }),
            Err(_) => bail!(
                "{} did not print {what} within {DEADLINE:?}; its stdout:\n{}",
                self.name,
                self.lines().join("\n")
            ),
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// Waits for the process to exit and reaps it; kills it after `deadline`.
    pub async fn wait_exit(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} was already reaped", self.name))?;
        wait_child(&mut child, deadline).await
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
