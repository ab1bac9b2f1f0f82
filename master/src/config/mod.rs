//! `master.toml`: the typed configuration of a master, parsed with unknown
//! keys refused and every error named by file, line, column and key, then
//! validated as a whole (cross references, ranges) before anything binds.
//! One module per section; `parse` runs them in order and collects every
//! error.

mod agent_limits;
mod artifacts;
mod builders;
mod duration;
mod general;
mod hooks;
mod locks;
mod names;
#[cfg(test)]
mod tests;
mod worker_groups;
mod workers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use nightshift_proto::diag::parse_toml;

use crate::locks::LockDef;

pub use agent_limits::AgentLimits;
pub use artifacts::ArtifactSettings;
pub use builders::{Admission, BuilderDef};
pub use duration::Secs;
pub use general::{DashboardAccess, MasterReach, TlsMode};
pub use hooks::{HookDef, HookKind};
pub use names::{check_branch_name, normalize_hash, valid_name};
pub use nightshift_proto::diag::ConfigErrors;
pub use worker_groups::WorkerGroupDef;
pub use workers::{LatentProvider, WorkerDef};

use builders::RawBuilder;
use general::RawTls;
use hooks::RawHook;
use locks::RawLock;
use names::Written;
use workers::RawWorker;

/// The config used by `master run` when no `--config` is given and no
/// `master.toml` is in the current directory: one local worker, one harmless
/// builder.
pub const EMBEDDED_DEFAULT: &str = r#"# nightshift embedded default master config
listen = "127.0.0.1:8443"
data_dir = "nightshift-data"

[[worker]]
name = "local"
token_sha256 = "@LOCAL_TOKEN_SHA256@"
max_builds = 2

[[builder]]
name = "hello"
workers = ["local"]
steps = [
  { name = "greet", command = "echo hello from nightshift on $(hostname)" },
  { name = "env", command = "uname -a && date -u" },
]
"#;

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_missing_timeout() -> Secs {
    Secs(Duration::from_secs(60))
}
fn default_max_starting() -> u32 {
    2
}
fn default_max_log_bytes() -> u64 {
    crate::store::DEFAULT_LOG_CAP
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    data_dir: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    tls: Option<RawTls>,
    admin_token_sha256: Option<String>,
    #[serde(default = "default_missing_timeout")]
    missing_timeout: Secs,
    #[serde(default = "default_max_starting")]
    max_starting: u32,
    #[serde(default = "default_max_log_bytes")]
    max_log_bytes: u64,
    max_agents: Option<u32>,
    agent_limits: Option<agent_limits::RawAgentLimits>,
    #[serde(default = "artifacts::default_max_artifact_bytes")]
    max_artifact_bytes: u64,
    #[serde(default = "artifacts::default_max_build_artifact_bytes")]
    max_build_artifact_bytes: u64,
    #[serde(default = "artifacts::default_artifact_retention")]
    artifact_retention: Secs,
    #[serde(default)]
    artifact_keep_builds: u32,
    #[serde(default)]
    worker: Vec<RawWorker>,
    #[serde(default)]
    worker_group: Vec<worker_groups::RawWorkerGroup>,
    #[serde(default)]
    builder: Vec<RawBuilder>,
    #[serde(default)]
    lock: Vec<RawLock>,
    /// The master's time zone for builders' `schedule` (default: the system's).
    timezone: Option<String>,
    #[serde(default)]
    hook: Vec<RawHook>,
    #[serde(default)]
    dashboard: DashboardAccess,
}

