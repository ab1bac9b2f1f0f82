//! The CLI verbs that talk to a running master's API (`submit`, `workers`,
//! `builds`, `log`, `cancel`, `pause`, `resume`), and how they find it: the
//! URL, the admin token and the certificate to trust.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nightshift_proto::api::{ApiClient, BuildInfo, BuildState, MasterUrl, WorkerList};
use nightshift_proto::wire::Outcome;

use crate::cli::ConnArgs;
use crate::config::{MasterConfig, TlsMode};
use crate::run::{ADMIN_TOKEN_FILE, resolve_config};

/// Builds an API client from the flags, the environment and master.toml.
pub fn connect(args: &ConnArgs) -> anyhow::Result<ApiClient> {
    let from_config = if args.url.is_none() || args.token.is_none() {
        Some(resolve_config(args.config.as_deref(), false)?.0)
    } else {
        None
    };
    let url = match (&args.url, &from_config) {
        (Some(url), _) => {
            MasterUrl::parse(url).map_err(|e| crate::cli::UsageError(format!("--url: {e}")))?
        }
        (None, Some(config)) => local_url(config),
        (None, None) => bail!("no master URL: give --url or --config"),
    };
    let token = match (&args.token, &from_config) {
        (Some(token), _) => token.trim().to_owned(),
        (None, Some(config)) => {
            let path = config.data_dir.join(ADMIN_TOKEN_FILE);
            read_token(&path).with_context(|| {
                format!(
                    "no admin token: give --token (or NIGHTSHIFT_ADMIN_TOKEN), or run where {} is readable",
                    path.display()
                )
            })?
        }
        (None, None) => bail!("no admin token: give --token or NIGHTSHIFT_ADMIN_TOKEN"),
    };
    let tls = if url.tls {
        let (ca, pin) = match (&args.ca_file, &args.pin_sha256, &from_config) {
            (None, None, Some(config)) => trust_for(config)?,
            (ca, pin, _) => (ca.clone(), pin.clone()),
        };
        Some(nightshift_proto::tls::client_config(
            ca.as_deref(),
            pin.as_deref(),
        )?)
    } else {
        None
    };
    ApiClient::new(url, token, tls)
}

/// Reads a token file (first line, trimmed).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(token)
}

/// The URL a local CLI uses for this config's listen address.
pub fn local_url(config: &MasterConfig) -> MasterUrl {
    let ip = config.listen.ip();
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
        tls: config.tls != TlsMode::Insecure,
        host,
        port: config.listen.port(),
    }
}

