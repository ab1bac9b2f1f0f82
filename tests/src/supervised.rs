//! Harness for workers that supervise a CI agent (`[supervise]`) instead of
//! talking to a nightshift master: writes their worker.toml in a temporary
//! directory, runs the real `worker run`, reads `worker status --json`, and
//! on drop kills the agent and whatever CI agent its pidfile names.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{DEADLINE, bin_dir, free_port, wait_for};

/// A `worker run` with a `[supervise]` section.
pub struct SupervisedWorker {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl SupervisedWorker {
    /// Writes `dir/worker.toml` (name, workdir, state_dir, a free control
    /// port, then `toml`, which holds `[supervise]` and any policies) and
    /// starts the agent.
    pub fn start(dir: &Path, name: &str, toml: &str) -> anyhow::Result<SupervisedWorker> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("worker.toml");
        let text = format!(
            "name = \"{name}\"\nworkdir = \"{}\"\nstate_dir = \"{}\"\n\n[control]\nlisten = \"127.0.0.1:{}\"\n\n{toml}",
            dir.join("work").display(),
            dir.join("state").display(),
            free_port()?
        );
        std::fs::write(&config, text)?;
        let mut worker = SupervisedWorker {
            dir: dir.to_path_buf(),
            config,
            child: None,
        };
        worker.restart()?;
        Ok(worker)
    }

    /// Starts `worker run` again with the same worker.toml and state.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the worker is still running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("worker.log"))?;
        let child = Command::new(bin_dir()?.join("worker"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir)
            .env("NIGHTSHIFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start `worker run`")?;
        self.child = Some(child);
        Ok(())
    }

    /// Rewrites worker.toml (the worker must not run).
    pub fn rewrite_config(&mut self, edit: impl FnOnce(String) -> String) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the worker is still running");
        }
        let text = std::fs::read_to_string(&self.config)?;
        std::fs::write(&self.config, edit(text))?;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `worker ARGS --config worker.toml`: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let output = Command::new(bin_dir()?.join("worker"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .context("cannot run the worker CLI")?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Runs a CLI verb that must succeed.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (code, stdout, stderr) = self.cli(args)?;
        if code != 0 {
            bail!(
                "`worker {}` exited {code}: {stderr}\n--- worker log ---\n{}",
                args.join(" "),
                self.log()
            );
        }
        Ok(stdout)
    }

    /// `worker status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (code, stdout, stderr) = self.cli(&["status", "--json"])?;
        if code != 0 {
            bail!("`worker status --json` exited {code}: {stderr}");
        }
        serde_json::from_str(&stdout).context("`worker status --json` printed no JSON")
    }

    /// Waits until `check` holds for the `supervised` part of the status;
    /// returns it. Fails early if the agent exited.
    pub async fn wait_supervised(
        &mut self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let result = wait_for(what, DEADLINE, || {
            let status = self.status();
            let exited = self
                .child
                .as_mut()
                .map(|child| child.try_wait().ok().flatten());
            let check = &check;
            async move {
                if let Some(Some(exit)) = exited {
                    bail!("the worker exited ({exit})");
                }
                let supervised = status?["supervised"].clone();
                Ok(check(&supervised).then_some(supervised))
            }
        })
        .await;
        result.with_context(|| format!("--- worker log ---\n{}", self.log()))
    }

    /// Waits for the agent to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<Option<i32>> {
        let mut child = self.child.take().context("the worker is not running")?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the worker did not exit within {deadline:?}\n--- worker log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the agent (a crash): its CI agent, in its own process
    /// group, lives on.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the worker is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }

    /// The pid the supervised CI agent's pidfile names, if any.
    pub fn supervised_pidfile(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("state").join("supervised.pid"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for SupervisedWorker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.supervised_pidfile() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}
