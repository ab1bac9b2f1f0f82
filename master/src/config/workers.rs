//! The `[[worker]]` entries of `master.toml`: token hashes, capacity,
//! master-side schedules and latent providers.

use std::collections::BTreeSet;
use std::time::Duration;

use nightshift_policy::ScheduleConfig;
use nightshift_proto::diag::ConfigErrors;
use serde::Deserialize;

use super::Secs;
use super::names::{Written, normalize_hash, valid_name};

fn default_max_builds() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
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
    /// `command`: the script that tells whether the instance exists (exit 0:
    /// it does); asked when a start times out, and its answer is part of
    /// the reason shown.
    pub health: Option<String>,
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

/// Checks a master-side `schedule` and its `timezone` (of a `[[worker]]` or
/// a `[[worker_group]]` at key path `owner`): every problem goes to
/// `issue(key, message)`, with the key of the field it is in.
pub fn check_master_schedule(
    schedule: &[ScheduleConfig],
    timezone: Option<&str>,
    owner: &str,
    issue: &mut impl FnMut(String, String),
) {
    if let Some(tz) = timezone
        && jiff::tz::TimeZone::get(tz).is_err()
    {
        issue(
            format!("{owner}.timezone"),
            format!("unknown time zone `{tz}`"),
        );
    }
    if schedule.is_empty() {
        return;
    }
    let availability = nightshift_policy::AvailabilityConfig {
        timezone: timezone.map(str::to_owned),
        default: None,
        schedule: schedule.to_vec(),
        load: None,
        overrun: None,
    };
    if let Err(problems) = nightshift_policy::Policy::compile_for_master(
        &availability,
        jiff::tz::TimeZone::system(),
        owner,
    ) {
        for problem in problems {
            issue(problem.path, problem.message);
        }
    }
}

/// Checks the `[[worker]]` entries; returns them and the names defined.
pub(super) fn parse_workers(
    raw: Vec<RawWorker>,
    written: &Written,
    errors: &mut ConfigErrors,
) -> (Vec<WorkerDef>, BTreeSet<String>) {
    let mut issue = |key: String, message: String| errors.push_at_path(&key, message);
    let mut workers = Vec::new();
    let mut worker_names = BTreeSet::new();
    for (i, w) in raw.into_iter().enumerate() {
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
            None if w.latent.is_some() || written.latent_workers.contains(&name) => String::new(),
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
        check_master_schedule(
            &w.schedule,
            w.timezone.as_deref(),
            &format!("worker[{i}]"),
            &mut issue,
        );
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
            if latent.provider != LatentProvider::Command && latent.health.is_some() {
                issue(
                    format!("worker[{i}].latent.health"),
                    "only provider `command` runs a `health` script".into(),
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
    (workers, worker_names)
}
