//! `master.toml`: the typed configuration of a master, parsed with unknown
//! keys refused and every error named by file, line, column and key, then
//! validated as a whole (cross references, ranges) before anything binds.

use crate::worker_groups::WorkerGroupDef;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use nightshift_proto::diag::{ConfigErrors, parse_toml};

use nightshift_policy::ScheduleConfig;

use nightshift_proto::wire::CheckoutMode;

use crate::locks::{Access, Claim, LockDef, LockScope};

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

/// One problem in a config file, located as precisely as known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `builder[0].workers[1]`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = issue.line {
                write!(f, ":{line}")?;
                if let Some(column) = issue.column {
                    write!(f, ":{column}")?;
                }
            }
            if issue.key.is_empty() {
                write!(f, ": {}", issue.message)?;
            } else {
                write!(f, ": {}: {}", issue.key, issue.message)?;
            }
        }
        Ok(())
    }
}

impl ConfigError {
    /// The located errors of a config file, as loaded by
    /// [`nightshift_proto::diag`].
    fn from_diag(errors: &ConfigErrors) -> ConfigError {
        ConfigError {
            file: errors.file().to_path_buf(),
            issues: errors
                .errors()
                .iter()
                .map(|error| ConfigIssue {
                    line: error.line_column.map(|(line, _)| line),
                    column: error.line_column.map(|(_, column)| column),
                    key: error.path.clone(),
                    message: error.message.clone(),
                })
                .collect(),
        }
    }
}

/// A duration written as `30s`, `5m`, `2h`, `1h30m`, `250ms` or a bare
/// number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Secs(pub Duration);

impl Secs {
    pub fn parse(text: &str) -> Result<Secs, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty duration; write e.g. `30s`, `5m`, `1h30m`".into());
        }
        if let Ok(secs) = text.parse::<u64>() {
            return Ok(Secs(Duration::from_secs(secs)));
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "bad duration `{text}`; write e.g. `30s`, `5m`, `1h30m`"
                ));
            }
            let number: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("number too large in duration `{text}`"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match rest[..unit_len].trim() {
                "ms" => Duration::from_millis(number),
                "s" => Duration::from_secs(number),
                "m" | "min" => Duration::from_secs(number.saturating_mul(60)),
                "h" => Duration::from_secs(number.saturating_mul(3600)),
                "d" => Duration::from_secs(number.saturating_mul(86400)),
                unit => {
                    return Err(format!(
                        "unknown unit `{unit}` in duration `{text}`; use ms, s, m, h or d"
                    ));
                }
            };
            total = total.saturating_add(part);
            rest = &rest[unit_len..];
        }
        Ok(Secs(total))
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecsVisitor;
        impl serde::de::Visitor<'_> for SecsVisitor {
            type Value = Secs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"30s\", \"5m\", \"1h30m\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, secs: u64) -> Result<Secs, E> {
                Ok(Secs(Duration::from_secs(secs)))
            }
            fn visit_i64<E: serde::de::Error>(self, secs: i64) -> Result<Secs, E> {
                u64::try_from(secs)
                    .map(|secs| Secs(Duration::from_secs(secs)))
                    .map_err(|_| E::custom(format!("a duration cannot be negative ({secs})")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secs, E> {
                Secs::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SecsVisitor)
    }
}

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
fn default_max_builds() -> u32 {
    1
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
    #[serde(default)]
    worker: Vec<RawWorker>,
    #[serde(default)]
    worker_group: Vec<crate::worker_groups::RawWorkerGroup>,
    #[serde(default)]
    builder: Vec<RawBuilder>,
    #[serde(default)]
    lock: Vec<RawLock>,
    /// The master's time zone for builders' `schedule` (default: the system's).
    timezone: Option<String>,
    #[serde(default)]
    hook: Vec<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    name: String,
    kind: HookKind,
    secret_file: Option<String>,
    #[serde(default)]
    builders: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    repo: String,
    #[serde(default = "default_branch")]
    branch: String,
    #[serde(default)]
    mode: CheckoutMode,
    #[serde(default)]
    shallow: bool,
}

fn default_branch() -> String {
    "main".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: String,
    /// Required, except for a latent worker (its instances get a token
    /// made for each start).
    token_sha256: Option<String>,
    #[serde(default = "default_max_builds")]
    max_builds: u32,
    #[serde(default)]
    schedule: Vec<ScheduleConfig>,
    timezone: Option<String>,
    latent: Option<LatentConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuilder {
    name: String,
    workers: Vec<String>,
    steps: Vec<RawStep>,
    #[serde(default)]
    locks: Vec<RawClaim>,
    #[serde(default)]
    admission: Admission,
    source: Option<RawSource>,
    poll: Option<Secs>,
    schedule: Option<String>,
    #[serde(default)]
    only_if_changed: bool,
    #[serde(default)]
    collapse: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    command: String,
    timeout: Option<Secs>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    #[serde(default)]
    locks: Vec<RawClaim>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaim {
    name: String,
    access: Access,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLock {
    name: String,
    scope: LockScope,
    #[serde(default = "one")]
    max_count: u32,
    #[serde(default)]
    max_count_for: BTreeMap<String, u32>,
}

fn one() -> u32 {
    1
}

/// Which latent provider starts a worker on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentProvider {
    /// Admin scripts `start`/`stop`.
    Command,
    /// A local `worker` process.
    Process,
}

/// `latent = { provider = ..., ... }` of a `[[worker]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentConfig {
    pub provider: LatentProvider,
    /// `command`: the script that starts the instance.
    pub start: Option<String>,
    /// `command`: the script that stops the instance.
    pub stop: Option<String>,
    /// `process`: the worker binary (default: `worker` next to `master`).
    pub worker_bin: Option<String>,
    /// `process`: the worker's work directory.
    pub workdir: Option<String>,
    /// The URL instances reach the master at (`wss://host:port`), when the
    /// listen address is not reachable from them (a VM, a container).
    pub master_url: Option<String>,
    /// Linger after a build before stopping; 0 stops at once.
    #[serde(default = "default_build_wait")]
    pub build_wait_timeout: Secs,
    /// Give up on a start that has not connected by then.
    #[serde(default = "default_start_timeout")]
    pub start_timeout: Secs,
}

fn default_build_wait() -> Secs {
    Secs(Duration::from_secs(600))
}
fn default_start_timeout() -> Secs {
    Secs(Duration::from_secs(120))
}

/// Where the master gets its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP / ws (explicit `insecure = true`).
    Insecure,
    /// Self-signed in `data_dir/tls/`, created on first start.
    SelfSigned,
    /// Configured certificate chain and key.
    Files { cert: PathBuf, key: PathBuf },
}

/// One `[[worker]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerDef {
    pub name: String,
    /// Lowercase hex SHA-256 of the worker's token.
    pub token_sha256: String,
    pub max_builds: u32,
    /// Master-side availability windows (same forms as worker.toml's
    /// `[[availability.schedule]]`), evaluated as a `master` source.
    pub schedule: Vec<ScheduleConfig>,
    pub timezone: Option<String>,
    pub latent: Option<LatentConfig>,
}

