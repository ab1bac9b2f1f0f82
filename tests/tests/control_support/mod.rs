//! Shared by the control-plane tests (`control_plane.rs`, `browser.rs`): the
//! real `worker` and `master` binaries started in temporary directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

/// How long anything that should happen may take on a loaded CI machine.
pub const WAIT: Duration = Duration::from_secs(60);

/// The directory holding `worker` and `master`: `NIGHTSHIFT_BIN_DIR`, else
/// the profile dir above this test executable (`target/<profile>/deps/..`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NIGHTSHIFT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("locating target/<profile>")?
        .to_path_buf();
    for name in ["worker", "master"] {
        if !dir.join(name).exists() {
            bail!(
                "{} has no `{name}` binary: run `cargo build --workspace --bins` first",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Collects a child's stderr (for failure messages) without blocking it.
fn collect(stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut log) = sink.lock() {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    log
}

fn text(log: &Arc<Mutex<String>>) -> String {
    log.lock().map(|log| log.clone()).unwrap_or_default()
}

/// A `master run` with plain HTTP on a free loopback port.
pub struct Master {
    child: Child,
    pub url: String,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Master {
    /// Starts a master that knows `worker`; returns it and the worker's token.
    pub async fn start(worker: &str) -> anyhow::Result<(Master, String)> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir()?;
        let added = Command::new(bin.join("master"))
            .args(["add-worker", worker])
            .output()
            .await?;
        if !added.status.success() {
            bail!(
                "master add-worker: {}",
                String::from_utf8_lossy(&added.stderr)
            );
        }
        let added = String::from_utf8(added.stdout)?;
        let line = |prefix: &str| {
            added
                .lines()
                .find(|line| line.starts_with(prefix))
                .map(str::to_owned)
                .with_context(|| format!("no `{prefix}` line in:\n{added}"))
        };
        let (hash, token_line) = (line("token_sha256 = ")?, line("token = ")?);
        let token = token_line
            .trim_start_matches("token = ")
            .trim_matches('"')
            .to_owned();
        let config = dir.path().join("master.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\ninsecure = true\n\n[[worker]]\nname = \"{worker}\"\n{hash}\n"
            ),
        )?;
        let mut child = Command::new(bin.join("master"))
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting `master run`")?;
        let log = collect(child.stderr.take().context("master's stderr")?);
        let mut stdout = BufReader::new(child.stdout.take().context("master's stdout")?).lines();
        let url = tokio::time::timeout(WAIT, async {
            while let Some(line) = stdout.next_line().await? {
                if let Some(at) = line.find("ready on ") {
                    return anyhow::Ok(line[at + "ready on ".len()..].trim().to_owned());
                }
            }
            bail!("`master run` ended before it was ready")
        })
        .await
        .context("`master run` did not say it was ready")?
        .with_context(|| text(&log))?;
        // Keep draining stdout so the master never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        Ok((
            Master {
                child,
                url,
                config,
                dir,
                log,
            },
            token,
        ))
    }

    /// The agent's master URL (`ws://…`).
    pub fn ws_url(&self) -> String {
        self.url.replacen("http://", "ws://", 1)
    }

    /// `master workers --json`.
    pub async fn workers(&self) -> anyhow::Result<Value> {
        let output = Command::new(bin_dir()?.join("master"))
            .args(["workers", "--json", "--url", &self.url, "--config"])
            .arg(&self.config)
            .output()
            .await?;
        if !output.status.success() {
            bail!(
                "master workers: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                text(&self.log)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// The entry for `name` in `master workers --json`.
    pub async fn worker(&self, name: &str) -> anyhow::Result<Value> {
        let workers = self.workers().await?;
        workers["workers"]
            .as_array()
            .and_then(|list| list.iter().find(|worker| worker["name"] == name))
            .cloned()
            .with_context(|| format!("no worker {name} in {workers}"))
    }

    /// Re-reads the master's view until `check` holds. The master's CLI has
    /// no watch endpoint, so this re-asks (every 100 ms, up to [`WAIT`]).
    pub async fn wait_for_worker(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let worker = self.worker(name).await?;
            if check(&worker) {
                return Ok(worker);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the master never saw {what}; last: {worker}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A `worker run` in its own directory; started means it told systemd
/// `READY=1` (control socket bound, first evaluation done).
pub struct Agent {
    child: Option<Child>,
    pub config: PathBuf,
    pub dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Writes `worker.toml` into `dir` and starts the agent.
    pub async fn start(dir: &Path, config_text: &str) -> anyhow::Result<Agent> {
        let config = dir.join("worker.toml");
        std::fs::write(&config, config_text)?;
        let mut agent = Agent {
            child: None,
            config,
            dir: dir.to_path_buf(),
            log: Arc::new(Mutex::new(String::new())),
        };
        agent.restart().await?;
        Ok(agent)
    }

    /// Starts the agent again (after it exited) with the same config.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let notify_path = self.dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        let mut child = Command::new(bin_dir()?.join("worker"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting `worker run`")?;
        self.log = collect(child.stderr.take().context("worker's stderr")?);
        let ready = tokio::time::timeout(WAIT, async {
            let mut buffer = vec![0u8; 4096];
            loop {
                tokio::select! {
                    received = notify.recv(&mut buffer) => {
                        let message = String::from_utf8_lossy(&buffer[..received?]).into_owned();
                        if message.lines().any(|line| line == "READY=1") {
                            return anyhow::Ok(());
                        }
                    }
                    status = child.wait() => bail!("`worker run` exited early: {}", status?),
                }
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(error)) => bail!("{error}\n{}", text(&self.log)),
            Err(_) => bail!(
                "`worker run` did not report READY=1 within {WAIT:?}\n{}",
                text(&self.log)
            ),
        }
        self.child = Some(child);
        Ok(())
    }

    /// The status page's URL, from `state/control.addr`.
    pub fn url(&self) -> anyhow::Result<String> {
        let path = self.dir.join("state").join("control.addr");
        let addr = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(format!("http://{}/", addr.trim()))
    }

    /// Runs `worker ARGS --config <this agent's config>`.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(bin_dir()?.join("worker"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .await?)
    }

    /// `worker stop`, then waits for the process to exit 0.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let output = self.cli(&["stop"]).await?;
        if !output.status.success() {
            bail!("worker stop: {}", String::from_utf8_lossy(&output.stderr));
        }
        self.wait_exit().await
    }

    /// Waits for the agent to exit, which must be a success.
    pub async fn wait_exit(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the agent is not running")?;
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .context("the agent did not exit")??;
        if !status.success() {
            bail!("`worker run` exited with {status}\n{}", text(&self.log));
        }
        Ok(())
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the agent is not running")?;
        child.kill().await?;
        Ok(())
    }

    pub fn log(&self) -> String {
        text(&self.log)
    }
}
