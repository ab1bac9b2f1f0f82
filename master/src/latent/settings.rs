//! A latent worker's settings, read from its `[[worker]]` entry, and the
//! back-off after failed starts.

use std::path::Path;
use std::time::Duration;

use super::{ProviderSpec, command, process};

/// The settings of a `[[worker]]` with `latent = { … }` in `master.toml`,
/// or `None` for an ordinary worker. Relative paths were resolved by the
/// config loader; process instances live under `data_dir`.
pub fn settings_from_config(
    worker: &crate::config::WorkerDef,
    data_dir: &Path,
    config_dir: &Path,
) -> Option<LatentSettings> {
    let resolve = |path: &String| config_dir.join(path);
    let latent = worker.latent.as_ref()?;
    let provider = match latent.provider {
        crate::config::LatentProvider::Command => ProviderSpec::Command(command::CommandSettings {
            start: latent.start.clone().unwrap_or_default(),
            stop: latent.stop.clone().unwrap_or_default(),
            health: latent.health.clone(),
        }),
        crate::config::LatentProvider::Process => ProviderSpec::Process(process::ProcessSettings {
            worker_binary: latent.worker_bin.as_ref().map(resolve),
            data_dir: data_dir.to_path_buf(),
            workdir: latent.workdir.as_ref().map(resolve),
            stop_grace: Duration::from_secs(30),
        }),
    };
    Some(LatentSettings {
        provider,
        build_wait_timeout: latent.build_wait_timeout.0,
        start_timeout: latent.start_timeout.0,
        max_builds: worker.max_builds,
        master_url: latent.master_url.clone(),
    })
}

/// A latent worker's `latent = { … }` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatentSettings {
    pub provider: ProviderSpec,
    /// Linger this long after the last build before stopping; zero stops
    /// at once.
    pub build_wait_timeout: Duration,
    /// A start whose agent has not connected after this long is stopped and
    /// the worker backed off.
    pub start_timeout: Duration,
    pub max_builds: u32,
    /// Overrides the URL instances reach the master at.
    pub master_url: Option<String>,
}

/// Back-off after a failed or timed-out start: doubles per consecutive
/// failure from the first value up to the second.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// After a provider says "not now", the worker is not asked again for this
/// long (other workers are tried meanwhile).
pub const NOT_NOW_RETRY: Duration = Duration::from_secs(30);

pub(super) fn backoff_after(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}
