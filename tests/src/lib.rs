//! The end-to-end harness: finds the real `master` and `worker` binaries,
//! starts a farm on loopback in a temporary directory (master.toml, data dir,
//! TLS pin, tokens), starts real agents or raw fake agents, waits on
//! conditions with deadlines, and kills every process it started on drop.
//!
//! A typical test:
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use nightshift_tests::{Farm, WorkerSpec};
//! let mut farm = Farm::builder()
//!     .worker(WorkerSpec::new("w1"))
//!     .builder("app", &["w1"], &[("build", "echo hi")])
//!     .start()?;
//! farm.start_worker("w1")?;
//! let api = farm.api()?;
//! let id = api.submit("app", Default::default()).await?.build_id;
//! let build = farm.wait_build(id).await?;
//! # Ok(()) }
//! ```
//!
//! Everything waits with generous deadlines ([`DEADLINE`]) so a loaded CI
//! machine does not make tests flaky; nothing sleeps to "let things settle".

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use nightshift_policy::{Presence, PresenceState, Source};
use nightshift_proto::api::{ApiClient, BuildInfo, BuildState, MasterUrl, WorkerInfo};
use nightshift_proto::wire::{AgentMessage, BuildId, MasterMessage, PROTOCOL_VERSION, WS_PATH};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long any "this should happen" wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(45);

/// The directory holding the built `master` and `worker` binaries:
/// `NIGHTSHIFT_BIN_DIR`, else the `target/<profile>` directory above this
/// test executable.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NIGHTSHIFT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        if d.join("master").is_file() && d.join("worker").is_file() {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    bail!(
        "cannot find the `master` and `worker` binaries above {}; run `cargo build --workspace` \
         first or set NIGHTSHIFT_BIN_DIR",
        exe.display()
    )
}

/// A free loopback TCP port (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a port")?;
    Ok(listener.local_addr()?.port())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A fresh random token (128 bits from /dev/urandom, hex).
pub fn new_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        panic!("cannot read /dev/urandom for a test token: {e}");
    }
    hex::encode(bytes)
}

/// Calls `check` until it returns `Some`, or fails after `deadline` naming
/// `what`. For conditions only visible through the API; builds should be
/// awaited with [`Farm::wait_build`], which long-polls.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > deadline {
            bail!(
                "timed out after {deadline:?} waiting for {what}{}",
                last_error
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `[[worker]]` of the farm.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub name: String,
    pub token: String,
    pub max_builds: u32,
    /// Extra lines for this worker's worker.toml (e.g. `[availability]`).
    pub worker_toml_extra: String,
}

impl WorkerSpec {
    pub fn new(name: &str) -> WorkerSpec {
        WorkerSpec {
            name: name.to_owned(),
            token: new_token(),
            max_builds: 1,
            worker_toml_extra: String::new(),
        }
    }
    pub fn max_builds(mut self, n: u32) -> WorkerSpec {
        self.max_builds = n;
        self
    }
    /// Appends raw TOML to the worker's worker.toml.
    pub fn worker_toml(mut self, extra: &str) -> WorkerSpec {
        self.worker_toml_extra.push_str(extra);
        self.worker_toml_extra.push('\n');
        self
    }
}

/// Describes a farm before it starts.
#[derive(Debug, Clone, Default)]
pub struct FarmBuilder {
    workers: Vec<WorkerSpec>,
    builders: String,
    extra: String,
    missing_timeout: Option<String>,
}

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

impl FarmBuilder {
    pub fn worker(mut self, spec: WorkerSpec) -> FarmBuilder {
        self.workers.push(spec);
        self
    }

    /// A builder running `steps` (name, shell command) on `workers`.
    pub fn builder(mut self, name: &str, workers: &[&str], steps: &[(&str, &str)]) -> FarmBuilder {
        let workers: Vec<String> = workers.iter().map(|w| toml_str(w)).collect();
        let steps: Vec<String> = steps
            .iter()
            .map(|(n, c)| format!("{{ name = {}, command = {} }}", toml_str(n), toml_str(c)))
            .collect();
        let _ = write!(
            self.builders,
            "\n[[builder]]\nname = {}\nworkers = [{}]\nsteps = [{}]\n",
            toml_str(name),
            workers.join(", "),
            steps.join(", ")
        );
        self
    }

