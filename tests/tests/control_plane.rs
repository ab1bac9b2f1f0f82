//! The worker's control plane through the real binaries: the CLI changes the
//! state and the master sees it, a manual state survives a restart, the CLI
//! without an agent says so in one line, usage errors exit 2, an agent with
//! a bad worker.toml exits 2 without becoming ready, other origins cannot
//! change the agent, and the packaged example configs are valid. Each test
//! runs an insecure (`ws://`) farm from the shared harness
//! (`nightshift_tests`), its worker registered with `master add-worker`.

use std::path::Path;

use anyhow::Context;
use nightshift_policy::{PresenceState, Source};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, bin_dir};
use tokio::process::Command;

/// The worker every test here runs.
const WORKER: &str = "lab-3";

/// An insecure (plain `ws://`) farm whose master knows [`WORKER`], registered
/// with `master add-worker`; its agent's policy is "available" in Berlin.
fn farm() -> anyhow::Result<Farm> {
    let spec = WorkerSpec::added_by_master(WORKER)?
        .worker_toml("[availability]\ntimezone = \"Europe/Berlin\"\ndefault = \"available\"");
    Farm::builder().insecure().worker(spec).start()
}

/// Starts [`WORKER`]'s agent and waits for its READY=1.
async fn start_agent(farm: &mut Farm) -> anyhow::Result<()> {
    farm.start_worker(WORKER)?;
    farm.wait_worker_ready(WORKER).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_changes_the_state_and_the_master_sees_it() -> anyhow::Result<()> {
    let mut farm = farm()?;
    start_agent(&mut farm).await?;
    farm.wait_worker(WORKER, "the worker connect as available", |worker| {
        worker.connected && worker.state == PresenceState::Available
    })
    .await?;

    let status = farm.worker_cli_json(
        WORKER,
        &[
            "set-availability",
            "away",
            "--for",
            "2h",
            "--reason",
            "video call",
            "--json",
        ],
    )?;
    assert_eq!(status["presence"]["state"], "away", "{status}");
    assert_eq!(status["presence"]["source"], "manual", "{status}");
    assert_eq!(status["manual"]["reason"], "video call", "{status}");

    let seen = farm
        .wait_worker(WORKER, "the worker go away by hand", |worker| {
            worker.state == PresenceState::Away && worker.source == Some(Source::Manual)
        })
        .await?;
    assert!(seen.reason.contains("video call"), "{seen:?}");
    assert!(
        seen.until.is_some(),
        "the master knows when it ends: {seen:?}"
    );

    // `master workers --json` shows the admin the same.
    let (code, stdout, stderr) = farm.master_cli(&["workers", "--json"])?;
    assert_eq!(code, 0, "master workers --json: {stderr}");
    let workers: serde_json::Value = serde_json::from_str(&stdout).context("not JSON")?;
    let listed = workers["workers"]
        .as_array()
        .and_then(|list| list.iter().find(|worker| worker["name"] == WORKER))
        .with_context(|| format!("no {WORKER} in {workers}"))?;
    assert_eq!(listed["state"], "away", "{listed}");
    assert_eq!(listed["source"], "manual", "{listed}");
    assert_eq!(listed["connected"], true, "{listed}");
    assert!(
        listed["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("video call")),
        "{listed}"
    );
    assert!(listed["until"].is_string(), "{listed}");

    // The human output of `worker status` says the same in words.
    let (code, text, stderr) = farm.worker_cli(WORKER, &["status"])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(text.starts_with("lab-3: AWAY until "), "{text}");
    assert!(text.contains("set by you"), "{text}");
    // Its times are labelled with the policy's zone, as are the master's.
    assert!(text.contains("times:   Europe/Berlin ("), "{text}");
    let (code, table, stderr) = farm.master_cli(&["workers"])?;
    assert_eq!(code, 0, "master workers: {stderr}");
    assert!(table.contains("(times in "), "{table}");

    // Available by hand for an hour on a worker that is available anyway:
    // the state does not change when the hour ends, so there is no "until".
    let status = farm.worker_cli_json(
        WORKER,
        &["set-availability", "available", "--for", "1h", "--json"],
    )?;
    assert_eq!(status["presence"]["state"], "available", "{status}");
    assert_eq!(status["presence"]["source"], "manual", "{status}");
    assert!(status["presence"]["until"].is_null(), "{status}");

    let (code, _, stderr) = farm.worker_cli(WORKER, &["set-availability", "reluctant"])?;
    assert_eq!(code, 0, "{stderr}");
    farm.wait_worker(WORKER, "the worker turn reluctant", |worker| {
        worker.state == PresenceState::Reluctant
    })
    .await?;

    let (code, _, stderr) = farm.worker_cli(WORKER, &["set-availability", "auto"])?;
    assert_eq!(code, 0, "{stderr}");
    farm.wait_worker(WORKER, "the worker return to its policy", |worker| {
        worker.state == PresenceState::Available && worker.source == Some(Source::Default)
    })
    .await?;

    farm.stop_worker(WORKER)?;
    farm.wait_worker(WORKER, "the worker leave", |worker| !worker.connected)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_state_survives_an_agent_restart() -> anyhow::Result<()> {
    let mut farm = farm()?;
    start_agent(&mut farm).await?;
    let before = farm.worker_cli_json(
        WORKER,
        &[
            "set-availability",
            "away",
            "--until",
            "2099-01-01T08:00",
            "--json",
        ],
    )?;
    assert_eq!(before["manual"]["state"], "away", "{before}");

    farm.stop_worker(WORKER)?;
    let (code, _, stderr) = farm.worker_cli(WORKER, &["status"])?;
    assert_eq!(code, 1, "no agent runs now: {stderr}");

    farm.restart_worker(WORKER)?;
    farm.wait_worker_ready(WORKER).await?;
    let after = farm.worker_cli_json(WORKER, &["status", "--json"])?;
    assert_eq!(after["presence"]["state"], "away", "{after}");
    assert_eq!(after["presence"]["source"], "manual", "{after}");
    assert_eq!(after["manual"], before["manual"], "{after}");
    // 08:00 in Berlin in winter is 07:00 UTC.
    assert_eq!(after["manual"]["until"], "2099-01-01T07:00:00Z", "{after}");
    farm.wait_worker(WORKER, "the restarted worker still away", |worker| {
        worker.connected
            && worker.state == PresenceState::Away
            && worker.source == Some(Source::Manual)
    })
    .await?;
    farm.stop_worker(WORKER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_bad_config_exits_2_without_becoming_ready() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new(WORKER).worker_toml("max_bulds = 2"))
        .start()?;
    farm.start_worker(WORKER)?;
    let error = match farm.wait_worker_ready(WORKER).await {
        Ok(()) => anyhow::bail!("an agent with an unknown key in worker.toml became ready"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("exited before it was ready"), "{error}");
    assert!(
        error.contains("max_bulds"),
        "the error carries the agent's log: {error}"
    );
    // Not a timeout: the agent is gone, and it never said READY=1.
    let notifications = farm
        .agent(WORKER)
        .context("the agent's process is still the farm's")?
        .notifications();
    assert!(
        !notifications.iter().any(|m| m == "READY=1"),
        "{notifications:?}"
    );
    assert_eq!(farm.wait_worker_exit(WORKER, DEADLINE)?, Some(2));
    Ok(())
}

/// Runs the three CLI verbs against [`WORKER`]'s config and checks each
/// says, in one line on stderr, that no agent runs, and exits 1.
fn assert_no_agent(farm: &Farm) -> anyhow::Result<()> {
    let state_dir = farm.worker_state_dir(WORKER);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["set-availability", "away", "--for", "1h"],
        &["stop", "--graceful"],
    ] {
        let (code, stdout, stderr) = farm.worker_cli(WORKER, args)?;
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "no worker agent is running (state dir {})\n",
                state_dir.display()
            ),
            "{args:?}"
        );
        assert!(stdout.is_empty(), "{args:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_without_an_agent_says_so_in_one_line() -> anyhow::Result<()> {
    let mut farm = farm()?;
    farm.write_worker_config(WORKER)?;
    let state_dir = farm.worker_state_dir(WORKER);
    // Never started: no state dir at all.
    assert!(!state_dir.exists(), "{}", state_dir.display());
    assert_no_agent(&farm)?;

    // Killed without a chance to clean up: the socket file stays behind.
    start_agent(&mut farm).await?;
    farm.kill_worker(WORKER)?;
    assert!(state_dir.join("control.sock").exists());
    assert_no_agent(&farm)?;

    // And the next start takes the stale socket over.
    farm.restart_worker(WORKER)?;
    farm.wait_worker_ready(WORKER).await?;
    let status = farm.worker_cli_json(WORKER, &["status", "--json"])?;
    assert_eq!(status["worker"], "lab-3");
    farm.stop_worker(WORKER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_change_nothing() -> anyhow::Result<()> {
    let mut farm = farm()?;
    start_agent(&mut farm).await?;
    for args in [
        &["set-availability", "away", "--for", "soon"][..],
        &["set-availability", "away", "--until", "teatime"],
        &["set-availability", "away", "--until", "2001-01-01T00:00"],
        &["set-availability", "auto", "--for", "1h"],
        &["set-availability", "sleepy"],
        &[
            "set-availability",
            "away",
            "--for",
            "1h",
            "--until",
            "19:00",
        ],
        &["stop", "--deadline", "10m"],
        &["stop", "--graceful", "--deadline", "whenever"],
    ] {
        let (code, _, stderr) = farm.worker_cli(WORKER, args)?;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} says what is wrong");
    }
    let status = farm.worker_cli_json(WORKER, &["status", "--json"])?;
    assert_eq!(status["presence"]["state"], "available", "{status}");
    assert!(status.get("manual").is_none(), "{status}");
    assert_eq!(status["stopping"], false, "{status}");

    // A bad worker.toml is a config error: exit 2, naming the key.
    let bad = farm.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nmaster = \"ws://127.0.0.1:9\"\nmax_bulds = 2\n",
    )?;
    let output = Command::new(farm.worker_bin())
        .args(["status", "--config"])
        .arg(&bad)
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_bulds"));
    farm.stop_worker(WORKER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packaging_examples_are_valid() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("packaging");
    let dir = tempfile::tempdir()?;
    let bin = bin_dir()?;

    // The worker example points at system paths; move them into the temp dir.
    let worker = std::fs::read_to_string(root.join("examples/worker.toml"))?;
    let token_file = dir.path().join("worker.token");
    std::fs::write(&token_file, "example-token\n")?;
    let worker = worker
        .replace(
            "/etc/nightshift/worker.token",
            &token_file.display().to_string(),
        )
        .replace("/var/lib/nightshift", &dir.path().display().to_string());
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&worker_config, worker)?;
    let output = Command::new(bin.join("worker"))
        .args(["check", "--config"])
        .arg(&worker_config)
        .output()
        .await?;
    assert!(
        output.status.success(),
        "packaging/examples/worker.toml: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let master = std::fs::read_to_string(root.join("examples/master.toml"))?.replace(
        "/var/lib/nightshift-master",
        &dir.path().join("m").display().to_string(),
    );
    let master_config = dir.path().join("master.toml");
    std::fs::write(&master_config, master)?;
    let output = Command::new(bin.join("master"))
        .args(["check", "--config"])
        .arg(&master_config)
        .output()
        .await?;
    assert!(
        output.status.success(),
        "packaging/examples/master.toml: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_page_come_from_the_cli_definitions() -> anyhow::Result<()> {
    let worker = bin_dir()?.join("worker");
    for (shell, expected) in [
        ("bash", "set-availability"),
        ("zsh", "set-availability"),
        ("fish", "set-availability"),
    ] {
        let output = Command::new(&worker)
            .args(["completions", shell])
            .output()
            .await?;
        assert!(output.status.success(), "{shell}");
        let text = String::from_utf8(output.stdout)?;
        assert!(
            text.contains(expected) && text.contains("--graceful"),
            "{shell}: {text}"
        );
    }
    let output = Command::new(&worker).arg("man").output().await?;
    assert!(output.status.success());
    let roff = String::from_utf8(output.stdout)?;
    assert!(roff.starts_with(".ie") || roff.contains(".TH"), "{roff}");
    assert!(roff.contains("set\\-availability"), "{roff}");
    let output = Command::new(&worker)
        .args(["completions", "tcsh"])
        .output()
        .await?;
    assert_eq!(
        output.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    let output = Command::new(bin_dir()?.join("master"))
        .arg("man")
        .output()
        .await?;
    assert!(output.status.success());
    let roff = String::from_utf8(output.stdout)?;
    assert!(
        roff.contains(".TH") && roff.contains("add\\-worker"),
        "{roff}"
    );
    Ok(())
}

/// One raw HTTP/1.1 request to `addr`; returns the status code and body.
async fn raw_request(addr: &str, head: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut answer)).await??;
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line in {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_cannot_change_the_real_agent() -> anyhow::Result<()> {
    let mut farm = farm()?;
    start_agent(&mut farm).await?;
    let url = farm.worker_control_url(WORKER)?;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let away = r#"{"state":"away","for":"1h"}"#;

    // The page embeds its CSRF token; only the page's own origin may use it.
    let (code, page) = raw_request(&addr, &format!("GET / HTTP/1.1\r\nHost: {addr}"), "").await?;
    assert_eq!(code, 200);
    let marker = "name=\"nightshift-csrf\" content=\"";
    let start = page.find(marker).context("no CSRF token in the page")? + marker.len();
    let csrf = page[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_owned();

    let post = |host: &str, extra: &str| {
        format!(
            "POST /api/v1/set-availability HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json{extra}"
        )
    };
    for (what, head, expected) in [
        ("no token", post(&addr, ""), 401),
        (
            "a wrong token",
            post(&addr, "\r\nAuthorization: Bearer guess"),
            401,
        ),
        (
            "a foreign Origin",
            post(
                &addr,
                &format!("\r\nOrigin: https://evil.example\r\nX-Nightshift-CSRF: {csrf}"),
            ),
            403,
        ),
        (
            "a rebound Host",
            post("evil.example:80", &format!("\r\nX-Nightshift-CSRF: {csrf}")),
            403,
        ),
    ] {
        let (code, body) = raw_request(&addr, &head, away).await?;
        assert_eq!(code, expected, "{what}: {body}");
    }
    let (code, _) = raw_request(&addr, "GET / HTTP/1.1\r\nHost: evil.example", "").await?;
    assert_eq!(code, 403, "a rebound page cannot even read the CSRF token");
    let status = farm.worker_cli_json(WORKER, &["status", "--json"])?;
    assert_eq!(
        status["presence"]["state"], "available",
        "nothing changed: {status}"
    );
    assert!(status.get("manual").is_none(), "{status}");

    // The page itself (own Origin and its token) can.
    let own = post(
        &addr,
        &format!("\r\nOrigin: http://{addr}\r\nX-Nightshift-CSRF: {csrf}"),
    );
    let (code, body) = raw_request(&addr, &own, away).await?;
    assert_eq!(code, 200, "{body}");
    let status = farm.worker_cli_json(WORKER, &["status", "--json"])?;
    assert_eq!(status["presence"]["state"], "away", "{status}");
    farm.stop_worker(WORKER)
}
