//! A farm's real agents: worker.toml, start, stop, kill, restart, readiness, CLI and control plane.

use crate::*;

/// A real agent process started by the farm.
pub struct AgentProcess {
    pub child: Child,
    pub config: PathBuf,
    /// Every sd_notify message the agent sent on its `NOTIFY_SOCKET`, in
    /// order (`READY=1`, `STATUS=…`, `STOPPING=1`).
    notifications: tokio::sync::watch::Receiver<Vec<String>>,
}

impl AgentProcess {
    /// The sd_notify messages the agent has sent so far.
    pub fn notifications(&self) -> Vec<String> {
        self.notifications.borrow().clone()
    }

    /// The agent's sd_notify messages as they come, to await one.
    pub fn notifications_watch(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.notifications.clone()
    }
}

/// Binds `path` as the agent's `NOTIFY_SOCKET` and reads it on a thread for
/// as long as the returned receiver (or a clone) lives, so the agent never
/// blocks on a full socket queue. Each datagram's lines become messages.
fn listen_for_notifications(
    path: &std::path::Path,
) -> anyhow::Result<tokio::sync::watch::Receiver<Vec<String>>> {
    use std::os::unix::net::UnixDatagram;
    let _ = fs_err::remove_file(path);
    let socket = UnixDatagram::bind(path)
        .with_context(|| format!("cannot bind the notify socket {}", path.display()))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .context("cannot set the notify socket's read timeout")?;
    let (sender, receiver) = tokio::sync::watch::channel(Vec::new());
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 4096];
        // The timeout only lets the thread notice that nobody listens any more.
        while !sender.is_closed() {
            match socket.recv(&mut buffer) {
                Ok(length) => {
                    let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                    sender.send_modify(|seen| seen.extend(text.lines().map(str::to_owned)));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        // The socket file stays: a restarted agent's new socket may already
        // have replaced it at this path.
    });
    Ok(receiver)
}

