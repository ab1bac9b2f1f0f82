//! Where a master's config and files are, for `master run` and for every CLI
//! verb alike: the config search (`--config`, `$NIGHTSHIFT_MASTER_CONFIG`,
//! ./master.toml, the system path, the embedded default), the token files of
//! the data dir, and the URL and certificate pin a CLI on the same machine
//! reaches the master with.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use nightshift_proto::api::MasterUrl;
use nightshift_proto::tls;

use crate::auth::token_sha256;
use crate::config::{EMBEDDED_DEFAULT, MasterConfig, MasterReach, TlsMode};

/// The generated admin token, inside the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The local worker's token (embedded default and `--local-worker`).
pub const LOCAL_TOKEN_FILE: &str = "local-worker.token";
/// The name of the local worker.
pub const LOCAL_WORKER: &str = "local";
/// Where the embedded default keeps its data, relative to the current dir.
pub const EMBEDDED_DATA_DIR: &str = "nightshift-data";

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Reads `path`'s token, creating it (mode 0600) when `create` and missing.
pub fn token_file(path: &Path, create: bool) -> anyhow::Result<Option<String>> {
    if path.exists() {
        return read_token(path).map(Some);
    }
    if !create {
        return Ok(None);
    }
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let token = new_token();
    tls::write_private(path, format!("{token}\n").as_bytes())?;
    Ok(Some(token))
}

/// The environment variable naming master.toml for every verb (as `--config`).
pub const CONFIG_ENV: &str = "NIGHTSHIFT_MASTER_CONFIG";
/// Where an installed master keeps its config (packaging/).
pub const SYSTEM_CONFIG: &str = "/etc/nightshift/master.toml";

/// Where a verb's config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config FILE` or `NIGHTSHIFT_MASTER_CONFIG` (clap reads both).
    Given,
    /// `./master.toml`.
    CurrentDir,
    /// `/etc/nightshift/master.toml`.
    System,
    /// No file anywhere: the embedded default, data in `./nightshift-data`.
    Embedded,
}

/// Where a verb looks for master.toml when `--config` is not given, in order,
/// for messages.
pub fn config_search_order() -> String {
    format!("--config, ${CONFIG_ENV}, ./master.toml, {SYSTEM_CONFIG}")
}

/// The config a verb uses: `--config` (or `NIGHTSHIFT_MASTER_CONFIG`), else
/// `./master.toml`, else `/etc/nightshift/master.toml`, else the embedded
/// default. A file that exists but is broken is an error (never skipped).
/// Returns whether it is the embedded one. With `create`, the embedded
/// default's local-worker token is created when missing.
pub fn resolve_config(path: Option<&Path>, create: bool) -> anyhow::Result<(MasterConfig, bool)> {
    let (config, source) = find_config(path, create)?;
    Ok((config, source == ConfigSource::Embedded))
}

/// [`resolve_config`], saying where the config came from.
pub fn find_config(
    path: Option<&Path>,
    create: bool,
) -> anyhow::Result<(MasterConfig, ConfigSource)> {
    if let Some(path) = path {
        return Ok((MasterConfig::load(path)?, ConfigSource::Given));
    }
    let here = Path::new("master.toml");
    if here.exists() {
        return Ok((MasterConfig::load(here)?, ConfigSource::CurrentDir));
    }
    let system = Path::new(SYSTEM_CONFIG);
    if system.exists() {
        return Ok((MasterConfig::load(system)?, ConfigSource::System));
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let data_dir = cwd.join(EMBEDDED_DATA_DIR);
    let token = token_file(&data_dir.join(LOCAL_TOKEN_FILE), create)?;
    // Without a token yet (a CLI verb before the first run), any hash will do:
    // no worker can connect to a master that is not running.
    let hash = token
        .map(|t| token_sha256(&t))
        .unwrap_or_else(|| "0".repeat(64));
    let text = EMBEDDED_DEFAULT.replace("@LOCAL_TOKEN_SHA256@", &hash);
    let config = MasterConfig::parse(&text, Path::new("<embedded default>"), &cwd)?;
    Ok((config, ConfigSource::Embedded))
}

/// What a CLI verb that talks to the running master needs of its config
/// (see [`MasterReach`]), found as [`find_config`] finds the config: only
/// the listen address, data directory and TLS keys of a file are read.
pub fn find_reach(path: Option<&Path>) -> anyhow::Result<(MasterReach, ConfigSource)> {
    if let Some(path) = path {
        return Ok((MasterReach::load(path)?, ConfigSource::Given));
    }
    let here = Path::new("master.toml");
    if here.exists() {
        return Ok((MasterReach::load(here)?, ConfigSource::CurrentDir));
    }
    let system = Path::new(SYSTEM_CONFIG);
    if system.exists() {
        return Ok((MasterReach::load(system)?, ConfigSource::System));
    }
    let (config, source) = find_config(None, false)?;
    Ok((MasterReach::from(&config), source))
}

/// Reads a token file (first line, trimmed).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    // fs-err's error names the file.
    let text = fs_err::read_to_string(path)?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(token)
}

/// The URL a local CLI uses for a master listening on `listen` (TLS unless
/// `tls` is insecure).
pub fn local_url(listen: SocketAddr, tls: &TlsMode) -> MasterUrl {
    let ip = listen.ip();
    let host = if ip.is_unspecified() {
        if ip.is_ipv4() {
            "127.0.0.1".to_owned()
        } else {
            "::1".to_owned()
        }
    } else {
        ip.to_string()
    };
    MasterUrl {
        tls: *tls != TlsMode::Insecure,
        host,
        port: listen.port(),
    }
}

/// SHA-256 pin of the first certificate in a PEM file.
pub fn pin_of_file(path: &Path) -> anyhow::Result<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_file(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the master's certificate {}: {e} (has the master run once?)",
            path.display()
        )
    })?;
    Ok(nightshift_proto::tls::cert_pin_sha256(cert.as_ref()))
}
