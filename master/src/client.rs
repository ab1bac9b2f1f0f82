//! The CLI verbs that talk to a running master's API (`submit`, `workers`,
//! `builds`, `log`, `artifacts`, `cancel`, `pause`, `resume`), and how they find it: the
//! URL, the admin token and the certificate to trust.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use nightshift_proto::api::{
    ApiClient, BuildInfo, BuildState, MasterUrl, SubmitRequest, WorkerList, WorkerQuery,
};
use nightshift_proto::exit::ExitStatus;
use nightshift_proto::when::{short_duration, short_time, zone_label};
use nightshift_proto::wire::Outcome;

use crate::cli::ConnArgs;
use crate::config::{MasterConfig, TlsMode};
use crate::locate::{
    ADMIN_TOKEN_FILE, ConfigSource, config_search_order, find_config, local_url, pin_of_file,
    read_token,
};

/// Builds an API client from the flags, the environment and master.toml.
pub fn connect(args: &ConnArgs) -> anyhow::Result<ApiClient> {
    let (from_config, source) = if args.url.is_none() || args.token.is_none() {
        let (config, source) = find_config(args.config.as_deref(), false)?;
        (Some(config), Some(source))
    } else {
        (None, None)
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
                if source == Some(ConfigSource::Embedded) {
                    format!(
                        "no master config found ({}), and no master with the embedded default \
                         ran in this directory ({} is missing): give --config (or \
                         NIGHTSHIFT_MASTER_CONFIG), run where `master run` started, or give \
                         --url and --token",
                        config_search_order(),
                        path.display()
                    )
                } else {
                    format!(
                        "no admin token for the master of {}: give --token (or \
                         NIGHTSHIFT_ADMIN_TOKEN), or run as a user who can read {}",
                        config.source.display(),
                        path.display()
                    )
                }
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
    if let Some(source) = source_text(build) {
        line.push_str(&format!(", {source}"));
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
    source: (Option<String>, Option<String>),
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitStatus> {
    let properties: BTreeMap<String, String> = props.into_iter().collect();
    let (revision, branch) = source;
    let submitted = client
        .submit_request(&SubmitRequest {
            builder: builder.to_owned(),
            properties,
            revision,
            branch,
        })
        .await?;
    if !wait {
        if json {
            print_json(&submitted)?;
        } else {
            println!("{}", submitted.build_id);
        }
        return Ok(ExitStatus::Ok);
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
        ExitStatus::Ok
    } else {
        ExitStatus::Failure
    })
}

/// `master workers`: one line per worker; `--json` prints the API's answer.
/// Filtered and paged by `query`; a table that is not everything says so.
pub async fn workers(
    client: &ApiClient,
    query: &WorkerQuery,
    json: bool,
) -> anyhow::Result<ExitStatus> {
    let page = client.workers_page(query).await?;
    if json {
        print_json(&page)?;
        return Ok(ExitStatus::Ok);
    }
    if page.paused {
        println!("master is PAUSED: no new builds are handed out");
    }
    let shown = page.workers.len();
    let list = WorkerList {
        paused: page.paused,
        workers: page.workers,
    };
    let now = Timestamp::now();
    let tz = TimeZone::system();
    print!("{}", workers_table(&list, now, &tz));
    println!("(times in {})", zone_label(&tz, now));
    if shown < page.total {
        println!(
            "showing {}-{} of {} matching workers (--offset/--limit for more, --state/--name to filter)",
            page.offset + usize::from(shown > 0),
            page.offset + shown,
            page.total
        );
    }
    Ok(ExitStatus::Ok)
}

/// The human table of `master workers`, times shown in `tz` relative to `now`.
fn workers_table(list: &WorkerList, now: Timestamp, tz: &TimeZone) -> String {
    let mut table = Table::new([
        "NAME", "STATE", "SOURCE", "SINCE", "UNTIL", "RUNNING", "REASON",
    ]);
    for w in &list.workers {
        let running: Vec<String> = w.running.iter().map(|id| id.to_string()).collect();
        let reason = match &w.latent {
            Some(latent) => format!(
                "{} [latent {}: {}{}]",
                w.reason,
                latent.state,
                latent.reason,
                latent
                    .retry_after
                    .map(|t| format!("; retry after {}", short_time(t, now, tz)))
                    .unwrap_or_default()
            ),
            None => w.reason.clone(),
        };
        table.row([
            w.name.clone(),
            w.state.as_str().to_owned(),
            w.source
                .as_ref()
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
            w.since
                .map_or_else(|| "-".to_owned(), |t| short_time(t, now, tz)),
            w.until
                .map_or_else(|| "-".to_owned(), |t| short_time(t, now, tz)),
            if running.is_empty() {
                "-".to_owned()
            } else {
                running.join(",")
            },
            reason,
        ]);
    }
    table.render()
}

/// `master builds`: the newest builds first; `--json` prints the API's answer.
pub async fn builds(client: &ApiClient, limit: u32, json: bool) -> anyhow::Result<ExitStatus> {
    let list = client.builds(limit).await?;
    if json {
        print_json(&list)?;
        return Ok(ExitStatus::Ok);
    }
    print!(
        "{}",
        builds_table(&list.builds, Timestamp::now(), &TimeZone::system())
    );
    Ok(ExitStatus::Ok)
}

/// `main@0123456789ab` (branch and short revision) for builds with a source.
fn source_text(build: &BuildInfo) -> Option<String> {
    let revision = build.revision.as_deref()?;
    let short = revision.get(..12).unwrap_or(revision);
    Some(match build.branch.as_deref() {
        Some(branch) if !branch.is_empty() => format!("{branch}@{short}"),
        _ => short.to_owned(),
    })
}

/// The human table of `master builds`, times shown in `tz` relative to `now`.
fn builds_table(builds: &[BuildInfo], now: Timestamp, tz: &TimeZone) -> String {
    let mut table = Table::new([
        "ID",
        "BUILDER",
        "SOURCE",
        "STATE",
        "WORKER",
        "OUTCOME",
        "RETRIES",
        "SUBMITTED",
        "TOOK",
        "DETAIL",
    ]);
    for b in builds {
        let detail = match (b.state, &b.waiting_for) {
            // A running build waits only while a step waits for a lock.
            (BuildState::Queued | BuildState::Running, Some(w)) => Some(format!("waiting for {w}")),
            (BuildState::Queued, None) => None,
            _ => b.retry_reason.clone().or_else(|| b.reason.clone()),
        };
        // What queued it, when not a hand-made submit.
        let detail = match (detail, b.trigger.as_deref()) {
            (detail, None | Some("submit")) => detail,
            (Some(detail), Some(trigger)) => Some(format!("{detail} (by {trigger})")),
            (None, Some(trigger)) => Some(format!("by {trigger}")),
        };
        // How long it ran, or has been running.
        let took = match (b.started_at, b.finished_at) {
            (Some(start), Some(end)) => short_duration(start, end),
            (Some(start), None) if b.state == BuildState::Running => short_duration(start, now),
            _ => "-".to_owned(),
        };
        // Queued and running builds: the builder's estimated duration.
        let took = match (b.state, b.estimate_secs) {
            (BuildState::Finished, _) | (_, None) => took,
            (BuildState::Queued, Some(secs)) => format!("~{}", estimate_text(secs)),
            (BuildState::Running, Some(secs)) => format!("{took} of ~{}", estimate_text(secs)),
        };
        table.row([
            b.id.to_string(),
            b.builder.clone(),
            source_text(b).unwrap_or_else(|| "-".to_owned()),
            b.state.as_str().to_owned(),
            b.worker.clone().unwrap_or_else(|| "-".to_owned()),
            b.outcome.map_or_else(|| "-".to_owned(), |o| o.to_string()),
            b.retries.to_string(),
            short_time(b.submitted_at, now, tz),
            took,
            detail.unwrap_or_default(),
        ]);
    }
    table.render()
}

/// `1h20m` for an estimate in seconds.
fn estimate_text(secs: u64) -> String {
    nightshift_policy::format_duration(jiff::SignedDuration::from_secs(
        i64::try_from(secs).unwrap_or(i64::MAX),
    ))
}

/// A plain-text table: every column as wide as its widest cell, the last
/// column unpadded.
struct Table<const N: usize> {
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(header: [&str; N]) -> Table<N> {
        Table {
            rows: vec![header.map(str::to_owned)],
        }
    }

    fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths = [0usize; N];
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == N {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

pub async fn log(client: &ApiClient, id: u64, json: bool) -> anyhow::Result<ExitStatus> {
    let log = client.log(id).await?;
    if json {
        print_json(&log)?;
    } else {
        print!("{}", log.log);
    }
    Ok(ExitStatus::Ok)
}

/// `master artifacts BUILD`: the build's artifacts as a table.
pub async fn artifacts(client: &ApiClient, id: u64, json: bool) -> anyhow::Result<ExitStatus> {
    let list = client.artifacts(id).await?;
    if json {
        print_json(&list)?;
        return Ok(ExitStatus::Ok);
    }
    if list.artifacts.is_empty() {
        println!("build {id} has no artifacts");
        return Ok(ExitStatus::Ok);
    }
    let width = list
        .artifacts
        .iter()
        .map(|a| a.name.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:>12}  {:<64}  STORED",
        "NAME", "BYTES", "SHA256"
    );
    let tz = TimeZone::system();
    for artifact in &list.artifacts {
        println!(
            "{:<width$}  {:>12}  {:<64}  {}",
            artifact.name,
            artifact.size,
            artifact.sha256,
            artifact
                .stored_at
                .to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M")
        );
    }
    Ok(ExitStatus::Ok)
}

/// `master artifacts BUILD --get NAME [-o PATH]`: downloads the artifact
/// and checks its size and SHA-256 against the master's record.
pub async fn get_artifact(
    client: &ApiClient,
    id: u64,
    name: &str,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitStatus> {
    let list = client.artifacts(id).await?;
    let Some(record) = list.artifacts.iter().find(|a| a.name == name) else {
        let known: Vec<&str> = list.artifacts.iter().map(|a| a.name.as_str()).collect();
        bail!(
            "build {id} has no artifact `{name}` (it has: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let dest = match output {
        Some(path) => path.to_owned(),
        None => PathBuf::from(name.rsplit('/').next().unwrap_or(name)),
    };
    let got = client.download_artifact(id, name, &dest).await?;
    if got.sha256 != record.sha256 || got.size != record.size {
        let _ = fs_err::remove_file(&dest);
        bail!(
            "artifact `{name}` of build {id}: downloaded {} bytes with sha256 {}, but the master              recorded {} bytes with sha256 {}; the file was removed",
            got.size,
            got.sha256,
            record.size,
            record.sha256
        );
    }
    if json {
        print_json(&serde_json::json!({
            "build_id": id,
            "name": name,
            "path": dest,
            "size": got.size,
            "sha256": got.sha256,
            "verified": true,
        }))?;
    } else {
        println!(
            "build {id}: {name} -> {} ({} bytes, sha256 {} verified)",
            dest.display(),
            got.size,
            got.sha256
        );
    }
    Ok(ExitStatus::Ok)
}

pub async fn cancel(
    client: &ApiClient,
    id: u64,
    reason: Option<&str>,
) -> anyhow::Result<ExitStatus> {
    client.cancel(id, reason).await?;
    println!("build {id}: cancelling");
    Ok(ExitStatus::Ok)
}

/// `master reconfig`: exit 0 when applied, 2 when the new config is refused
/// (its errors are printed), 1 when the master cannot be reached.
/// `master revoke-worker NAME`.
pub async fn revoke_worker(
    client: &ApiClient,
    name: &str,
    json: bool,
) -> anyhow::Result<ExitStatus> {
    if !crate::config::valid_name(name) {
        return Err(crate::cli::UsageError(format!(
            "`{name}` is not a valid worker name (letters, digits, `-`, `_`, `.`)"
        ))
        .into());
    }
    let answer = client.revoke_worker(name).await?;
    if json {
        print_json(&answer)?;
    } else {
        println!(
            "worker {} (group {}) revoked: its token no longer works",
            answer.name, answer.group
        );
    }
    Ok(ExitStatus::Ok)
}

pub async fn reconfig(client: &ApiClient, json: bool) -> anyhow::Result<ExitStatus> {
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
            Ok(ExitStatus::Ok)
        }
        Err(error) if error.status == Some(422) => {
            eprintln!("{}", error.message);
            Ok(ExitStatus::Usage)
        }
        Err(error) => Err(error.into()),
    }
}

pub async fn set_paused(
    client: &ApiClient,
    paused: bool,
    json: bool,
) -> anyhow::Result<ExitStatus> {
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
    Ok(ExitStatus::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("a test instant")
    }

    /// Monday 2026-11-23 10:30:00 UTC.
    fn now() -> Timestamp {
        at("2026-11-23T10:30:00Z")
    }

    #[test]
    fn the_workers_table_is_aligned_and_short() {
        let list: WorkerList = serde_json::from_value(serde_json::json!({
            "paused": false,
            "workers": [
                {
                    "name": "lab-3", "state": "available", "reason": "office hours",
                    "source": "schedule:office-hours",
                    "since": "2026-11-23T10:07:49.265281293Z",
                    "until": "2026-11-23T18:00:00Z",
                    "connected": true, "max_builds": 1, "running": [12, 14]
                },
                {
                    "name": "a-much-longer-worker-name", "state": "away",
                    "reason": "not connected", "connected": false, "max_builds": 1,
                    "running": [],
                    "latent": {
                        "state": "stopped", "reason": "start failed",
                        "since": "2026-11-23T10:00:00Z",
                        "retry_after": "2026-11-23T10:35:00Z", "provider": "command"
                    }
                }
            ]
        }))
        .expect("a worker list");
        let table = workers_table(&list, now(), &TimeZone::UTC);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            !table.contains("265281293") && !table.contains("T10:"),
            "{table}"
        );
        assert!(
            lines[1].contains("10:07") && lines[1].contains("18:00"),
            "{table}"
        );
        assert!(lines[1].contains(" 12,14 "), "{table}");
        assert!(lines[2].contains("retry after 10:35]"), "{table}");
        // Every column starts at the same place on every line.
        for header in ["STATE", "SOURCE", "SINCE", "UNTIL", "RUNNING", "REASON"] {
            let column = lines[0].find(header).expect("a header");
            for line in &lines[1..] {
                assert_eq!(
                    line.chars().nth(column - 1),
                    Some(' '),
                    "{header} in {table}"
                );
                assert_ne!(line.chars().nth(column), Some(' '), "{header} in {table}");
            }
        }
    }

    #[test]
    fn the_builds_table_shows_when_and_how_long() {
        let builds: Vec<BuildInfo> = serde_json::from_value(serde_json::json!([
            {
                "id": 7, "builder": "app", "state": "running", "worker": "lab-3",
                "retries": 0, "submitted_at": "2026-11-23T10:20:00.123456789Z",
                "started_at": "2026-11-23T10:21:00Z",
                "waiting_for": "lock deploy"
            },
            {
                "id": 6, "builder": "release", "state": "finished", "worker": "rack-1",
                "outcome": "success", "retries": 1, "retry_reason": "worker lost",
                "submitted_at": "2026-11-20T09:00:00Z",
                "started_at": "2026-11-20T09:00:05Z",
                "finished_at": "2026-11-20T10:02:05Z"
            }
        ]))
        .expect("builds");
        let table = builds_table(&builds, now(), &TimeZone::UTC);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].contains("SUBMITTED") && lines[0].contains("TOOK"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("7 ") && lines[1].contains(" 10:20 "),
            "{table}"
        );
        assert!(
            lines[1].contains(" 9m00s ") && lines[1].ends_with("waiting for lock deploy"),
            "{table}"
        );
        assert!(
            lines[2].contains(" Fri 09:00 ") && lines[2].contains(" 1h02m "),
            "{table}"
        );
        assert!(lines[2].ends_with("worker lost"), "{table}");
        assert!(lines[0].contains("SOURCE"), "{table}");
        let sourced: Vec<BuildInfo> = serde_json::from_value(serde_json::json!([{
            "id": 9, "builder": "app", "state": "finished", "outcome": "cancelled",
            "retries": 0, "submitted_at": "2026-11-23T10:20:00Z",
            "repository": "file:///srv/app.git", "branch": "main",
            "revision": "0123456789abcdef0123456789abcdef01234567",
            "trigger": "webhook gh", "reason": "collapsed into build 10", "collapsed_into": 10
        }]))
        .expect("builds");
        let table = builds_table(&sourced, now(), &TimeZone::UTC);
        let line = table.lines().nth(1).expect("a row");
        assert!(line.contains(" main@0123456789ab "), "{table}");
        assert!(
            line.ends_with("collapsed into build 10 (by webhook gh)"),
            "{table}"
        );
        let detail = lines[0].find("DETAIL").expect("a header");
        assert_eq!(lines[1].find("waiting"), Some(detail), "{table}");
    }
}