    /// Raw TOML appended to master.toml (e.g. `[[lock]]` sections).
    pub fn master_toml(mut self, extra: &str) -> FarmBuilder {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    /// `missing_timeout` of master.toml, e.g. `"3s"`.
    pub fn missing_timeout(mut self, timeout: &str) -> FarmBuilder {
        self.missing_timeout = Some(timeout.to_owned());
        self
    }

    /// Writes master.toml and starts the master; returns once it is ready.
    pub fn start(self) -> anyhow::Result<Farm> {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-e2e-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let port = free_port()?;
        let mut text = format!("listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n");
        if let Some(timeout) = &self.missing_timeout {
            let _ = writeln!(text, "missing_timeout = {}", toml_str(timeout));
        }
        text.push_str(&self.extra);
        for w in &self.workers {
            let _ = write!(
                text,
                "\n[[worker]]\nname = {}\ntoken_sha256 = \"{}\"\nmax_builds = {}\n",
                toml_str(&w.name),
                sha256_hex(&w.token),
                w.max_builds
            );
        }
        text.push_str(&self.builders);
        let config = dir.path().join("master.toml");
        std::fs::write(&config, &text).context("cannot write master.toml")?;
        let mut farm = Farm {
            bin: bin_dir()?,
            config,
            port,
            workers: self.workers,
            master: None,
            agents: BTreeMap::new(),
            dir,
        };
        farm.start_master()?;
        Ok(farm)
    }
}

/// A real agent process started by the farm.
pub struct AgentProcess {
    pub child: Child,
    pub config: PathBuf,
    /// The agent's control plane (`worker status` etc.).
    pub control_port: u16,
}

/// A running master (and its agents), all killed on drop.
pub struct Farm {
    bin: PathBuf,
    /// master.toml.
    pub config: PathBuf,
    pub port: u16,
    workers: Vec<WorkerSpec>,
    master: Option<Child>,
    agents: BTreeMap<String, AgentProcess>,
    /// The farm's directory (master.toml, data/, worker dirs, logs).
    pub dir: tempfile::TempDir,
}

impl Farm {
    pub fn builder() -> FarmBuilder {
        FarmBuilder::default()
    }

    pub fn master_bin(&self) -> PathBuf {
        self.bin.join("master")
    }

    pub fn worker_bin(&self) -> PathBuf {
        self.bin.join("worker")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> MasterUrl {
        MasterUrl {
            tls: true,
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// `wss://127.0.0.1:PORT`.
    pub fn ws_url(&self) -> String {
        format!("wss://127.0.0.1:{}", self.port)
    }

    /// The master's certificate pin.
    pub fn pin(&self) -> anyhow::Result<String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let path = self
            .data_dir()
            .join("tls")
            .join(nightshift_proto::tls::SELF_SIGNED_CERT_FILE);
        let cert = CertificateDer::from_pem_file(&path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(nightshift_proto::tls::cert_pin_sha256(cert.as_ref()))
    }

    /// The admin token the master generated.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.data_dir().join("admin.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// A client config trusting the master by its pin.
    pub fn tls_client(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        nightshift_proto::tls::install_crypto_provider();
        nightshift_proto::tls::client_config(None, Some(&self.pin()?))
    }

    /// A typed API client with the admin token.
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        ApiClient::new(self.url(), self.admin_token()?, Some(self.tls_client()?))
    }

    /// The spec (and token) of a configured worker.
    pub fn worker_spec(&self, name: &str) -> anyhow::Result<&WorkerSpec> {
        self.workers
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| anyhow!("no worker `{name}` in this farm"))
    }

    /// Starts `master run --config` and waits for its ready line. Its
    /// stdout/stderr go to `master.log` in the farm dir.
    pub fn start_master(&mut self) -> anyhow::Result<()> {
        if self.master.is_some() {
            bail!("the master is already running");
        }
        let log = self.dir.path().join("master.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context("cannot open master.log")?;
        let mut child = Command::new(self.master_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("NIGHTSHIFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.master_bin().display()))?;
        let stdout = child.stdout.take().context("no master stdout")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("nightshift master ready on")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        self.master = Some(child);
        match ready_rx.recv_timeout(DEADLINE) {
            Ok(()) => Ok(()),
            Err(_) => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("the master did not become ready within {DEADLINE:?}; its log:\n{log}")
            }
        }
    }

    /// SIGKILLs the master (no cleanup at all).
    pub fn kill_master(&mut self) -> anyhow::Result<()> {
        let mut child = self.master.take().context("the master is not running")?;
        child.kill().context("cannot kill the master")?;
        child.wait().context("cannot reap the master")?;
        Ok(())
    }

    /// The master's process id, while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// SIGTERMs the master and returns its exit code.
    pub fn stop_master(&mut self) -> anyhow::Result<Option<i32>> {
        let mut child = self.master.take().context("the master is not running")?;
        signal(child.id(), nix::sys::signal::Signal::SIGTERM)?;
        Ok(wait_child(&mut child, DEADLINE)?.code())
    }

    /// The master's log so far.
    pub fn master_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    /// Writes `name`'s worker.toml (token, pin, own dirs, free control
    /// port) and starts `worker run` for it.
    pub fn start_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is already running");
        }
        let spec = self.worker_spec(name)?.clone();
        let wdir = self.dir.path().join("workers").join(name);
        std::fs::create_dir_all(wdir.join("work"))?;
        let control_port = free_port()?;
        let text = format!(
            "name = {}\nmaster = \"{}\"\ntoken = {}\nworkdir = {}\nstate_dir = {}\nmax_builds = {}\n{}\n[control]\nlisten = \"127.0.0.1:{control_port}\"\n\n[tls]\npin_sha256 = \"{}\"\n",
            toml_str(&spec.name),
            self.ws_url(),
            toml_str(&spec.token),
            toml_str(&wdir.join("work").display().to_string()),
            toml_str(&wdir.join("state").display().to_string()),
            spec.max_builds,
            spec.worker_toml_extra,
            self.pin()?
        );
        let config = wdir.join("worker.toml");
        std::fs::write(&config, text)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(wdir.join("worker.log"))?;
        let child = Command::new(self.worker_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(&wdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.worker_bin().display()))?;
        Ok(self.agents.entry(name.to_owned()).or_insert(AgentProcess {
            child,
            config,
            control_port,
        }))
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
        Ok(())
    }

    /// Waits for an agent to exit by itself; returns its exit code.
    pub fn wait_worker_exit(
        &mut self,
        name: &str,
        deadline: Duration,
    ) -> anyhow::Result<Option<i32>> {
        let mut agent = self.agents.remove(name).context("no such running worker")?;
        Ok(wait_child(&mut agent.child, deadline)?.code())
    }

    /// A worker's log so far.
    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("workers")
                .join(name)
                .join("worker.log"),
        )
        .unwrap_or_default()
    }

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

