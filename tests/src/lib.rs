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
//!     .start().await?;
//! farm.start_worker("w1")?;
//! let api = farm.api()?;
//! let id = api.submit("app", Default::default()).await?.build_id;
//! let build = farm.wait_build(id).await?;
//! # Ok(()) }
//! ```
//!
//! Agents get a `NOTIFY_SOCKET` the farm reads, so a test can await an
//! agent's `READY=1` ([`Farm::wait_worker_ready`]), run the `worker` CLI
//! against its worker.toml ([`Farm::worker_cli`], also before it ever ran),
//! stop, kill and restart it with the same config and state
//! ([`Farm::stop_worker`], [`Farm::kill_worker`], [`Farm::restart_worker`]),
//! and reach its control plane ([`Farm::worker_control_url`],
//! [`Farm::worker_control_token`]). [`FarmBuilder::insecure`] runs the farm
//! over plain `ws://`; [`WorkerSpec::added_by_master`] takes a worker's
//! token from `master add-worker`.
//!
//! Everything waits with generous deadlines ([`DEADLINE`]) so a loaded CI
//! machine does not make tests flaky; nothing sleeps to "let things settle".

pub mod fleet;
pub mod layering;
pub mod soak;
pub mod supervised;

mod binaries;
mod cgroup;
mod fake_agent;
mod farm_agents;
mod farm_builder;
mod farm_master;
mod farm_waits;
mod process;

pub use binaries::*;
pub use cgroup::*;
pub use fake_agent::*;
pub use farm_agents::*;
pub use farm_builder::*;
pub use process::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

/// Lowercase hex SHA-256.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A fresh random token (128 bits from /dev/urandom, hex).
pub fn new_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if let Err(e) = fs_err::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
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

/// A running master (and its agents), all killed on drop.
pub struct Farm {
    bin: PathBuf,
    /// master.toml.
    pub config: PathBuf,
    pub port: u16,
    /// Plain HTTP/`ws://` ([`FarmBuilder::insecure`]) instead of TLS.
    insecure: bool,
    /// Environment variables for the master ([`FarmBuilder::master_env`]).
    master_env: Vec<(String, String)>,
    workers: Vec<WorkerSpec>,
    master: Option<Spawned>,
    agents: BTreeMap<String, AgentProcess>,
    /// The workers whose worker.toml is written.
    configured: std::collections::BTreeSet<String>,
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
            tls: !self.insecure,
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// `wss://127.0.0.1:PORT` (`ws://` for an insecure farm).
    pub fn ws_url(&self) -> String {
        let scheme = if self.insecure { "ws" } else { "wss" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Whether the master speaks plain HTTP/`ws://` ([`FarmBuilder::insecure`]).
    pub fn is_insecure(&self) -> bool {
        self.insecure
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
        Ok(fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// A client config trusting the master by its pin.
    pub fn tls_client(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        if self.insecure {
            bail!("this farm's master is insecure (plain HTTP): it has no certificate to trust");
        }
        nightshift_proto::tls::install_crypto_provider();
        nightshift_proto::tls::client_config(None, Some(&self.pin()?))
    }

    /// A typed API client with the admin token.
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        let tls = if self.insecure {
            None
        } else {
            Some(self.tls_client()?)
        };
        ApiClient::new(self.url(), self.admin_token()?, tls)
    }

    /// The spec (and token) of a configured worker.
    pub fn worker_spec(&self, name: &str) -> anyhow::Result<&WorkerSpec> {
        self.workers
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| anyhow!("no worker `{name}` in this farm"))
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        for spec in &self.workers {
            kill_recorded_builds(&self.worker_state_dir(&spec.name));
        }
        // Latent `process` instances the master started.
        if let Ok(entries) = fs_err::read_dir(self.data_dir().join("latent")) {
            for entry in entries.flatten() {
                kill_recorded_builds(&entry.path().join("state"));
            }
        }
        // The master (a `Spawned`) is killed when it drops.
        self.master = None;
        if std::thread::panicking() {
            eprintln!("--- master log ---\n{}", self.master_log());
            for name in self.agents.keys() {
                eprintln!("--- worker {name} log ---\n{}", self.worker_log(name));
            }
        }
    }
}