/// A validated master config.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterConfig {
    /// The file it came from (or `<embedded default>`).
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsMode,
    /// Lowercase hex SHA-256 of the admin token, when configured.
    pub admin_token_sha256: Option<String>,
    pub missing_timeout: Duration,
    pub max_starting: u32,
    /// Each build's stored log is cut at this many bytes (`max_log_bytes`).
    pub max_log_bytes: u64,
    /// Most agents connected at once; `None`: as many as the descriptor
    /// limit leaves room for beside API clients and browsers.
    pub max_agents: Option<u32>,
    /// What one agent connection may send and have queued (`[agent_limits]`).
    pub agent_limits: AgentLimits,
    /// What the master keeps of builds' artifacts.
    pub artifacts: ArtifactSettings,
    pub workers: Vec<WorkerDef>,
    /// `[[worker_group]]`: machines that enrol themselves.
    pub worker_groups: Vec<WorkerGroupDef>,
    pub builders: Vec<BuilderDef>,
    pub locks: Vec<LockDef>,
    /// The zone timed builds' `schedule` is read in (`None`: the system's).
    pub timezone: Option<String>,
    pub hooks: Vec<HookDef>,
    /// Who may read the dashboard (`dashboard = "public" | "login"`).
    pub dashboard: DashboardAccess,
    /// `workers` by name and by token hash, so that looking one up costs the
    /// same with 10,000 workers as with 4 (built once by `parse`).
    pub index: WorkerIndex,
}

/// Lookups into [`MasterConfig::workers`] that stay O(1) in the number of
/// workers: by name (every finished build, every snapshot row) and by token
/// hash (every WebSocket upgrade).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerIndex {
    by_name: HashMap<String, usize>,
    /// Token hash → positions of the workers with that hash (several workers
    /// may share a token; each still has to name itself in its hello).
    by_token: HashMap<String, Vec<usize>>,
}

impl WorkerIndex {
    /// Indexes `workers` (first entry wins for a duplicate name, as a linear
    /// search would; `parse` refuses duplicates anyway).
    pub fn of(workers: &[WorkerDef]) -> WorkerIndex {
        let mut index = WorkerIndex::default();
        for (at, worker) in workers.iter().enumerate() {
            index.by_name.entry(worker.name.clone()).or_insert(at);
            index
                .by_token
                .entry(worker.token_sha256.clone())
                .or_default()
                .push(at);
        }
        index
    }
}

impl MasterConfig {
    pub fn worker(&self, name: &str) -> Option<&WorkerDef> {
        let at = *self.index.by_name.get(name)?;
        self.workers.get(at).filter(|w| w.name == name)
    }