/// One step of a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDef {
    pub name: String,
    pub command: String,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub locks: Vec<Claim>,
}

/// What a builder's request does when no worker's availability fits its
/// estimated duration (`admission` in `[[builder]]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// Wait for a window that fits (the default: the farm never spills
    /// into the owner's time, and a build cut short is wasted work).
    #[default]
    Fit,
    /// Start anyway on the worker whose availability lasts longest.
    BestEffort,
}

/// A builder's git source: what the agent checks out before the first step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDef {
    /// Repository URL (https://, ssh://, git://, file://, or scp-like
    /// `git@host:path`), as both the master (`git ls-remote`) and the
    /// workers (`git fetch`) reach it.
    pub repo: String,
    /// The branch the builder follows.
    pub branch: String,
    pub mode: CheckoutMode,
    pub shallow: bool,
}

/// One `[[builder]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderDef {
    pub name: String,
    pub workers: Vec<String>,
    pub steps: Vec<StepDef>,
    pub locks: Vec<Claim>,
    pub admission: Admission,
    pub source: Option<SourceDef>,
    /// Ask the repository for the branch's head this often (`git ls-remote`).
    pub poll: Option<Duration>,
    /// Cron expression (validated) of timed builds, in the master's zone.
    pub schedule: Option<String>,
    /// A timed build runs only when the branch moved since the last one.
    pub only_if_changed: bool,
    /// Waiting requests for the same branch collapse into the newest.
    pub collapse: bool,
}

/// Which forge's push events a hook understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// GitHub: `X-Hub-Signature-256` (HMAC-SHA256 of the body).
    Github,
    /// Gitea and Forgejo: `X-Hub-Signature-256`, `X-Gitea-Signature` or
    /// `X-Forgejo-Signature` (HMAC-SHA256 of the body).
    #[serde(alias = "forgejo")]
    Gitea,
    /// GitLab: `X-Gitlab-Token` (the secret itself).
    Gitlab,
    /// `{"repository", "branch", "revision"}` with `Authorization: Bearer <secret>`.
    Generic,
}

