//! Enrolment of a worker of a `[[worker_group]]`: the machine trades the
//! group's enrolment token (`enroll_token_file`) for its own worker token,
//! which is written to `token_file` (mode 0600) and used from then on. Done
//! by `worker enroll`, or by `worker run` when `token_file` does not exist.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use fs_err::os::unix::fs::OpenOptionsExt;
use nightshift_proto::api::{ApiClient, EnrollResponse, MasterUrl};
use nightshift_proto::exit::ExitStatus;

use crate::cli::ConfigArg;
use crate::config::WorkerConfig;

/// Whether the worker still has to enrol: it has an enrolment token and no
/// token of its own yet (`token_file` missing or empty).
pub fn needed(config: &WorkerConfig) -> bool {
    config.enroll_token_file.is_some()
        && config.token_file.as_deref().is_some_and(|file| {
            !file.exists() || fs_err::read_to_string(file).is_ok_and(|t| t.trim().is_empty())
        })
}

/// Enrols at the master as `config.name` and writes the token it gets to
/// `token_file`.
pub async fn enroll(config: &WorkerConfig) -> anyhow::Result<EnrollResponse> {
    let (Some(enroll_file), Some(token_file)) = (&config.enroll_token_file, &config.token_file)
    else {
        anyhow::bail!("enrolment needs `enroll_token_file` and `token_file` in worker.toml");
    };
    let enroll_token = fs_err::read_to_string(enroll_file)
        .with_context(|| format!("cannot read enroll_token_file {}", enroll_file.display()))?
        .trim()
        .to_owned();
    let url = MasterUrl::parse(&config.master)?;
    let tls = if url.tls {
        Some(nightshift_proto::tls::client_config(
            config.tls.ca_file.as_deref(),
            config.tls.pin_sha256.as_deref(),
        )?)
    } else {
        None
    };
    let client = ApiClient::new(url, enroll_token, tls)?;
    let answer = client
        .enroll(&config.name)
        .await
        .with_context(|| format!("enrolment of `{}` refused", config.name))?;
    write_private(token_file, format!("{}\n", answer.token).as_bytes())
        .with_context(|| format!("cannot write token_file {}", token_file.display()))?;
    Ok(answer)
}

/// Writes `contents` to `path` readable by its owner only, atomically (a
/// temporary file in the same directory renamed over it).
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs_err::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = fs_err::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs_err::rename(&tmp, path)
}

/// `worker enroll`.
pub fn main(arg: &ConfigArg) -> ExitStatus {
    nightshift_proto::log::init();
    let (path, config) = match WorkerConfig::load(arg.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitStatus::Usage;
        }
    };
    if config.enroll_token_file.is_none() {
        eprintln!(
            "error: {}: no `enroll_token_file`: this worker is not of a worker group (its token comes from the admin)",
            path.display()
        );
        return ExitStatus::Usage;
    }
    if !needed(&config) {
        let file = config.token_file.as_deref().unwrap_or(Path::new("?"));
        eprintln!(
            "error: already enrolled: {} holds this worker's token; to enrol again, the admin revokes `{}` (`master revoke-worker {}`) and you delete that file",
            file.display(),
            config.name,
            config.name
        );
        return ExitStatus::Failure;
    }
    nightshift_proto::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitStatus::Failure;
        }
    };
    match runtime.block_on(enroll(&config)) {
        Ok(answer) => {
            println!(
                "enrolled as {} in group {}; token written to {}",
                answer.name,
                answer.group,
                config
                    .token_file
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display()
            );
            ExitStatus::Ok
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitStatus::Failure
        }
    }
}
