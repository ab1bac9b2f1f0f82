//! The provider seam of latent workers: the trait that starts and stops an
//! instance, what it is told and answers, and which provider a worker uses.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use super::{command, process};

/// A boxed future, so providers stay object safe (`Arc<dyn LatentProvider>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a new instance reaches and trusts the master.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasterAccess {
    /// The URL the agent connects to, e.g. `wss://127.0.0.1:7380`.
    pub url: String,
    /// PEM file of the certificate (or CA) the agent should trust.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 pin of the master's certificate (hex).
    pub cert_sha256: Option<String>,
    /// Plain TCP (only with `insecure = true` on the master).
    pub insecure: bool,
}

/// Everything a provider needs to start or stop one worker's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub worker: String,
    /// A token made for this start only; the master accepts it for this
    /// worker until the instance is stopped.
    pub token: String,
    pub master: MasterAccess,
    pub max_builds: u32,
}

/// The answer of [`LatentProvider::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The instance is booting; its agent will connect.
    Started,
    /// No capacity right now (nothing was started): try another worker.
    NotNow(String),
    /// The start failed; the master stops what may exist and backs off.
    Failed(String),
}

/// The answer of [`LatentProvider::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The instance exists (its agent may not have connected yet).
    Alive,
    /// The instance is gone, with what is known of why.
    Gone(String),
    /// The provider cannot tell.
    Unknown,
}

/// Starts and stops the machine (process, container, VM) behind one latent
/// worker. Implementations must be idempotent on `stop` (it is also called
/// after a failed or timed-out start, when nothing may exist).
pub trait LatentProvider: Send + Sync + 'static {
    /// Short name for messages: `command`, `process`, …
    fn kind(&self) -> &'static str;
    /// Starts the instance. The master bounds this with `start_timeout` and
    /// drops the future when it runs over.
    fn start<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, StartOutcome>;
    /// Stops the instance and frees what it holds.
    fn stop<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Result<(), String>>;
    /// Whether the instance still exists; used to explain a start that did
    /// not connect in time.
    fn health<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Health>;
}

/// Which provider a latent worker uses, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderSpec {
    Command(command::CommandSettings),
    Process(process::ProcessSettings),
}

/// Builds the provider for one latent worker.
pub fn build_provider(spec: &ProviderSpec) -> Arc<dyn LatentProvider> {
    match spec {
        ProviderSpec::Command(settings) => {
            Arc::new(command::CommandProvider::new(settings.clone()))
        }
        ProviderSpec::Process(settings) => {
            Arc::new(process::ProcessProvider::new(settings.clone()))
        }
    }
}

pub(super) fn build_kind(spec: &ProviderSpec) -> &'static str {
    match spec {
        ProviderSpec::Command(_) => "command",
        ProviderSpec::Process(_) => "process",
    }
}