/// One `[[hook]]`: a webhook endpoint at `/hooks/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDef {
    pub name: String,
    pub kind: HookKind,
    /// File holding the shared secret (read at each delivery, so rotating
    /// it needs no reconfig).
    pub secret_file: PathBuf,
    /// Builders this hook may trigger (empty: every builder whose source
    /// repository matches the pushed one).
    pub builders: Vec<String>,
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
    pub workers: Vec<WorkerDef>,
    /// `[[worker_group]]`: machines that enrol themselves.
    pub worker_groups: Vec<WorkerGroupDef>,
    pub builders: Vec<BuilderDef>,
    pub locks: Vec<LockDef>,
    /// The zone timed builds' `schedule` is read in (`None`: the system's).
    pub timezone: Option<String>,
    pub hooks: Vec<HookDef>,
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
            crate::api::constant_time_eq(g.enroll_token_sha256.as_bytes(), hash.as_bytes())
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
    pub fn load(path: &Path) -> Result<MasterConfig, ConfigError> {
        let text = fs_err::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            issues: vec![ConfigIssue {
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }],
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
        MasterConfig::parse(&text, path, &base)
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<MasterConfig, ConfigError> {
        let (raw, mut errors) = parse_toml::<RawConfig>(file, text);
        let Some(raw) = raw else {
            return Err(ConfigError::from_diag(&errors));
        };
        // Names as written, so that an entry left out for its own error does
        // not also make every reference to it an error.
        let written = Written::of(text);
        let mut issue = |key: String, message: String| errors.push_at_path(&key, message);

        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                issue(
                    "listen".into(),
                    format!(
                        "`{}` is not an address:port like `127.0.0.1:8443` or `[::]:8443`",
                        raw.listen
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 8443))
            }
        };
        let data_dir = base.join(raw.data_dir.as_deref().unwrap_or("nightshift-data"));
        let tls = match (raw.insecure, raw.tls) {
            (true, Some(_)) => {
                issue(
                    "tls".into(),
                    "`insecure = true` and a `[tls]` section contradict each other".into(),
                );
                TlsMode::Insecure
            }
            (true, None) => TlsMode::Insecure,
            (false, None) => TlsMode::SelfSigned,
            (
                false,
                Some(RawTls {
                    cert_file,
                    key_file,
                }),
            ) => match (cert_file, key_file) {
                (Some(cert), Some(key)) => TlsMode::Files {
                    cert: base.join(cert),
                    key: base.join(key),
                },
                (None, None) => TlsMode::SelfSigned,
                _ => {
                    issue("tls".into(),
                        "set both `cert_file` and `key_file`, or neither for a self-signed certificate"
                            .into(),
                    );
                    TlsMode::SelfSigned
                }
            },
        };
        let admin_token_sha256 = match raw.admin_token_sha256 {
            Some(hash) => match normalize_hash(&hash) {
                Some(hash) => Some(hash),
                None => {
                    issue(
                        "admin_token_sha256".into(),
                        "must be 64 hex digits (the SHA-256 of the admin token)".into(),
                    );
                    None
                }
            },
            None => None,
        };
        if raw.missing_timeout.0.is_zero() {
            issue(
                "missing_timeout".into(),
                "must be more than 0 (a blip would re-queue every build)".into(),
            );
        }
        if raw.max_starting == 0 {
            issue("max_starting".into(), "must be at least 1".into());
        }
        if raw.max_log_bytes < 1024 {
            issue(
                "max_log_bytes".into(),
                format!(
                    "must be at least 1024 (bytes of log kept per build), got {}",
                    raw.max_log_bytes
                ),
            );
        }
        if raw.max_agents == Some(0) {
            issue("max_agents".into(), "must be at least 1".into());
        }

        let mut workers = Vec::new();
        let mut worker_names = BTreeSet::new();
        for (i, w) in raw.worker.into_iter().enumerate() {
            let name = w.name.clone();
            if !valid_name(&name) {
                issue(
                    format!("worker[{i}].name"),
                    format!("`{name}` is not a valid name (letters, digits, `-`, `_`, `.`)"),
                );
            } else if !worker_names.insert(name.clone()) {
                issue(
                    format!("worker[{i}].name"),
                    format!("worker `{name}` is defined twice"),
                );
            }
            let token_sha256 = match &w.token_sha256 {
                None if w.latent.is_some() || written.latent_workers.contains(&name) => {
                    String::new()
                }
                None => {
                    issue(
                        format!("worker[{i}].token_sha256"),
                        "missing: the SHA-256 of the worker's token (`master add-worker NAME` \
                         prints one); only a latent worker may leave it out"
                            .into(),
                    );
                    String::new()
                }
                Some(hash) => match normalize_hash(hash) {
                    Some(hash) => hash,
                    None => {
                        issue(
                            format!("worker[{i}].token_sha256"),
                            "must be 64 hex digits (the SHA-256 of the worker's token; \
                         `master add-worker NAME` prints one)"
                                .into(),
                        );
                        String::new()
                    }
                },
            };
            if w.max_builds == 0 {
                issue(
                    format!("worker[{i}].max_builds"),
                    "must be at least 1".into(),
                );
            }
            if let Some(tz) = &w.timezone
                && jiff::tz::TimeZone::get(tz).is_err()
            {
                issue(
                    format!("worker[{i}].timezone"),
                    format!("unknown time zone `{}`", tz),
                );
            }
            if !w.schedule.is_empty() {
                let availability = nightshift_policy::AvailabilityConfig {
                    timezone: w.timezone.clone(),
                    default: None,
                    schedule: w.schedule.clone(),
                    load: None,
                    overrun: None,
                };
                if let Err(problems) = nightshift_policy::Policy::compile_for_master(
                    &availability,
                    jiff::tz::TimeZone::system(),
                    &format!("worker[{i}]"),
                ) {
                    for problem in problems {
                        issue(problem.path, problem.message);
                    }
                }
            }
            if let Some(latent) = &w.latent {
                let missing = match latent.provider {
                    LatentProvider::Command => latent.start.is_none() || latent.stop.is_none(),
                    LatentProvider::Process => false,
                };
                if missing {
                    issue(
                        format!("worker[{i}].latent"),
                        "provider `command` needs both `start` and `stop` scripts".into(),
                    );
                }
                if let Some(url) = &latent.master_url
                    && !(url.starts_with("wss://") || url.starts_with("ws://"))
                {
                    issue(
                        format!("worker[{i}].latent.master_url"),
                        format!("`{url}` must be a wss:// (or ws:// when insecure) URL"),
                    );
                }
            }
            workers.push(WorkerDef {
                name,
                token_sha256,
                max_builds: w.max_builds,
                schedule: w.schedule,
                timezone: w.timezone,
                latent: w.latent,
            });
        }

        let mut locks = Vec::new();
        let mut lock_names = BTreeSet::new();
        for (i, l) in raw.lock.into_iter().enumerate() {
            let name = l.name.clone();
            if !valid_name(&name) {
                issue(
                    format!("lock[{i}].name"),
                    format!("`{name}` is not a valid name"),
                );
            } else if !lock_names.insert(name.clone()) {
                issue(
                    format!("lock[{i}].name"),
                    format!("lock `{name}` is defined twice"),
                );
            }
            if l.max_count == 0 {
                issue(format!("lock[{i}].max_count"), "must be at least 1".into());
            }
            for (worker, count) in &l.max_count_for {
                if l.scope != LockScope::Worker {
                    issue(
                        format!("lock[{i}].max_count_for"),
                        "per-worker counts only apply to `scope = \"worker\"`".into(),
                    );
                } else if !worker_names.contains(worker) && !written.workers.contains(worker) {
                    issue(
                        format!("lock[{i}].max_count_for.{worker}"),
                        format!("unknown worker `{worker}`"),
                    );
                } else if *count == 0 {
                    issue(
                        format!("lock[{i}].max_count_for.{worker}"),
                        "must be at least 1".into(),
                    );
                }
            }
            locks.push(LockDef {
                name,
                scope: l.scope,
                max_count: l.max_count,
                max_count_for_worker: l.max_count_for,
            });
        }

        let worker_groups =
            crate::worker_groups::validate(raw.worker_group, &worker_names, &mut issue);
        let group_names: BTreeSet<&str> = worker_groups.iter().map(|g| g.name.as_str()).collect();

        let mut builders = Vec::new();
        let mut builder_names = BTreeSet::new();
        for (i, b) in raw.builder.into_iter().enumerate() {
            let name = b.name.clone();
            if !valid_name(&name) {
                issue(
                    format!("builder[{i}].name"),
                    format!("`{name}` is not a valid name (letters, digits, `-`, `_`, `.`)"),
                );
            } else if !builder_names.insert(name.clone()) {
                issue(
                    format!("builder[{i}].name"),
                    format!("builder `{name}` is defined twice"),
                );
            }
            if b.workers.is_empty() {
                issue(
                    format!("builder[{i}].workers"),
                    "lists no worker; the builder could never run".into(),
                );
            }
            for (j, worker) in b.workers.iter().enumerate() {
                if !worker_names.contains(worker)
                    && !written.workers.contains(worker)
                    && !group_names.contains(worker.as_str())
                {
                    issue(
                        format!("builder[{i}].workers[{j}]"),
                        format!(
                            "unknown worker `{worker}` (no [[worker]] or [[worker_group]] with that name)"
                        ),
                    );
                }
            }
            if b.steps.is_empty() {
                issue(format!("builder[{i}].steps"), "has no step".into());
            }
            let mut check_claims = |claims: &[RawClaim], key: String| -> Vec<Claim> {
                let mut seen = BTreeSet::new();
                claims
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        if !lock_names.contains(&c.name) && !written.locks.contains(&c.name) {
                            issue(
                                format!("{key}[{k}].name"),
                                format!("unknown lock `{}` (no [[lock]] with that name)", c.name),
                            );
                        } else if !seen.insert(c.name.clone()) {
                            issue(
                                format!("{key}[{k}].name"),
                                format!("lock `{}` is listed twice", c.name),
                            );
                        }
                        Claim::new(c.name.clone(), c.access)
                    })
                    .collect()
            };
            let builder_locks = check_claims(&b.locks, format!("builder[{i}].locks"));
            let steps = b
                .steps
                .iter()
                .enumerate()
                .map(|(j, s)| StepDef {
                    name: s.name.clone(),
                    command: s.command.clone(),
                    timeout: s.timeout.map(|t| t.0),
                    env: s.env.clone(),
                    workdir: s.workdir.clone(),
                    locks: check_claims(&s.locks, format!("builder[{i}].steps[{j}].locks")),
                })
                .collect();
            // A step taking a lock its whole build holds would wait for
            // itself forever.
            for (j, s) in b.steps.iter().enumerate() {
                for (k, c) in s.locks.iter().enumerate() {
                    if b.locks.iter().any(|held| held.name == c.name) {
                        issue(
                            format!("builder[{i}].steps[{j}].locks[{k}].name"),
                            format!(
                                "lock `{}` is already held by the whole build (the builder's `locks`); \
                                 a step cannot take it again",
                                c.name
                            ),
                        );
                    }
                }
            }
            let source = b.source.map(|src| {
                if let Err(why) = check_repo_url(&src.repo) {
                    issue(format!("builder[{i}].source.repo"), why);
                }
                if let Err(why) = check_branch_name(&src.branch) {
                    issue(format!("builder[{i}].source.branch"), why);
                }
                SourceDef {
                    repo: src.repo,
                    branch: src.branch,
                    mode: src.mode,
                    shallow: src.shallow,
                }
            });
            let has_source = source.is_some() || written.sourced_builders.contains(&name);
            if let Some(poll) = b.poll {
                if !has_source {
                    issue(
                        format!("builder[{i}].poll"),
                        "polling needs a `source` (the repository and branch to poll)".into(),
                    );
                } else if poll.0 < Duration::from_secs(1) {
                    issue(
                        format!("builder[{i}].poll"),
                        "must be at least 1s (each poll runs `git ls-remote` against the remote; \
                         minutes are kind to it)"
                            .into(),
                    );
                }
            }
            if let Some(expr) = &b.schedule
                && let Err(why) = nightshift_policy::CronSchedule::parse(expr)
            {
                issue(format!("builder[{i}].schedule"), why);
            }
            if b.only_if_changed && (b.schedule.is_none() || !has_source) {
                issue(
                    format!("builder[{i}].only_if_changed"),
                    "applies to timed builds of a builder with a `source`: set `schedule` and `source` too"
                        .into(),
                );
            }
            if b.collapse && !has_source {
                issue(
                    format!("builder[{i}].collapse"),
                    "collapsing merges requests for the same branch: the builder needs a `source`"
                        .into(),
                );
            }
            builders.push(BuilderDef {
                name,
                workers: b.workers,
                steps,
                locks: builder_locks,
                admission: b.admission,
                source,
                poll: b.poll.map(|p| p.0),
                schedule: b.schedule,
                only_if_changed: b.only_if_changed,
                collapse: b.collapse,
            });
        }

        if let Some(tz) = &raw.timezone
            && jiff::tz::TimeZone::get(tz).is_err()
        {
            issue(
                "timezone".into(),
                format!("unknown time zone `{tz}` (an IANA name like `Europe/Berlin`)"),
            );
        }
        let mut hooks = Vec::new();
        let mut hook_names = BTreeSet::new();
        for (i, h) in raw.hook.into_iter().enumerate() {
            if !valid_name(&h.name) {
                issue(
                    format!("hook[{i}].name"),
                    format!(
                        "`{}` is not a valid name (letters, digits, `-`, `_`, `.`)",
                        h.name
                    ),
                );
            } else if !hook_names.insert(h.name.clone()) {
                issue(
                    format!("hook[{i}].name"),
                    format!("hook `{}` is defined twice", h.name),
                );
            }
            let secret_file = match &h.secret_file {
                Some(path) => base.join(path),
                None => {
                    issue(
                        format!("hook[{i}].secret_file"),
                        "missing: the file holding the hook's shared secret".into(),
                    );
                    PathBuf::new()
                }
            };
            for (j, builder) in h.builders.iter().enumerate() {
                match builders.iter().find(|b| &b.name == builder) {
                    Some(b) if b.source.is_none() => issue(
                        format!("hook[{i}].builders[{j}]"),
                        format!(
                            "builder `{builder}` has no `source`; a push cannot name its revision"
                        ),
                    ),
                    Some(_) => {}
                    None if written.builders.contains(builder) => {}
                    None => issue(
                        format!("hook[{i}].builders[{j}]"),
                        format!("unknown builder `{builder}` (no [[builder]] with that name)"),
                    ),
                }
            }
            hooks.push(HookDef {
                name: h.name,
                kind: h.kind,
                secret_file,
                builders: h.builders,
            });
        }

        let config = MasterConfig {
            source: file.to_path_buf(),
            listen,
            data_dir,
            tls,
            admin_token_sha256,
            missing_timeout: raw.missing_timeout.0,
            max_starting: raw.max_starting,
            max_log_bytes: raw.max_log_bytes,
            max_agents: raw.max_agents,
            index: WorkerIndex::of(&workers),
            workers,
            worker_groups,
            builders,
            locks,
            timezone: raw.timezone,
            hooks,
        };
        errors
            .into_result(config)
            .map_err(|errors| ConfigError::from_diag(&errors))
    }
}

