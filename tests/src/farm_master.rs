//! A farm's master process: start, stop, kill, its log and CLI.

use crate::*;

impl Farm {
    /// Starts `master run --config` and waits for its ready line
    /// (`nightshift master ready on URL`). Its stderr goes to `master.log`
    /// in the farm dir. The first start learns the port the master bound.
    pub async fn start_master(&mut self) -> anyhow::Result<()> {
        if self.master.is_some() {
            bail!("the master is already running");
        }
        let log = self.dir.path().join("master.log");
        let stderr = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context("cannot open master.log")?
            .into_file();
        // A relative `--config` from the farm's directory, as an admin types
        // it: paths derived from it must still hold for processes the
        // master starts elsewhere (latent instances).
        let config = self
            .config
            .strip_prefix(self.dir.path())
            .unwrap_or(&self.config)
            .to_path_buf();
        let mut command = Command::new(self.master_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(self.dir.path())
            .env("NIGHTSHIFT_LOG", "info")
            .envs(self.master_env.iter().map(|(k, v)| (k, v)))
            .stderr(stderr);
        let master = Spawned::start("master", command)?;
        let ready = master
            .wait_line("the ready line", |line| {
                line.starts_with("nightshift master ready on")
            })
            .await;
        let ready = match ready {
            Ok(line) => line,
            Err(e) => bail!("{e:#}; its log:\n{}", self.master_log()),
        };
        let port = ready
            .rsplit(':')
            .next()
            .and_then(|port| port.trim().parse::<u16>().ok())
            .with_context(|| format!("no port on the master's ready line {ready:?}"))?;
        if self.port == 0 {
            let text = fs_err::read_to_string(&self.config).context("cannot read master.toml")?;
            let text = text.replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{port}\""),
                1,
            );
            fs_err::write(&self.config, text).context("cannot rewrite master.toml")?;
            self.port = port;
        } else if port != self.port {
            bail!("the master came back on port {port}, not {}", self.port);
        }
        self.master = Some(master);
        Ok(())
    }

    /// SIGKILLs the master (no cleanup at all) and reaps it.
    pub async fn kill_master(&mut self) -> anyhow::Result<()> {
        let mut master = self.master.take().context("the master is not running")?;
        master.signal(nix::sys::signal::Signal::SIGKILL)?;
        master.wait_exit(DEADLINE).await?;
        Ok(())
    }

    /// The master's process id, while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Spawned::pid)
    }

    /// SIGTERMs the master and returns its exit code.
    pub async fn stop_master(&mut self) -> anyhow::Result<Option<i32>> {
        let mut master = self.master.take().context("the master is not running")?;
        master.signal(nix::sys::signal::Signal::SIGTERM)?;
        Ok(master.wait_exit(DEADLINE).await?.code())
    }

    /// What the master printed on stdout so far (the ready lines).
    pub fn master_stdout(&self) -> Vec<String> {
        self.master.as_ref().map(Spawned::lines).unwrap_or_default()
    }

    /// The master's log so far.
    pub fn master_log(&self) -> String {
        fs_err::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }
}

impl Farm {
    /// Runs the `master` CLI against this farm; returns (exit code, stdout, stderr).
    pub fn master_cli(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let output = Command::new(self.master_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// A started master (no agents yet) for workers `a` and `b`: both may
    /// build `app`; only `a` may build `release`.
    pub async fn with_release(missing_timeout: &str) -> anyhow::Result<Farm> {
        Farm::builder()
            .worker(WorkerSpec::new("a"))
            .worker(WorkerSpec::new("b"))
            .builder("app", &["a", "b"], &[("build", "echo building")])
            .builder("release", &["a"], &[("build", "echo releasing")])
            .missing_timeout(missing_timeout)
            .start()
            .await
    }

    /// The master's `/metrics` text (with the admin token).
    pub async fn master_metrics(&self) -> anyhow::Result<String> {
        let (status, text) = self.api()?.call_raw("GET", "/metrics", None).await?;
        if status != 200 {
            bail!("/metrics answered {status}: {text}");
        }
        Ok(text)
    }
}

/// The value of the sample `name{labels}` in a Prometheus text (labels as
/// written, e.g. `what="result",reason="not_handed_to_it"`), or 0 when
/// absent.
pub fn metric_sample(text: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|line| line.strip_prefix(&key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
