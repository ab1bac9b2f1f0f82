//! The top-level keys of `master.toml`: where the master listens, its data
//! directory, TLS, the admin token and the limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nightshift_proto::diag::ConfigErrors;
use serde::Deserialize;

use super::RawConfig;
use super::names::normalize_hash;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
}

/// Who may read the dashboard, build pages and live logs (`dashboard`).
/// Actions (cancel, rebuild, pause/resume) need a login either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DashboardAccess {
    /// Anyone who reaches the master's port.
    Public,
    /// Only a browser logged in with the admin token (the default: the
    /// page shows owners' own words for their absences and build logs).
    #[default]
    Login,
}

impl DashboardAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            DashboardAccess::Public => "public",
            DashboardAccess::Login => "login",
        }
    }
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

/// The top-level keys, checked.
pub(super) struct General {
    pub(super) listen: SocketAddr,
    pub(super) data_dir: PathBuf,
    pub(super) tls: TlsMode,
    pub(super) admin_token_sha256: Option<String>,
}

/// The keys a CLI verb reads to reach the running master: every other key
/// is skipped unchecked (the running master checked them), so that `master
/// workers` beside a 10,000-worker master.toml does not validate 10,000
/// entries first.
#[derive(Debug, Deserialize)]
pub(super) struct RawReach {
    #[serde(default = "super::default_listen")]
    listen: String,
    data_dir: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    tls: Option<RawTls>,
}

/// Where a running master listens, where its data (and admin token) is, and
/// how its certificate is trusted: what a CLI verb needs of master.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterReach {
    /// The file it came from (or `<embedded default>`).
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsMode,
}

/// Checks the keys of [`RawReach`]; relative paths resolve against `base`.
pub(super) fn parse_reach(
    raw: &RawReach,
    source: &Path,
    base: &Path,
    errors: &mut ConfigErrors,
) -> MasterReach {
    let (listen, data_dir, tls) = reach_keys(
        &raw.listen,
        raw.data_dir.as_deref(),
        raw.insecure,
        raw.tls.as_ref(),
        base,
        errors,
    );
    MasterReach {
        source: source.to_path_buf(),
        listen,
        data_dir,
        tls,
    }
}

/// `listen`, `data_dir` and the TLS mode, checked (the part of the
/// top-level keys a client needs too).
fn reach_keys(
    listen_text: &str,
    data_dir: Option<&str>,
    insecure: bool,
    tls: Option<&RawTls>,
    base: &Path,
    errors: &mut ConfigErrors,
) -> (SocketAddr, PathBuf, TlsMode) {
    let mut issue = |key: String, message: String| errors.push_at_path(&key, message);
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            issue(
                "listen".into(),
                format!(
                    "`{listen_text}` is not an address:port like `127.0.0.1:8443` or `[::]:8443`",
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 8443))
        }
    };
    let data_dir = base.join(data_dir.unwrap_or("nightshift-data"));
    let tls = match (insecure, tls) {
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
                issue(
                    "tls".into(),
                    "set both `cert_file` and `key_file`, or neither for a self-signed certificate"
                        .into(),
                );
                TlsMode::SelfSigned
            }
        },
    };
    (listen, data_dir, tls)
}

/// Checks the top-level keys of `raw`; relative paths resolve against `base`.
pub(super) fn parse_general(raw: &RawConfig, base: &Path, errors: &mut ConfigErrors) -> General {
    let (listen, data_dir, tls) = reach_keys(
        &raw.listen,
        raw.data_dir.as_deref(),
        raw.insecure,
        raw.tls.as_ref(),
        base,
        errors,
    );
    let mut issue = |key: String, message: String| errors.push_at_path(&key, message);
    let admin_token_sha256 = match &raw.admin_token_sha256 {
        Some(hash) => match normalize_hash(hash) {
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
    General {
        listen,
        data_dir,
        tls,
        admin_token_sha256,
    }
}
