//! The worker's control plane through the real binaries: the CLI changes the
//! state and the master sees it, a manual state survives a restart, the CLI
//! without an agent says so in one line, usage errors exit 2, and the
//! packaged example configs are valid.

mod control_support;

use std::path::Path;

use anyhow::Context;
use serde_json::Value;
use tokio::process::Command;

use control_support::{Agent, Master, bin_dir};

fn worker_toml(master: &str, token: &str) -> String {
    format!(
        r#"name = "lab-3"
master = "{master}"
insecure = true
token = "{token}"

[control]
listen = "127.0.0.1:0"

[availability]
timezone = "Europe/Berlin"
default = "available"
"#
    )
}

fn stdout_json(output: &std::process::Output) -> anyhow::Result<Value> {
    anyhow::ensure!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).context("stdout is not JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_changes_the_state_and_the_master_sees_it() -> anyhow::Result<()> {
    let (master, token) = Master::start("lab-3").await?;
    let dir = tempfile::tempdir()?;
    let mut agent = Agent::start(dir.path(), &worker_toml(&master.ws_url(), &token)).await?;
    master
        .wait_for_worker("lab-3", "the worker connect as available", |worker| {
            worker["connected"] == true && worker["state"] == "available"
        })
        .await?;

    let output = agent
        .cli(&[
            "set-availability",
            "away",
            "--for",
            "2h",
            "--reason",
            "video call",
            "--json",
        ])
        .await?;
    let status = stdout_json(&output)?;
    assert_eq!(status["presence"]["state"], "away", "{status}");
    assert_eq!(status["presence"]["source"], "manual", "{status}");
    assert_eq!(status["manual"]["reason"], "video call", "{status}");

    let seen = master
        .wait_for_worker("lab-3", "the worker go away by hand", |worker| {
            worker["state"] == "away" && worker["source"] == "manual"
        })
        .await?;
    let reason = seen["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("video call"), "{seen}");
    assert!(
        seen["until"].is_string(),
        "the master knows when it ends: {seen}"
    );

    // The human output of `worker status` says the same in words.
    let output = agent.cli(&["status"]).await?;
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout)?;
    assert!(text.starts_with("lab-3: AWAY until "), "{text}");
    assert!(text.contains("set by you"), "{text}");

    let output = agent.cli(&["set-availability", "reluctant"]).await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    master
        .wait_for_worker("lab-3", "the worker turn reluctant", |worker| {
            worker["state"] == "reluctant"
        })
        .await?;

    let output = agent.cli(&["set-availability", "auto"]).await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    master
        .wait_for_worker("lab-3", "the worker return to its policy", |worker| {
            worker["state"] == "available" && worker["source"] == "default"
        })
        .await?;

    agent.stop().await?;
    master
        .wait_for_worker("lab-3", "the worker leave", |worker| {
            worker["connected"] == false
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_state_survives_an_agent_restart() -> anyhow::Result<()> {
    let (master, token) = Master::start("lab-3").await?;
    let dir = tempfile::tempdir()?;
    let mut agent = Agent::start(dir.path(), &worker_toml(&master.ws_url(), &token)).await?;
    let output = agent
        .cli(&[
            "set-availability",
            "away",
            "--until",
            "2099-01-01T08:00",
            "--json",
        ])
        .await?;
    let before = stdout_json(&output)?;
    assert_eq!(before["manual"]["state"], "away", "{before}");

    agent.stop().await?;
    let output = agent.cli(&["status"]).await?;
    assert_eq!(output.status.code(), Some(1), "no agent runs now");

    agent.restart().await?;
    let after = stdout_json(&agent.cli(&["status", "--json"]).await?)?;
    assert_eq!(after["presence"]["state"], "away", "{after}");
    assert_eq!(after["presence"]["source"], "manual", "{after}");
    assert_eq!(after["manual"], before["manual"], "{after}");
    // 08:00 in Berlin in winter is 07:00 UTC.
    assert_eq!(after["manual"]["until"], "2099-01-01T07:00:00Z", "{after}");
    master
        .wait_for_worker("lab-3", "the restarted worker still away", |worker| {
            worker["connected"] == true && worker["state"] == "away" && worker["source"] == "manual"
        })
        .await?;
    agent.stop().await
}

/// Runs the three CLI verbs against `config` and checks each says, in one
/// line on stderr, that no agent runs, and exits 1.
async fn assert_no_agent(config: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let worker = bin_dir()?.join("worker");
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["set-availability", "away", "--for", "1h"],
        &["stop", "--graceful"],
    ] {
        let output = Command::new(&worker)
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .await?;
        let stderr = String::from_utf8(output.stderr)?;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "no worker agent is running (state dir {})\n",
                state_dir.display()
            ),
            "{args:?}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_without_an_agent_says_so_in_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, worker_toml("ws://127.0.0.1:9", "t0ken"))?;
    let state_dir = dir.path().join("state");
    // Never started: no state dir at all.
    assert_no_agent(&config, &state_dir).await?;

    // Killed without a chance to clean up: the socket file stays behind.
    let mut agent = Agent::start(dir.path(), &worker_toml("ws://127.0.0.1:9", "t0ken")).await?;
    agent.kill().await?;
    assert!(state_dir.join("control.sock").exists());
    assert_no_agent(&config, &state_dir).await?;

    // And the next start takes the stale socket over.
    agent.restart().await?;
    let status = stdout_json(&agent.cli(&["status", "--json"]).await?)?;
    assert_eq!(status["worker"], "lab-3");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut agent = Agent::start(dir.path(), &worker_toml("ws://127.0.0.1:9", "t0ken")).await?;
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
        let output = agent.cli(args).await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} says what is wrong");
    }
    let status = stdout_json(&agent.cli(&["status", "--json"]).await?)?;
    assert_eq!(status["presence"]["state"], "available", "{status}");
    assert!(status.get("manual").is_none(), "{status}");
    assert_eq!(status["stopping"], false, "{status}");

    // A bad worker.toml is a config error: exit 2, naming the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nmaster = \"ws://127.0.0.1:9\"\nmax_bulds = 2\n",
    )?;
    let output = Command::new(bin_dir()?.join("worker"))
        .args(["status", "--config"])
        .arg(&bad)
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_bulds"));
    agent.stop().await
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
    tokio::time::timeout(control_support::WAIT, stream.read_to_string(&mut answer)).await??;
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
    let dir = tempfile::tempdir()?;
    let mut agent = Agent::start(dir.path(), &worker_toml("ws://127.0.0.1:9", "t0ken")).await?;
    let url = agent.url()?;
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
    let status = stdout_json(&agent.cli(&["status", "--json"]).await?)?;
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
    let status = stdout_json(&agent.cli(&["status", "--json"]).await?)?;
    assert_eq!(status["presence"]["state"], "away", "{status}");
    agent.stop().await
}
