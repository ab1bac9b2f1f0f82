//! The artifact keys of `master.toml`: the master's caps on what builds
//! upload (`max_artifact_bytes`, `max_build_artifact_bytes`), how long it
//! keeps them (`artifact_retention`, `artifact_keep_builds`), and the check
//! of a builder's `artifacts` patterns.

use std::time::Duration;

use nightshift_proto::diag::ConfigErrors;

use super::{RawConfig, Secs};

/// Default `max_artifact_bytes`: the largest single artifact file.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// Default `max_build_artifact_bytes`: the largest total of one build's artifacts.
pub const DEFAULT_MAX_BUILD_ARTIFACT_BYTES: u64 = 4 << 30;

pub(super) fn default_max_artifact_bytes() -> u64 {
    DEFAULT_MAX_ARTIFACT_BYTES
}
pub(super) fn default_max_build_artifact_bytes() -> u64 {
    DEFAULT_MAX_BUILD_ARTIFACT_BYTES
}
pub(super) fn default_artifact_retention() -> Secs {
    Secs(Duration::from_secs(30 * 86400))
}

/// The master's artifact caps and retention (top-level keys of master.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactSettings {
    /// Largest single file (`max_artifact_bytes`).
    pub max_file_bytes: u64,
    /// Largest total of one build's files (`max_build_artifact_bytes`).
    pub max_build_bytes: u64,
    /// Artifacts older than this are deleted (`artifact_retention`); `None`: kept
    /// until `keep_builds` pushes them out.
    pub retention: Option<Duration>,
    /// Only the newest this many builds of each builder keep their artifacts
    /// (`artifact_keep_builds`); 0: no count limit.
    pub keep_builds: u32,
}

impl Default for ArtifactSettings {
    fn default() -> Self {
        ArtifactSettings {
            max_file_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            max_build_bytes: DEFAULT_MAX_BUILD_ARTIFACT_BYTES,
            retention: Some(default_artifact_retention().0),
            keep_builds: 0,
        }
    }
}

/// Checks the artifact keys of `raw`.
pub(super) fn parse_artifacts(raw: &RawConfig, errors: &mut ConfigErrors) -> ArtifactSettings {
    let mut issue = |key: &str, message: String| errors.push_at_path(key, message);
    if raw.max_artifact_bytes == 0 {
        issue(
            "max_artifact_bytes",
            "must be at least 1 (bytes of the largest artifact file)".into(),
        );
    }
    if raw.max_build_artifact_bytes < raw.max_artifact_bytes {
        issue(
            "max_build_artifact_bytes",
            format!(
                "{} is less than max_artifact_bytes ({}): one build's artifacts together \
                 must be allowed at least one largest file",
                raw.max_build_artifact_bytes, raw.max_artifact_bytes
            ),
        );
    }
    let retention = raw.artifact_retention.0;
    if !retention.is_zero() && retention < Duration::from_secs(60) {
        issue(
            "artifact_retention",
            "must be at least 1m (or 0 to keep artifacts until artifact_keep_builds drops them)"
                .into(),
        );
    }
    ArtifactSettings {
        max_file_bytes: raw.max_artifact_bytes,
        max_build_bytes: raw.max_build_artifact_bytes,
        retention: (!retention.is_zero()).then_some(retention),
        keep_builds: raw.artifact_keep_builds,
    }
}

/// Checks one `artifacts` glob pattern: relative to the build directory,
/// no `..`, valid glob syntax (`*`, `?`, `[...]`, `**`).
pub fn check_artifact_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("an artifact pattern is empty".into());
    }
    if pattern.starts_with('/') {
        return Err(format!(
            "`{pattern}` is absolute; artifact patterns are relative to the build directory"
        ));
    }
    if pattern.split('/').any(|part| part == "..") {
        return Err(format!(
            "`{pattern}` contains `..`; artifacts come from inside the build directory"
        ));
    }
    glob::Pattern::new(pattern)
        .map(|_| ())
        .map_err(|e| format!("`{pattern}` is not a valid glob pattern: {e}"))
}