/// How a local client trusts this config's certificate: its pin.
fn trust_for(config: &MasterConfig) -> anyhow::Result<(Option<PathBuf>, Option<String>)> {
    let cert = match &config.tls {
        TlsMode::Insecure => return Ok((None, None)),
        TlsMode::SelfSigned => config
            .data_dir
            .join("tls")
            .join(nightshift_proto::tls::SELF_SIGNED_CERT_FILE),
        TlsMode::Files { cert, .. } => cert.clone(),
    };
    Ok((None, Some(pin_of_file(&cert)?)))
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

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn show_build(build: &BuildInfo) {
    let mut line = format!("build {} ({}): {}", build.id, build.builder, build.state);
    if let Some(worker) = &build.worker {
        line.push_str(&format!(" on {worker}"));
    }
    if let Some(outcome) = build.outcome {
        line.push_str(&format!(", {outcome}"));
    }
    if build.retries > 0 {
        line.push_str(&format!(
            ", retried {}x ({})",
            build.retries,
            build.retry_reason.as_deref().unwrap_or("")
        ));
    }
    if let Some(why) = &build.waiting_for {
        line.push_str(&format!(", waiting for {why}"));
    }
    if let Some(reason) = &build.reason {
        line.push_str(&format!(" — {reason}"));
    }
    println!("{line}");
}

/// `master submit`: exit 0 queued (or, with --wait, succeeded), 1 otherwise.
pub async fn submit(
    client: &ApiClient,
    builder: &str,
    props: Vec<(String, String)>,
    wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let properties: BTreeMap<String, String> = props.into_iter().collect();
    let submitted = client.submit(builder, properties).await?;
    if !wait {
        if json {
            print_json(&submitted)?;
        } else {
            println!("{}", submitted.build_id);
        }
        return Ok(0);
    }
    if !json {
        eprintln!(
            "build {} queued; waiting for it to finish",
            submitted.build_id
        );
    }
    let build = client.wait_finished(submitted.build_id).await?;
    if json {
        print_json(&build)?;
    } else {
        if let Ok(log) = client.log(build.id).await {
            print!("{}", log.log);
        }
        show_build(&build);
    }
    Ok(if build.outcome == Some(Outcome::Success) {
        0
    } else {
        1
    })
}

pub async fn workers(client: &ApiClient, json: bool) -> anyhow::Result<i32> {
    let list: WorkerList = client.workers().await?;
    if json {
        print_json(&list)?;
        return Ok(0);
    }
    if list.paused {
        println!("master is PAUSED: no new builds are handed out");
    }
    println!(
        "{:<16} {:<10} {:<14} {:<26} {:<26} {:<10} REASON",
        "NAME", "STATE", "SOURCE", "SINCE", "UNTIL", "RUNNING"
    );
    for w in &list.workers {
        let running: Vec<String> = w.running.iter().map(|id| id.to_string()).collect();
        println!(
            "{:<16} {:<10} {:<14} {:<26} {:<26} {:<10} {}",
            w.name,
            w.state.as_str(),
            w.source.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            w.since.map(|t| t.to_string()).unwrap_or_default(),
            w.until.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
            if running.is_empty() {
                "-".into()
            } else {
                running.join(",")
            },
            match &w.latent {
                Some(latent) => format!(
                    "{} [latent {}: {}{}]",
                    w.reason,
                    latent.state,
                    latent.reason,
                    latent
                        .retry_after
                        .map(|t| format!("; retry after {t}"))
                        .unwrap_or_default()
                ),
                None => w.reason.clone(),
            }
        );
    }
    Ok(0)
}

pub async fn builds(client: &ApiClient, limit: u32, json: bool) -> anyhow::Result<i32> {
    let list = client.builds(limit).await?;
    if json {
        print_json(&list)?;
        return Ok(0);
    }
    println!(
        "{:<8} {:<16} {:<9} {:<16} {:<10} {:<7} DETAIL",
        "ID", "BUILDER", "STATE", "WORKER", "OUTCOME", "RETRIES"
    );
    for b in &list.builds {
        let detail = match (b.state, &b.waiting_for) {
            // A running build waits only while a step waits for a lock.
            (BuildState::Queued | BuildState::Running, Some(w)) => Some(format!("waiting for {w}")),
            (BuildState::Queued, None) => None,
            _ => b.retry_reason.clone().or_else(|| b.reason.clone()),
        };
        println!(
            "{:<8} {:<16} {:<9} {:<16} {:<10} {:<7} {}",
            b.id,
            b.builder,
            b.state.as_str(),
            b.worker.as_deref().unwrap_or("-"),
            b.outcome
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".into()),
            b.retries,
            detail.unwrap_or_default()
        );
    }
    Ok(0)
}

pub async fn log(client: &ApiClient, id: u64, json: bool) -> anyhow::Result<i32> {
    let log = client.log(id).await?;
    if json {
        print_json(&log)?;
    } else {
        print!("{}", log.log);
    }
    Ok(0)
}

pub async fn cancel(client: &ApiClient, id: u64, reason: Option<&str>) -> anyhow::Result<i32> {
    client.cancel(id, reason).await?;
    println!("build {id}: cancelling");
    Ok(0)
}

/// `master reconfig`: exit 0 when applied, 2 when the new config is refused
/// (its errors are printed), 1 when the master cannot be reached.
pub async fn reconfig(client: &ApiClient, json: bool) -> anyhow::Result<i32> {
    match client.reconfig().await {
        Ok(answer) => {
            if json {
                print_json(&answer)?;
            } else {
                println!("master.toml reloaded; running builds go on:");
                for change in &answer.changes {
                    println!("  {change}");
                }
            }
            Ok(0)
        }
        Err(error) if error.status == Some(422) => {
            eprintln!("{}", error.message);
            Ok(2)
        }
        Err(error) => Err(error.into()),
    }
}

pub async fn set_paused(client: &ApiClient, paused: bool, json: bool) -> anyhow::Result<i32> {
    let state = if paused {
        client.pause().await?
    } else {
        client.resume().await?
    };
    if json {
        print_json(&state)?;
    } else if state.paused {
        println!("master paused: no new builds are handed out (running ones go on)");
    } else {
        println!("master resumed: builds are handed out again");
    }
    Ok(0)
}