/// A repository URL git can fetch from, without options smuggled in.
fn check_repo_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("empty repository URL".into());
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "`{url}` is not a repository URL (no leading `-`, spaces or control characters)"
        ));
    }
    let scheme_ok = ["https://", "http://", "ssh://", "git://", "file://"]
        .iter()
        .any(|p| url.starts_with(p));
    let scp_like = !url.contains("://") && url.contains(':') && !url.starts_with('/');
    if !(scheme_ok || scp_like || url.starts_with('/')) {
        return Err(format!(
            "`{url}` is not a repository URL: use https://, ssh://, git://, file://,              an absolute path or `user@host:path`"
        ));
    }
    Ok(())
}

/// A branch name as `git check-ref-format --branch` would accept it.
pub fn check_branch_name(branch: &str) -> Result<(), String> {
    let bad = branch.is_empty()
        || branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch
            .chars()
            .any(|c| c.is_control() || " ~^:?*[\\".contains(c));
    if bad {
        Err(format!("`{branch}` is not a valid branch name"))
    } else {
        Ok(())
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Lowercase 64-hex-digit hash, or `None`.
pub fn normalize_hash(text: &str) -> Option<String> {
    let hash = text.trim().to_ascii_lowercase();
    (hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit())).then_some(hash)
}

/// The names the file declares, whether or not their entries are valid.
#[derive(Debug, Default)]
struct Written {
    workers: BTreeSet<String>,
    /// Workers whose entry has a `latent` key (valid or not).
    latent_workers: BTreeSet<String>,
    locks: BTreeSet<String>,
    builders: BTreeSet<String>,
    /// Builders whose entry has a `source` key (valid or not).
    sourced_builders: BTreeSet<String>,
}

impl Written {
    fn of(text: &str) -> Written {
        let mut written = Written::default();
        let Ok(table) = toml::from_str::<toml::Table>(text) else {
            return written;
        };
        let entries = |key: &str| {
            table
                .get(key)
                .and_then(toml::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(toml::Value::as_table)
                .filter_map(|entry| {
                    let name = entry.get("name")?.as_str()?.to_owned();
                    Some((name, entry))
                })
        };
        for (name, entry) in entries("worker") {
            if entry.contains_key("latent") {
                written.latent_workers.insert(name.clone());
            }
            written.workers.insert(name);
        }
        written.locks = entries("lock").map(|(name, _)| name).collect();
        for (name, entry) in entries("builder") {
            if entry.contains_key("source") {
                written.sourced_builders.insert(name.clone());
            }
            written.builders.insert(name);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn parse(text: &str) -> Result<MasterConfig, ConfigError> {
        MasterConfig::parse(text, Path::new("master.toml"), Path::new("/srv"))
    }

    #[test]
    fn a_full_config_parses_with_defaults() {
        let text = format!(
            r#"
[[worker]]
name = "b1"
token_sha256 = "{HASH}"

[[worker]]
name = "b2"
token_sha256 = "{HASH}"
max_builds = 3
latent = {{ provider = "process", build_wait_timeout = "0s" }}

[[lock]]
name = "compile"
scope = "worker"
max_count = 2
max_count_for = {{ b2 = 4 }}

[[builder]]
name = "app"
workers = ["b1", "b2"]
locks = [{{ name = "compile", access = "counting" }}]
steps = [{{ name = "make", command = "make", timeout = "5m", env = {{ CC = "cc" }} }}]
"#
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(config.data_dir, Path::new("/srv/nightshift-data"));
        assert_eq!(config.tls, TlsMode::SelfSigned);
        assert_eq!(config.missing_timeout, Duration::from_secs(60));
        assert_eq!(config.max_starting, 2);
        assert_eq!(config.worker("b1").unwrap().max_builds, 1);
        let b2 = config.worker("b2").unwrap();
        assert_eq!(
            b2.latent.as_ref().unwrap().build_wait_timeout,
            Secs(Duration::ZERO)
        );
        let app = config.builder("app").unwrap();
        assert_eq!(app.steps[0].timeout, Some(Duration::from_secs(300)));
        assert_eq!(app.locks, vec![Claim::new("compile", Access::Counting)]);
        assert_eq!(config.locks[0].max_count_for_worker["b2"], 4);
        assert_eq!(app.admission, Admission::Fit, "the default");
    }

    #[test]
    fn admission_is_fit_or_best_effort() {
        let builder = |admission: &str| {
            format!(
                "[[worker]]\nname = \"b1\"\ntoken_sha256 = \"{HASH}\"\n\n[[builder]]\nname = \"app\"\n\
                 workers = [\"b1\"]\nsteps = [{{ name = \"make\", command = \"make\" }}]\nadmission = {admission}\n"
            )
        };
        let config = parse(&builder("\"best-effort\"")).unwrap();
        assert_eq!(
            config.builder("app").unwrap().admission,
            Admission::BestEffort
        );
        let config = parse(&builder("\"fit\"")).unwrap();
        assert_eq!(config.builder("app").unwrap().admission, Admission::Fit);
        let shown = parse(&builder("\"sometimes\"")).unwrap_err().to_string();
        assert!(shown.starts_with("master.toml:9:"), "{shown}");
        assert!(
            shown.contains("admission")
                && shown.contains("`fit`")
                && shown.contains("`best-effort`"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = format!("[[worker]]\nname = \"b1\"\ntoken_sha256 = \"{HASH}\"\nmax_bulds = 2\n");
        let err = parse(&text).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("master.toml:4:"), "{shown}");
        assert!(shown.contains("max_bulds"), "{shown}");
    }

    #[test]
    fn a_step_cannot_take_a_lock_its_build_holds_and_latent_workers_need_no_token() {
        let text = r#"
[[lock]]
name = "db"
scope = "master"
max_count = 1

[[worker]]
name = "vm"
latent = { provider = "process" }

[[builder]]
name = "app"
workers = ["vm"]
locks = [{ name = "db", access = "counting" }]
steps = [{ name = "s", command = "true", locks = [{ name = "db", access = "exclusive" }] }]
"#;
        let shown = parse(text).unwrap_err().to_string();
        assert!(
            shown.contains("builder[0].steps[0].locks[0].name")
                && shown.contains("already held by the whole build"),
            "{shown}"
        );
        assert!(!shown.contains("token_sha256"), "{shown}");
        let ordinary = "[[worker]]\nname = \"w\"\n";
        let shown = parse(ordinary).unwrap_err().to_string();
        assert!(
            shown.contains("worker[0].token_sha256") && shown.contains("missing"),
            "{shown}"
        );
    }

    #[test]
    fn cross_references_are_checked_and_all_errors_collected() {
        let text = format!(
            r#"
[[worker]]
name = "b1"
token_sha256 = "{HASH}"

[[builder]]
name = "app"
workers = ["b1", "ghost"]
steps = [{{ name = "s", command = "true", locks = [{{ name = "nolock", access = "exclusive" }}] }}]
"#
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.issues.len(), 2, "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("master.toml:8:") && shown.contains("builder[0].workers[1]"),
            "{shown}"
        );
        assert!(shown.contains("unknown worker `ghost`"), "{shown}");
        assert!(shown.contains("unknown lock `nolock`"), "{shown}");
    }

    #[test]
    fn bad_values_are_refused() {
        let text = "listen = \"nowhere\"\nmissing_timeout = \"5 parsecs\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("missing_timeout"), "{err}");
        let err = parse("listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(err.contains(": listen: "), "{err}");
        let err = parse("[[worker]]\nname = \"w\"\ntoken_sha256 = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("master.toml:3:") && err.contains("token_sha256"),
            "{err}"
        );
    }

    #[test]
    fn master_side_schedules_use_the_worker_toml_forms() {
        let good = format!(
            "[[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\ntimezone = \"Europe/Paris\"\n\
             schedule = [{{ name = \"nights\", hours = \"19:00-07:00\", days = \"mon-fri\" }}]\n"
        );
        let config = parse(&good).unwrap();
        assert_eq!(config.worker("w").unwrap().schedule[0].name, "nights");
        let bad = format!(
            "[[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\n\
             schedule = [{{ name = \"nights\", hours = \"25:00-07:00\" }}]\n"
        );
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("worker[0]") && err.contains("hours"), "{err}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(Secs::parse("90").unwrap().0, Duration::from_secs(90));
        assert_eq!(Secs::parse("1h30m").unwrap().0, Duration::from_secs(5400));
        assert_eq!(Secs::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Secs::parse("1h 30m").unwrap().0, Duration::from_secs(5400));
        assert!(Secs::parse("3 weeks").is_err());
        assert!(Secs::parse("m").is_err());
    }

    #[test]
    fn embedded_default_is_valid() {
        let text = EMBEDDED_DEFAULT.replace("@LOCAL_TOKEN_SHA256@", HASH);
        let config = parse(&text).unwrap();
        assert!(config.builder("hello").is_some());
        assert!(config.worker("local").is_some());
    }

    #[test]
    fn every_error_in_the_file_is_reported_at_once() {
        let text = format!(
            r#"listen = "127.0.0.1:8443"
missing_timeout = "5 parsecs"

[[worker]]
name = "b1"
token_sha256 = "{HASH}"
max_bulds = 2

[[lock]]
name = "db"
scope = "planet"

[[builder]]
name = "app"
workers = ["b1", "ghost"]
colour = "blue"
steps = [
  {{ name = "s", command = "true", locks = [{{ name = "db", access = "sometimes" }}] }},
]

[[builder]]
name = "db-user"
workers = ["b1"]
locks = [{{ name = "db", access = "exclusive" }}]
steps = [{{ name = "s", command = "true", timeout = -5 }}]
"#
        );
        let err =
            MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/srv")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "master.toml:2:19: missing_timeout: unknown unit `parsecs` in duration `5 parsecs`; use ms, s, m, h or d\n\
             master.toml:7:1: worker[0].max_bulds: unknown key `max_bulds`, expected one of `name`, `token_sha256`, `max_builds`, `schedule`, `timezone`, `latent`\n\
             master.toml:11:9: lock[0].scope: unknown value `planet`, expected `master` or `worker`\n\
             master.toml:15:18: builder[0].workers[1]: unknown worker `ghost` (no [[worker]] with that name)\n\
             master.toml:16:1: builder[0].colour: unknown key `colour`, expected one of `name`, `workers`, `steps`, `locks`, `admission`, `source`, `poll`, `schedule`, `only_if_changed`, `collapse`\n\
             master.toml:18:68: builder[0].steps[0].locks[0].access: unknown value `sometimes`, expected `counting` or `exclusive`\n\
             master.toml:25:52: builder[1].steps[0].timeout: a duration cannot be negative (-5)"
        );
        assert_eq!(err.issues.len(), 7);
        assert!(
            err.issues
                .iter()
                .all(|i| i.line.is_some() && i.column.is_some())
        );
    }

    #[test]
    fn the_packaged_example_is_valid_and_its_schedule_does_what_it_says() {
        let text = include_str!("../../packaging/examples/master.toml");
        let config = parse(text).unwrap();
        let rack = config.worker("rack-1").expect("rack-1 in the example");
        let availability = nightshift_policy::AvailabilityConfig {
            timezone: rack.timezone.clone(),
            default: None,
            schedule: rack.schedule.clone(),
            load: None,
            overrun: None,
        };
        let policy = nightshift_policy::Policy::compile_for_master(
            &availability,
            jiff::tz::TimeZone::UTC,
            "worker[1]",
        )
        .unwrap();
        let state_at = |instant: &str| {
            let now: jiff::Timestamp = instant.parse().unwrap();
            policy
                .evaluate(now, &nightshift_policy::Inputs::default())
                .state
        };
        use nightshift_policy::PresenceState::{Available, Reluctant};
        // Europe/Berlin is UTC+1 in November.
        assert_eq!(state_at("2026-11-23T09:00:00Z"), Reluctant, "Monday 10:00");
        assert_eq!(state_at("2026-11-23T16:59:00Z"), Reluctant, "Monday 17:59");
        assert_eq!(state_at("2026-11-23T17:00:00Z"), Available, "Monday 18:00");
        assert_eq!(
            state_at("2026-11-25T02:00:00Z"),
            Available,
            "Wednesday 03:00"
        );
        assert_eq!(state_at("2026-11-28T11:00:00Z"), Available, "Saturday noon");
        assert_eq!(state_at("2026-11-29T22:00:00Z"), Available, "Sunday 23:00");
        assert_eq!(state_at("2026-11-30T07:00:00Z"), Reluctant, "Monday 08:00");
    }

    #[test]
    fn sources_hooks_and_triggers_are_validated_together() {
        let text = format!(
            "timezone = \"Mars/Olympus\"\n\
             [[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\n\
             [[builder]]\nname = \"plain\"\nworkers = [\"w\"]\npoll = \"1m\"\ncollapse = true\n\
             steps = [{{ name = \"s\", command = \"true\" }}]\n\
             [[builder]]\nname = \"app\"\nworkers = [\"w\"]\nschedule = \"0 25 * * *\"\n\
             source = {{ repo = \"-oProxyCommand=x\", branch = \"a..b\", mode = \"fresh\" }}\n\
             steps = [{{ name = \"s\", command = \"true\" }}]\n\
             [[hook]]\nname = \"gh\"\nkind = \"github\"\nbuilders = [\"plain\", \"ghost\"]\n"
        );
        let err = MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/etc"))
            .unwrap_err()
            .to_string();
        for expected in [
            "timezone: unknown time zone `Mars/Olympus`",
            "builder[0].poll: polling needs a `source`",
            "builder[0].collapse:",
            "builder[1].schedule: cron expression",
            "builder[1].source.repo:",
            "builder[1].source.branch: `a..b` is not a valid branch name",
            "hook[0].secret_file: missing",
            "hook[0].builders[0]: builder `plain` has no `source`",
            "hook[0].builders[1]: unknown builder `ghost`",
        ] {
            assert!(err.contains(expected), "{expected}\n{err}");
        }
        let good = format!(
            "timezone = \"Europe/Berlin\"\n\
             [[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\n\
             [[builder]]\nname = \"app\"\nworkers = [\"w\"]\npoll = \"2m\"\nschedule = \"0 2 * * *\"\n\
             only_if_changed = true\ncollapse = true\n\
             source = {{ repo = \"git@example.org:acme/app.git\", shallow = true }}\n\
             steps = [{{ name = \"s\", command = \"make\" }}]\n\
             [[hook]]\nname = \"forge\"\nkind = \"forgejo\"\nsecret_file = \"hook.secret\"\n"
        );
        let config =
            MasterConfig::parse(&good, Path::new("master.toml"), Path::new("/etc")).unwrap();
        let app = config.builder("app").unwrap();
        let source = app.source.as_ref().unwrap();
        assert_eq!(source.branch, "main");
        assert_eq!(source.mode, CheckoutMode::Incremental);
        assert!(source.shallow && app.collapse && app.only_if_changed);
        assert_eq!(app.poll, Some(Duration::from_secs(120)));
        let hook = config.hook("forge").unwrap();
        assert_eq!(hook.kind, HookKind::Gitea);
        assert_eq!(hook.secret_file, Path::new("/etc/hook.secret"));
    }
}