    /// Waits (long-polling the API) until build `id` is finished.
    pub async fn wait_build(&self, id: BuildId) -> anyhow::Result<BuildInfo> {
        let api = self.api()?;
        let start = Instant::now();
        loop {
            let remaining = DEADLINE.saturating_sub(start.elapsed()).as_secs().max(1);
            let build = api.wait(id, remaining.min(30)).await?;
            if build.state == BuildState::Finished {
                return Ok(build);
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "build {id} did not finish within {DEADLINE:?}: {build:?}\nmaster log:\n{}",
                    self.master_log()
                );
            }
        }
    }

    /// Waits until build `id` satisfies `check`.
    pub async fn wait_build_state(
        &self,
        id: BuildId,
        what: &str,
        check: impl Fn(&BuildInfo) -> bool,
    ) -> anyhow::Result<BuildInfo> {
        let api = self.api()?;
        wait_for(what, DEADLINE, || {
            let api = api.clone();
            let check = &check;
            async move {
                let build = api.build(id).await?;
                Ok(check(&build).then_some(build))
            }
        })
        .await
    }

    /// Waits until the master shows worker `name` as `state`.
    pub async fn wait_worker_state(
        &self,
        name: &str,
        state: PresenceState,
    ) -> anyhow::Result<WorkerInfo> {
        let api = self.api()?;
        wait_for(&format!("worker {name} to be {state}"), DEADLINE, || {
            let api = api.clone();
            async move {
                let list = api.workers().await?;
                Ok(list.workers.into_iter().find(|w| {
                    w.name == name
                        && w.state == state
                        && (state == PresenceState::Offline || w.connected)
                }))
            }
        })
        .await
    }

    /// Connects a raw fake agent as `name` with its configured token.
    pub async fn fake_agent(&self, name: &str, state: PresenceState) -> anyhow::Result<FakeAgent> {
        let token = self.worker_spec(name)?.token.clone();
        let mut agent = FakeAgent::connect(self, Some(&token)).await?;
        agent.hello(name, state, 1, vec![]).await?;
        match agent.recv().await? {
            MasterMessage::Welcome { .. } => Ok(agent),
            other => bail!("expected welcome, got {other:?}"),
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .with_context(|| format!("cannot signal process {pid}"))
}

fn wait_child(child: &mut Child, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not exit within {deadline:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        if let Some(master) = self.master.as_mut() {
            let _ = master.kill();
            let _ = master.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- master log ---\n{}", self.master_log());
            for name in self.agents.keys() {
                eprintln!("--- worker {name} log ---\n{}", self.worker_log(name));
            }
        }
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw WebSocket client speaking the agent protocol by hand: for tests of
/// the master alone (bad tokens, garbage frames, races).
pub struct FakeAgent {
    ws: WsStream,
}

/// A presence for fake agents.
pub fn presence(state: PresenceState) -> Presence {
    Presence {
        state,
        reason: format!("fake agent says {state}"),
        source: Source::Manual,
        since: jiff::Timestamp::now(),
        until: None,
    }
}

impl FakeAgent {
    /// Opens the WebSocket (TLS, pinned) with `token` as the bearer.
    pub async fn connect(farm: &Farm, token: Option<&str>) -> anyhow::Result<FakeAgent> {
        let mut request = format!("{}{WS_PATH}", farm.ws_url()).into_client_request()?;
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let connector = tokio_tungstenite::Connector::Rustls(farm.tls_client()?);
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector))
                .await
                .context("websocket connect")?;
        Ok(FakeAgent { ws })
    }

    /// Sends a hello.
    pub async fn hello(
        &mut self,
        worker: &str,
        state: PresenceState,
        max_builds: u32,
        running: Vec<BuildId>,
    ) -> anyhow::Result<()> {
        self.send(&AgentMessage::Hello {
            protocol: PROTOCOL_VERSION,
            worker: worker.to_owned(),
            agent_version: "fake".into(),
            max_builds,
            presence: presence(state),
            running,
        })
        .await
    }

    pub async fn send(&mut self, message: &AgentMessage) -> anyhow::Result<()> {
        self.send_text(&message.encode()).await
    }

    /// Sends any text frame (garbage included).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next protocol message (pings are answered, not returned); errors
    /// when the connection closes or nothing comes within [`DEADLINE`].
    pub async fn recv(&mut self) -> anyhow::Result<MasterMessage> {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame from the master within {DEADLINE:?}"))?;
            match frame {
                None => bail!("connection closed"),
                Some(Err(e)) => bail!("connection error: {e}"),
                Some(Ok(Message::Text(text))) => {
                    let message = MasterMessage::decode(text.as_str())?;
                    if let MasterMessage::Ping { seq } = message {
                        self.send(&AgentMessage::Pong { seq }).await?;
                        continue;
                    }
                    return Ok(message);
                }
                Some(Ok(Message::Close(frame))) => {
                    bail!(
                        "connection closed: {}",
                        frame.map(|f| f.reason.to_string()).unwrap_or_default()
                    )
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits for the next `StartBuild`; returns its build id.
    pub async fn expect_start(&mut self) -> anyhow::Result<BuildId> {
        loop {
            if let MasterMessage::StartBuild { build_id, .. } = self.recv().await? {
                return Ok(build_id);
            }
        }
    }

    /// Waits until the connection is closed by the master; returns every
    /// message received before (e.g. a `Refused`).
    pub async fn expect_closed(&mut self) -> anyhow::Result<Vec<MasterMessage>> {
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Ok(message) => seen.push(message),
                Err(e)
                    if e.to_string().contains("closed")
                        || e.to_string().contains("connection error") =>
                {
                    return Ok(seen);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts, runs (instantly) and finishes a build with `outcome` and `log`.
    pub async fn finish(
        &mut self,
        build_id: BuildId,
        outcome: nightshift_proto::wire::Outcome,
        log: &str,
    ) -> anyhow::Result<()> {
        use nightshift_proto::wire::{BuildResult, StepResult};
        let now = jiff::Timestamp::now();
        self.send(&AgentMessage::BuildAccepted { build_id }).await?;
        self.send(&AgentMessage::Output {
            build_id,
            step: 0,
            data: log.to_owned(),
        })
        .await?;
        self.send(&AgentMessage::BuildFinished {
            result: BuildResult {
                build_id,
                outcome,
                steps: vec![StepResult {
                    step: 0,
                    outcome,
                    exit_code: Some(if outcome == nightshift_proto::wire::Outcome::Success {
                        0
                    } else {
                        1
                    }),
                    signal: None,
                    started_at: now,
                    finished_at: now,
                }],
                reason: None,
                log: log.to_owned(),
                finished_at: now,
            },
        })
        .await
    }

    /// Reads frames WITHOUT answering heartbeats (a hung agent) until the
    /// master drops the connection; returns how long that took.
    pub async fn stay_silent_until_dropped(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let frame =
                tokio::time::timeout(deadline.saturating_sub(start.elapsed()), self.ws.next())
                    .await
                    .map_err(|_| anyhow!("the master kept a silent connection for {deadline:?}"))?;
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(start.elapsed()),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Closes the connection cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