impl Farm {
    /// The directory of worker `name`: its worker.toml, `work/`, `state/`
    /// and `worker.log`.
    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("workers").join(name)
    }

    /// `name`'s worker.toml (written by [`Farm::write_worker_config`] or
    /// [`Farm::start_worker`]).
    pub fn worker_config(&self, name: &str) -> PathBuf {
        self.worker_dir(name).join("worker.toml")
    }

    /// `name`'s `state_dir` (control socket, token and address, manual state).
    pub fn worker_state_dir(&self, name: &str) -> PathBuf {
        self.worker_dir(name).join("state")
    }

    /// Writes `name`'s worker.toml (token, pin or `insecure`, own dirs, a
    /// free control port, the spec's extra TOML) without starting the agent;
    /// returns its path. For CLI tests that need a config but no agent.
    pub fn write_worker_config(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is running; stop it before rewriting its worker.toml");
        }
        let spec = self.worker_spec(name)?.clone();
        let wdir = self.worker_dir(name);
        fs_err::create_dir_all(wdir.join("work"))
            .with_context(|| format!("cannot create {}", wdir.display()))?;
        let trust = if self.insecure {
            "insecure = true\n".to_owned()
        } else {
            format!("\n[tls]\npin_sha256 = \"{}\"\n", self.pin()?)
        };
        // `insecure` is a top-level key, so it must come before any table.
        let (top, tables) = if self.insecure {
            (trust.as_str(), "")
        } else {
            ("", trust.as_str())
        };
        let token = match &spec.enroll_token {
            // Enrols on its first `worker run` (or `worker enroll`).
            Some(enroll_token) => {
                let enroll_file = wdir.join("enroll.token");
                fs_err::write(&enroll_file, format!("{enroll_token}\n"))?;
                format!(
                    "enroll_token_file = {}\ntoken_file = {}",
                    toml_str(&enroll_file.display().to_string()),
                    toml_str(&wdir.join("worker.token").display().to_string())
                )
            }
            None => format!(
                "token = {}",
                toml_str(spec.presented_token.as_deref().unwrap_or(&spec.token))
            ),
        };
        let text = format!(
            "name = {}\nmaster = \"{}\"\n{token}\nworkdir = {}\nstate_dir = {}\nmax_builds = {}\n{top}{}\n[control]\nlisten = \"127.0.0.1:0\"\n{tables}",
            toml_str(&spec.name),
            self.ws_url(),
            toml_str(&wdir.join("work").display().to_string()),
            toml_str(&self.worker_state_dir(name).display().to_string()),
            spec.max_builds,
            spec.worker_toml_extra,
        );
        let config = self.worker_config(name);
        fs_err::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        self.configured.insert(name.to_owned());
        Ok(config)
    }

    /// Writes `name`'s worker.toml (see [`Farm::write_worker_config`]) and
    /// starts `worker run` for it. Returns at once; await
    /// [`Farm::wait_worker_ready`] or a state on the master as needed.
    pub fn start_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is already running");
        }
        self.write_worker_config(name)?;
        self.spawn_worker(name)
    }

    /// Starts `name`'s agent again with the worker.toml it had before (after
    /// it exited, was stopped or killed): its state dir, manual state and
    /// log carry over. Returns at once, like [`Farm::start_worker`].
    pub fn restart_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is still running");
        }
        if !self.configured.contains(name) {
            bail!("worker `{name}` has no worker.toml yet: start it with `start_worker`");
        }
        self.spawn_worker(name)
    }

    /// Spawns `worker run --config <name's worker.toml>` with stdout and
    /// stderr appended to its `worker.log` and a `NOTIFY_SOCKET` the farm
    /// reads.
    #[allow(
        unsafe_code,
        reason = "moving the agent into its test cgroup between fork and exec has no safe wrapper"
    )]
    fn spawn_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if !self.configured.contains(name) {
            bail!("worker `{name}` has no worker.toml yet");
        }
        let wdir = self.worker_dir(name);
        let config = self.worker_config(name);
        let notify_path = wdir.join("notify.sock");
        let notifications = listen_for_notifications(&notify_path)?;
        let log = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(wdir.join("worker.log"))?
            .into_file();
        let spec = self.worker_spec(name)?.clone();
        let mut command = Command::new(self.worker_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(&wdir)
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(cgroup) = &self.worker_spec(name)?.cgroup {
            let procs =
                std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
            // SAFETY: only async-signal-safe calls (open, write, close) on
            // memory prepared before the fork.
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.worker_bin().display()))?;
        Ok(self.agents.entry(name.to_owned()).or_insert(AgentProcess {
            child,
            config,
            notifications,
        }))
    }

    /// Waits until `name`'s agent tells systemd `READY=1` (its control plane
    /// is bound and its first policy evaluation done). Fails at once if the
    /// agent exits first, and after [`DEADLINE`]; errors carry its log.
    pub async fn wait_worker_ready(&self, name: &str) -> anyhow::Result<()> {
        let agent = self
            .agents
            .get(name)
            .with_context(|| format!("worker `{name}` is not running"))?;
        let mut notifications = agent.notifications.clone();
        let pid = agent.child.id();
        let outcome = tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                seen = notifications.wait_for(|seen| seen.iter().any(|m| m == "READY=1")) => {
                    seen.map(|_| ()).map_err(|_| anyhow!("the notify socket reader stopped"))
                }
                exited = process_exited(pid) => {
                    exited?;
                    bail!("`worker run` for `{name}` exited before it was ready")
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("{e:#}; its log:\n{}", self.worker_log(name)),
            Err(_) => bail!(
                "`worker run` for `{name}` did not report READY=1 within {DEADLINE:?}; its log:\n{}",
                self.worker_log(name)
            ),
        }
    }

    /// Runs the `worker` CLI with `args` against `name`'s worker.toml
    /// (`--config` is appended), whether or not its agent runs; returns
    /// (exit code, stdout, stderr), the code -1 if a signal ended it.
    pub fn worker_cli(&self, name: &str, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let config = self.worker_config(name);
        if !config.is_file() {
            bail!(
                "worker `{name}` has no worker.toml yet ({})",
                config.display()
            );
        }
        let output = Command::new(self.worker_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.worker_bin().display()))?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Runs a `worker … --json` read command for `name`; it must exit 0 and
    /// print JSON, which is returned.
    pub fn worker_cli_json(&self, name: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let (code, stdout, stderr) = self.worker_cli(name, args)?;
        if code != 0 {
            bail!(
                "`worker {}` for `{name}` exited {code}: {stderr}",
                args.join(" ")
            );
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("`worker {}` printed no JSON: {stdout}", args.join(" ")))
    }

    /// `worker stop` (immediate: nothing to finish) for `name`, which must
    /// succeed, then waits for its agent to exit with code 0.
    pub async fn stop_worker(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.agents.contains_key(name) {
            bail!("worker `{name}` is not running");
        }
        let (code, _, stderr) = self.worker_cli(name, &["stop"])?;
        if code != 0 {
            bail!("`worker stop` for `{name}` exited {code}: {stderr}");
        }
        let exit = self.wait_worker_exit(name, DEADLINE).await?;
        if exit != Some(0) {
            bail!(
                "`worker run` for `{name}` exited with {exit:?} after `worker stop`; its log:\n{}",
                self.worker_log(name)
            );
        }
        Ok(())
    }

    /// The address `name`'s agent serves its control plane and status page
    /// on, as it wrote it to `state_dir/control.addr`: `http://HOST:PORT/`.
    pub fn worker_control_url(&self, name: &str) -> anyhow::Result<String> {
        let path = self.worker_state_dir(name).join("control.addr");
        let addr = fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(format!("http://{}/", addr.trim()))
    }

    /// The control token `name`'s agent generated into
    /// `state_dir/control.token` (`Authorization: Bearer …` on its control API).
    pub fn worker_control_token(&self, name: &str) -> anyhow::Result<String> {
        let path = self.worker_state_dir(name).join("control.token");
        Ok(fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// The agent process of `name`, if the farm started it.
    pub fn agent(&mut self, name: &str) -> Option<&mut AgentProcess> {
        self.agents.get_mut(name)
    }

    /// SIGKILLs an agent.
    pub fn kill_worker(&mut self, name: &str) -> anyhow::Result<()> {
        let mut agent = self.agents.remove(name).context("no such running worker")?;
        agent.child.kill()?;
        agent.child.wait()?;
        // The machine "died": its builds die with it.
        kill_recorded_builds(&self.worker_state_dir(name));
        Ok(())
    }

    /// Waits for an agent to exit by itself; returns its exit code.
    pub async fn wait_worker_exit(
        &mut self,
        name: &str,
        deadline: Duration,
    ) -> anyhow::Result<Option<i32>> {
        let mut agent = self.agents.remove(name).context("no such running worker")?;
        Ok(wait_child(&mut agent.child, deadline).await?.code())
    }

    /// Sends `signal` to `name`'s agent.
    pub fn signal_worker(
        &self,
        name: &str,
        signal: nix::sys::signal::Signal,
    ) -> anyhow::Result<()> {
        let agent = self
            .agents
            .get(name)
            .with_context(|| format!("worker `{name}` is not running"))?;
        send_signal(agent.child.id(), signal)
    }

    /// The port of `name`'s control plane (its worker.toml says port 0; the
    /// agent writes the bound address to `state_dir/control.addr`).
    pub fn worker_control_port(&self, name: &str) -> anyhow::Result<u16> {
        let path = self.worker_state_dir(name).join("control.addr");
        let addr = fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let addr: std::net::SocketAddr = addr
            .trim()
            .parse()
            .with_context(|| format!("{} holds no address: {addr:?}", path.display()))?;
        Ok(addr.port())
    }

    /// A worker's log so far.
    pub fn worker_log(&self, name: &str) -> String {
        fs_err::read_to_string(
            self.dir
                .path()
                .join("workers")
                .join(name)
                .join("worker.log"),
        )
        .unwrap_or_default()
    }
}

/// SIGKILLs the process groups of the builds an agent recorded as running
/// in `state_dir/running` (first line of each record: the step's process
/// group, or `-`). A SIGKILLed agent leaves its builds running, as a crashed
/// one would; the tests then end them as a dead machine would.
pub(super) fn kill_recorded_builds(state_dir: &std::path::Path) {
    let Ok(entries) = fs_err::read_dir(state_dir.join("running")) else {
        return;
    };
    for entry in entries.flatten() {
        let pgid = fs_err::read_to_string(entry.path())
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pgid) = pgid.filter(|pgid| *pgid > 1) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