    /// The workers whose `token_sha256` is `hash` (lowercase hex).
    pub fn workers_with_token(&self, hash: &str) -> impl Iterator<Item = &WorkerDef> {
        self.index
            .by_token
            .get(hash)
            .into_iter()
            .flatten()
            .filter_map(|&at| self.workers.get(at))
            .filter(move |w| w.token_sha256 == hash)
    }
    /// The `[[worker_group]]` named `name` (groups are few: a scan).
    pub fn worker_group(&self, name: &str) -> Option<&WorkerGroupDef> {
        self.worker_groups.iter().find(|g| g.name == name)
    }
    /// The group whose enrolment token hashes to `hash`.
    pub fn group_with_enroll_token(&self, hash: &str) -> Option<&WorkerGroupDef> {
        self.worker_groups.iter().find(|g| {
            nightshift_proto::secret::constant_time_eq(
                g.enroll_token_sha256.as_bytes(),
                hash.as_bytes(),
            )
        })
    }
    pub fn builder(&self, name: &str) -> Option<&BuilderDef> {
        self.builders.iter().find(|b| b.name == name)
    }
    pub fn hook(&self, name: &str) -> Option<&HookDef> {
        self.hooks.iter().find(|h| h.name == name)
    }
    /// The zone of timed builds (the configured one, else the system's).
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        self.timezone
            .as_deref()
            .and_then(|name| jiff::tz::TimeZone::get(name).ok())
            .unwrap_or_else(jiff::tz::TimeZone::system)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<MasterConfig, ConfigErrors> {
        let (text, base) = read_config_file(path)?;
        MasterConfig::parse(&text, path, &base)
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<MasterConfig, ConfigErrors> {
        let (raw, mut errors) = parse_toml::<RawConfig>(file, text);
        let Some(raw) = raw else {
            return Err(errors);
        };
        // Names as written, so that an entry left out for its own error does
        // not also make every reference to it an error.
        let written = Written::of(text);

        let general = general::parse_general(&raw, base, &mut errors);
        let agent_limits = agent_limits::parse_agent_limits(raw.agent_limits.as_ref(), &mut errors);
        let artifacts = artifacts::parse_artifacts(&raw, &mut errors);
        let (workers, worker_names) = workers::parse_workers(raw.worker, &written, &mut errors);
        let (locks, lock_names) =
            locks::parse_locks(raw.lock, &worker_names, &written, &mut errors);
        let worker_groups = worker_groups::validate(
            raw.worker_group,
            &worker_names,
            &mut |key: String, message: String| errors.push_at_path(&key, message),
        );
        let group_names = worker_groups.iter().map(|g| g.name.clone()).collect();
        let builders = builders::parse_builders(
            raw.builder,
            &worker_names,
            &group_names,
            &lock_names,
            &written,
            &mut errors,
        );
        if let Some(tz) = &raw.timezone
            && jiff::tz::TimeZone::get(tz).is_err()
        {
            errors.push_at_path(
                "timezone",
                format!("unknown time zone `{tz}` (an IANA name like `Europe/Berlin`)"),
            );
        }
        let hooks = hooks::parse_hooks(raw.hook, &builders, base, &written, &mut errors);

        let config = MasterConfig {
            source: file.to_path_buf(),
            listen: general.listen,
            data_dir: general.data_dir,
            tls: general.tls,
            admin_token_sha256: general.admin_token_sha256,
            missing_timeout: raw.missing_timeout.0,
            max_starting: raw.max_starting,
            max_log_bytes: raw.max_log_bytes,
            max_agents: raw.max_agents,
            agent_limits,
            artifacts,
            index: WorkerIndex::of(&workers),
            workers,
            worker_groups,
            builders,
            locks,
            timezone: raw.timezone,
            hooks,
            dashboard: raw.dashboard,
        };
        errors.into_result(config)
    }
}

/// A config file's text and the absolute directory its relative paths
/// resolve against.
fn read_config_file(path: &Path) -> Result<(String, PathBuf), ConfigErrors> {
    let text = fs_err::read_to_string(path).map_err(|e| {
        let mut errors = ConfigErrors::new(path);
        errors.push(format!("cannot read: {e}"));
        errors
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    // Absolute, so the paths derived from it (data_dir, certificates)
    // stay right for processes started elsewhere: latent instances run
    // in their own directory and are handed the CA file's path.
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    Ok((text, base))
}

impl MasterReach {
    /// Reads what a CLI verb needs of a config file (`listen`, `data_dir`,
    /// `insecure`, `[tls]`), skipping every other key unchecked: one
    /// parse of the text, no validation of workers, builders or schedules.
    pub fn load(path: &Path) -> Result<MasterReach, ConfigErrors> {
        let (text, base) = read_config_file(path)?;
        MasterReach::parse(&text, path, &base)
    }

    /// [`MasterReach::load`] of config text.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<MasterReach, ConfigErrors> {
        // The quick way keeps no position of any key; on any problem the
        // careful way below finds them, to say where.
        if let Ok(raw) = toml::from_str::<general::RawReach>(text) {
            let mut errors = ConfigErrors::new(file);
            let reach = general::parse_reach(&raw, file, base, &mut errors);
            if errors.is_empty() {
                return Ok(reach);
            }
        }
        let (raw, mut errors) = parse_toml::<general::RawReach>(file, text);
        let Some(raw) = raw else {
            return Err(errors);
        };
        let reach = general::parse_reach(&raw, file, base, &mut errors);
        errors.into_result(reach)
    }
}

impl From<&MasterConfig> for MasterReach {
    fn from(config: &MasterConfig) -> MasterReach {
        MasterReach {
            source: config.source.clone(),
            listen: config.listen,
            data_dir: config.data_dir.clone(),
            tls: config.tls.clone(),
        }
    }
}
