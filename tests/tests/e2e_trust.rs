//! End-to-end tests of the trust boundary and backpressure (issue 8) through
//! the real `master` (and `worker`) binaries: a worker acts only on builds
//! handed to it, guarantees that survive a master restart, a latent instance
//! nobody needs is stopped, flooding agents are cut off, logs are capped,
//! and both `/metrics` pass a real Prometheus parser (`promtool`).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail};
use nightshift_policy::PresenceState;
use nightshift_proto::api::BuildState;
use nightshift_proto::wire::{AgentMessage, BuildResult, MasterMessage, Outcome, StepResult};
use nightshift_tests::{DEADLINE, FakeAgent, Farm, WorkerSpec, presence, wait_for};

/// `a` and `b` may build `app`; only `a` may build `release`.
async fn farm_with_release(missing_timeout: &str) -> anyhow::Result<Farm> {
    Farm::builder()
        .worker(WorkerSpec::new("a"))
        .worker(WorkerSpec::new("b"))
        .builder("app", &["a", "b"], &[("build", "echo building")])
        .builder("release", &["a"], &[("build", "echo releasing")])
        .missing_timeout(missing_timeout)
        .start()
        .await
}

fn result(build_id: u64, outcome: Outcome, log: &str) -> BuildResult {
    let now = jiff::Timestamp::now();
    BuildResult {
        build_id,
        outcome,
        steps: vec![StepResult {
            step: 0,
            outcome,
            exit_code: Some(0),
            signal: None,
            started_at: now,
            finished_at: now,
        }],
        reason: None,
        log: log.to_owned(),
        finished_at: now,
    }
}

/// The master's `/metrics` text (admin token).
async fn master_metrics(farm: &Farm) -> anyhow::Result<String> {
    let (status, text) = farm.api()?.call_raw("GET", "/metrics", None).await?;
    if status != 200 {
        bail!("/metrics answered {status}: {text}");
    }
    Ok(text)
}

/// The value of the sample `name{labels}` (labels as written, e.g.
/// `what="result",reason="not_handed_to_it"`), or 0 when absent.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|line| line.strip_prefix(&key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Feeds `text` to `promtool check metrics`; a missing promtool fails the
/// test unless `NIGHTSHIFT_SKIP_PROMTOOL=1`.
fn promtool_check(what: &str, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if std::env::var_os("NIGHTSHIFT_SKIP_PROMTOOL").is_some() => {
            eprintln!("promtool not run ({e}); NIGHTSHIFT_SKIP_PROMTOOL is set");
            return Ok(());
        }
        Err(e) => bail!(
            "cannot run promtool ({e}): install Debian's `prometheus` package, or set \
             NIGHTSHIFT_SKIP_PROMTOOL=1 to skip this check"
        ),
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "promtool rejects the {what} metrics:\n{}{}\n--- text ---\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A worker with its own valid token cannot adopt, by listing it in its
/// hello, nor finish with a forged result, a queued build that was never
/// handed to it, of a builder that does not list it; both are refused,
/// logged with a reason and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_adopt_or_finish_a_queued_build_not_handed_to_it() -> anyhow::Result<()> {
    let farm = farm_with_release("60s").await?;
    let api = farm.api()?;
    let id = api.submit("release", BTreeMap::new()).await?.build_id;

    // b claims to be running it.
    let token = farm.worker_spec("b")?.token.clone();
    let mut b = FakeAgent::connect(&farm, Some(&token)).await?;
    b.hello("b", PresenceState::Away, 1, vec![id]).await?;
    match b.recv().await? {
        MasterMessage::Welcome { cancel, .. } => {
            assert_eq!(cancel, vec![id], "b is told to cancel what is not its")
        }
        other => bail!("expected a welcome, got {other:?}"),
    }
    // ...and finishes it as a success.
    b.send(&AgentMessage::BuildFinished {
        result: result(id, Outcome::Success, "forged\n"),
    })
    .await?;
    let text = wait_for("both refusals counted", DEADLINE, || {
        let farm = &farm;
        async move {
            let text = master_metrics(farm).await?;
            let adoption = sample(
                &text,
                "nightshift_master_refused_total",
                "what=\"adoption\",reason=\"builder_does_not_list_it\"",
            );
            let result = sample(
                &text,
                "nightshift_master_refused_total",
                "what=\"result\",reason=\"builder_does_not_list_it\"",
            );
            Ok((adoption >= 1.0 && result >= 1.0).then_some(text))
        }
    })
    .await?;
    promtool_check("master", &text)?;
    let build = api.build(id).await?;
    assert_eq!(build.state, BuildState::Queued, "{build:?}");
    assert_eq!(build.outcome, None);
    let log = farm.master_log();
    assert!(
        log.contains("worker b") && log.contains("does not list it"),
        "the refusal is logged with its reason:\n{log}"
    );

    // The worker it is for still gets it and finishes it.
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    assert_eq!(a.expect_start().await?, id);
    a.finish(id, Outcome::Success, "genuine\n").await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("a"));
    assert_eq!(api.log(id).await?.log, "genuine\n");
    Ok(())
}

/// A build re-queued after its worker went missing remembers who it was
/// handed to: another worker listed by the same builder cannot deliver a
/// result for it, but the original worker, back, still can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_build_takes_a_result_only_from_the_worker_it_was_handed_to()
-> anyhow::Result<()> {
    let farm = farm_with_release("1s").await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;
    a.close().await;
    farm.wait_build_state(id, "re-queued after a went missing", |b| {
        b.state == BuildState::Queued
    })
    .await?;

    // b (away, so nothing is handed to it) forges the result: it is told
    // the refusal, so a real agent drops it instead of re-sending it.
    let mut b = farm.fake_agent("b", PresenceState::Away).await?;
    b.send(&AgentMessage::BuildFinished {
        result: result(id, Outcome::Success, "forged\n"),
    })
    .await?;
    loop {
        match b.recv().await? {
            MasterMessage::ResultRefused { build_id, reason } => {
                assert_eq!(build_id, id);
                assert!(reason.contains("not handed to it"), "{reason}");
                break;
            }
            MasterMessage::ResultStored { .. } => bail!("the forged result was acknowledged"),
            _ => {}
        }
    }
    wait_for("the forged result refused", DEADLINE, || {
        let farm = &farm;
        async move {
            let text = master_metrics(farm).await?;
            Ok((sample(
                &text,
                "nightshift_master_refused_total",
                "what=\"result\",reason=\"not_handed_to_it\"",
            ) >= 1.0)
                .then_some(()))
        }
    })
    .await?;
    assert_eq!(api.build(id).await?.state, BuildState::Queued);

    // a comes back still running it: adopted, and its result is taken.
    let token = farm.worker_spec("a")?.token.clone();
    let mut a = FakeAgent::connect(&farm, Some(&token)).await?;
    a.hello("a", PresenceState::Available, 1, vec![id]).await?;
    match a.recv().await? {
        MasterMessage::Welcome { cancel, .. } => assert!(cancel.is_empty(), "{cancel:?}"),
        other => bail!("expected a welcome, got {other:?}"),
    }
    farm.wait_build_state(id, "adopted by a", |b| b.state == BuildState::Running)
        .await?;
    a.send(&AgentMessage::BuildFinished {
        result: result(id, Outcome::Success, "genuine\n"),
    })
    .await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("a"));
    assert_eq!(build.retries, 1, "{build:?}");
    assert_eq!(api.log(id).await?.log, "genuine\n");
    Ok(())
}

/// An admin's cancel of a's build cannot be consumed by b: b's `cancelled`
/// result is refused, and a's own cancelled result ends the build as
/// cancelled (not re-queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_worker_cannot_consume_a_cancel() -> anyhow::Result<()> {
    let farm = farm_with_release("60s").await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let mut b = farm.fake_agent("b", PresenceState::Away).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;
    api.cancel(id, Some("not needed")).await?;
    loop {
        if let MasterMessage::CancelBuild { build_id, .. } = a.recv().await? {
            assert_eq!(build_id, id);
            break;
        }
    }
    b.send(&AgentMessage::BuildFinished {
        result: BuildResult {
            reason: Some("forged".into()),
            ..result(id, Outcome::Cancelled, "")
        },
    })
    .await?;
    wait_for("b's cancel refused", DEADLINE, || {
        let farm = &farm;
        async move {
            let text = master_metrics(farm).await?;
            Ok((sample(
                &text,
                "nightshift_master_refused_total",
                "what=\"cancel\",reason=\"not_handed_to_it\"",
            ) >= 1.0)
                .then_some(()))
        }
    })
    .await?;
    assert_eq!(api.build(id).await?.state, BuildState::Running);
    a.send(&AgentMessage::BuildFinished {
        result: BuildResult {
            reason: Some("cancelled by the master: not needed".into()),
            ..result(id, Outcome::Cancelled, "cancelled\n")
        },
    })
    .await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Cancelled), "{build:?}");
    assert_eq!(build.retries, 0);
    assert_eq!(build.worker.as_deref(), Some("a"));
    Ok(())
}

/// `/metrics` needs the admin token, and the agent's `/metrics` passes
/// promtool too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_metrics_endpoints_pass_promtool_and_the_masters_needs_the_admin_token()
-> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .builder("app", &["w1"], &[("build", "echo hi")])
        // A hook, so that its per-hook families have samples to check.
        .master_toml("[[hook]]\nname = \"gh\"\nkind = \"github\"\nsecret_file = \"hook.secret\"\n")
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.wait_worker_ready("w1").await?;
    let id = farm.api()?.submit("app", BTreeMap::new()).await?.build_id;
    farm.wait_build(id).await?;

    let text = master_metrics(&farm).await?;
    promtool_check("master", &text)?;
    assert!(
        text.contains(
            "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"bad_signature\"} 0"
        ),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "nightshift_master_builds_finished_total",
            "outcome=\"success\""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "nightshift_master_wait_before_start_seconds_count",
            ""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "nightshift_master_queue_depth", "builder=\"app\""),
        0.0
    );
    assert_eq!(
        sample(&text, "nightshift_master_workers_connected", ""),
        1.0
    );

    let anonymous = nightshift_proto::api::ApiClient::new(
        farm.url(),
        "wrong".into(),
        Some(farm.tls_client()?),
    )?;
    let (status, _) = anonymous.call_raw("GET", "/metrics", None).await?;
    assert_eq!(status, 401, "the master's metrics need the admin token");

    let url = farm.worker_control_url("w1")?;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let agent_text = http_get(&addr, "/metrics").await?;
    promtool_check("agent", &agent_text)?;
    assert!(agent_text.contains("nightshift_worker_builds_run_total"));
    Ok(())
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut answer)).await??;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer: {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_owned())
}

/// One agent flooding presence frames is disconnected with a reason, while
/// another worker's presence change still reaches the scheduler at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_disconnected_and_others_are_still_heard() -> anyhow::Result<()> {
    let farm = farm_with_release("60s").await?;
    let mut flooder = farm.fake_agent("a", PresenceState::Available).await?;
    let mut calm = farm.fake_agent("b", PresenceState::Away).await?;
    let flood = tokio::spawn(async move {
        let mut sent = 0u32;
        for i in 0..5_000u32 {
            let state = if i % 2 == 0 {
                PresenceState::Away
            } else {
                PresenceState::Available
            };
            if flooder
                .send(&AgentMessage::Presence {
                    presence: presence(state),
                    outlook: None,
                })
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        let closed = flooder.expect_closed().await;
        (sent, closed)
    });
    let began = Instant::now();
    calm.send(&AgentMessage::Presence {
        presence: presence(PresenceState::Available),
        outlook: None,
    })
    .await?;
    farm.wait_worker_state("b", PresenceState::Available)
        .await?;
    let heard_after = began.elapsed();
    let (sent, closed) = flood.await?;
    closed.context("the flooder's connection is closed")?;
    assert!(sent < 5_000 || farm.master_log().contains("rate limit"));
    let log = farm.master_log();
    assert!(
        log.contains("worker a: disconnected: rate limit"),
        "the reason is logged:\n{log}"
    );
    let text = master_metrics(&farm).await?;
    assert_eq!(
        sample(
            &text,
            "nightshift_master_agent_disconnects_total",
            "reason=\"rate_limited\""
        ),
        1.0,
        "{text}"
    );
    eprintln!("calm worker's presence heard after {heard_after:?} during the flood");
    assert!(heard_after < DEADLINE);
    Ok(())
}

/// A build's log is capped at `max_log_bytes`; past it, the log says how
/// many bytes were dropped, both for the live stream and the final log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builds_log_is_capped_and_says_how_much_was_dropped() -> anyhow::Result<()> {
    let farm = Farm::builder()
        .worker(WorkerSpec::new("a"))
        .builder("app", &["a"], &[("build", "yes")])
        .master_toml("max_log_bytes = 4096\n")
        .start()
        .await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;
    let chunk = "y\n".repeat(512); // 1 KiB
    for _ in 0..10 {
        a.send(&AgentMessage::Output {
            build_id: id,
            step: 0,
            data: chunk.clone(),
        })
        .await?;
    }
    let live = wait_for("the live log to reach its cap", DEADLINE, || {
        let api = &api;
        async move {
            let log = api.log(id).await?.log;
            Ok(log.contains("bytes dropped").then_some(log))
        }
    })
    .await?;
    assert!(
        live.starts_with(&"y\n".repeat(2048)),
        "the first 4096 bytes are kept"
    );
    assert!(
        live.ends_with(
            "[nightshift: 6144 bytes dropped: this build's log reached its cap (max_log_bytes)]\n"
        ),
        "{}",
        &live[4096..]
    );

    let full = "y\n".repeat(5 * 1024); // 10 KiB
    a.send(&AgentMessage::BuildFinished {
        result: result(id, Outcome::Success, &full),
    })
    .await?;
    farm.wait_build(id).await?;
    let log = api.log(id).await?.log;
    assert_eq!(
        log,
        format!(
            "{}[nightshift: 6144 bytes dropped: this build's log reached its cap (max_log_bytes)]\n",
            "y\n".repeat(2048)
        )
    );
    let text = master_metrics(&farm).await?;
    assert!(sample(&text, "nightshift_master_log_bytes_dropped_total", "") >= 12288.0);
    Ok(())
}

/// A real agent sends no output past `max_log_bytes`: a step printing
/// ~1.3 MB runs to its end, the bytes that cross the link stay under the
/// cap (the master's `output_bytes_received` metric), and the log says once
/// that it is full and, last, how much was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_sends_no_output_past_max_log_bytes() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("a"))
        .builder(
            "app",
            &["a"],
            &[("loud", "seq 1 200000"), ("after", "echo after")],
        )
        .master_toml("max_log_bytes = 16384\n")
        .start()
        .await?;
    farm.start_worker("a")?;
    farm.wait_worker_ready("a").await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm.wait_build(id).await?;
    assert_eq!(
        build.outcome,
        Some(Outcome::Success),
        "{build:?}\n{}",
        farm.worker_log("a")
    );
    let text = master_metrics(&farm).await?;
    let crossed = sample(&text, "nightshift_master_output_bytes_received_total", "");
    assert!(
        crossed > 0.0 && crossed <= 16384.0,
        "{crossed} bytes of output crossed the link (max_log_bytes 16384)"
    );
    let log = api.log(id).await?.log;
    assert!(log.len() <= 16384, "{} bytes stored", log.len());
    assert_eq!(
        log.matches("log reached max_log_bytes (16384 bytes)")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.trim_end()
            .ends_with("bytes of output past max_log_bytes were not sent]"),
        "{}",
        &log[log.len().saturating_sub(300)..]
    );
    assert!(
        farm.worker_log("a")
            .contains("its log reached max_log_bytes (16384 bytes)"),
        "{}",
        farm.worker_log("a")
    );
    Ok(())
}

/// A build cancelled at `worker stop --graceful --deadline 2s` ran: it is
/// re-queued as a retry with the reason, and the agent's log says 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_cancelled_at_the_stop_deadline_counts_as_a_retry_with_the_reason()
-> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .builder("app", &["w1"], &[("build", "sleep 300")])
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.wait_worker_ready("w1").await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    farm.wait_build_state(id, "running on w1", |b| b.state == BuildState::Running)
        .await?;
    let (code, _, stderr) = farm.worker_cli("w1", &["stop", "--graceful", "--deadline", "2s"])?;
    assert_eq!(code, 0, "{stderr}");
    let build = farm
        .wait_build_state(id, "re-queued at the deadline", |b| {
            b.state == BuildState::Queued && b.retries == 1
        })
        .await?;
    let reason = build.retry_reason.clone().unwrap_or_default();
    assert_eq!(
        reason, "cancelled on worker w1: its stop deadline of 2 s ran out",
        "{build:?}"
    );
    farm.wait_worker_exit("w1", DEADLINE).await?;
    let log = farm.worker_log("w1");
    assert!(log.contains("cancelling them in 2 s"), "{log}");
    let text = master_metrics(&farm).await?;
    assert_eq!(
        sample(
            &text,
            "nightshift_master_retries_total",
            "reason=\"cancelled_on_worker\""
        ),
        1.0
    );
    Ok(())
}

/// A latent instance that comes up after its build was taken by another
/// worker is stopped after `build_wait_timeout` (it used to run forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latent_instance_that_comes_up_for_nothing_is_stopped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The instance boots in 2 s: a wrapper that waits, then runs the worker.
    let wrapper = {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("slow-boot-worker");
        let worker = nightshift_tests::bin_dir()?.join("worker");
        fs_err::write(
            &path,
            format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", worker.display()),
        )?;
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        path
    };
    let extra = format!(
        r#"
[[worker]]
name = "l1"
max_builds = 1
latent = {{ provider = "process", worker_bin = {bin}, build_wait_timeout = "2s" }}
"#,
        bin = serde_json::to_string(&wrapper.display().to_string())?,
    );
    let farm = Farm::builder()
        .worker(WorkerSpec::new("w"))
        .builder("app", &["w", "l1"], &[("build", "true")])
        .master_toml(&extra)
        .start()
        .await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    wait_for("l1 to be starting", DEADLINE, || {
        let api = &api;
        async move {
            let workers = api.workers().await?.workers;
            let l1 = workers.into_iter().find(|w| w.name == "l1");
            Ok(l1
                .and_then(|w| w.latent)
                .filter(|l| l.state == "starting")
                .map(|_| ()))
        }
    })
    .await?;
    let mut w = farm.fake_agent("w", PresenceState::Available).await?;
    assert_eq!(w.expect_start().await?, id);
    w.finish(id, Outcome::Success, "done\n").await?;
    farm.wait_build(id).await?;

    // l1 comes up with nothing to do, then is stopped.
    farm.wait_worker("l1", "l1 connected", |w| w.connected)
        .await?;
    let stopped = wait_for("l1 to be stopped", DEADLINE, || {
        let api = &api;
        async move {
            let workers = api.workers().await?.workers;
            let l1 = workers.into_iter().find(|w| w.name == "l1");
            Ok(l1.and_then(|w| w.latent).filter(|l| l.state == "stopped"))
        }
    })
    .await?;
    assert!(
        stopped.reason.contains("idle for build_wait_timeout (2s)"),
        "{stopped:?}"
    );
    Ok(())
}

/// master.toml for the step-lock tests: one exclusive `compile` lock taken
/// by the only step of `app`, which `a` and `b` build.
async fn step_lock_farm(step_timeout: Option<&str>) -> anyhow::Result<Farm> {
    let timeout = step_timeout
        .map(|t| format!(", timeout = \"{t}\""))
        .unwrap_or_default();
    let extra = format!(
        r#"
[[lock]]
name = "compile"
scope = "master"
max_count = 1

[[builder]]
name = "app"
workers = ["a", "b"]
steps = [{{ name = "compile", command = "true"{timeout}, locks = [{{ name = "compile", access = "exclusive" }}] }}]
"#
    );
    Farm::builder()
        .worker(WorkerSpec::new("a"))
        .worker(WorkerSpec::new("b"))
        .master_toml(&extra)
        .start()
        .await
}

async fn expect_granted(agent: &mut FakeAgent, id: u64) -> anyhow::Result<()> {
    loop {
        if let MasterMessage::StepGranted { build_id, step } = agent.recv().await? {
            assert_eq!((build_id, step), (id, 0));
            return Ok(());
        }
    }
}

async fn waiting_for_lock(farm: &Farm, id: u64) -> anyhow::Result<()> {
    farm.wait_build_state(id, "its step to wait for lock compile", |b| {
        b.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("lock compile"))
    })
    .await?;
    Ok(())
}

/// A step holding a `max_count = 1` lock keeps it across a SIGKILL and
/// restart of the master: the waiting step, back first, still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_lock_hold_survives_a_master_restart() -> anyhow::Result<()> {
    let mut farm = step_lock_farm(None).await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let first = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, first);
    a.accept_and_wait_for_step(first, 0).await?;
    expect_granted(&mut a, first).await?;

    let mut b = farm.fake_agent("b", PresenceState::Available).await?;
    let second = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(b.expect_start().await?, second);
    b.accept_and_wait_for_step(second, 0).await?;
    waiting_for_lock(&farm, second).await?;

    farm.kill_master().await?;
    drop((a, b));
    farm.start_master().await?;

    // The waiting one reconnects first and asks again: it still waits.
    let reconnect = |name: &'static str, id: u64| {
        let farm = &farm;
        async move {
            let token = farm.worker_spec(name)?.token.clone();
            let mut agent = FakeAgent::connect(farm, Some(&token)).await?;
            agent
                .hello(name, PresenceState::Available, 1, vec![id])
                .await?;
            match agent.recv().await? {
                MasterMessage::Welcome { cancel, .. } => assert!(cancel.is_empty(), "{cancel:?}"),
                other => bail!("expected a welcome, got {other:?}"),
            }
            agent
                .send(&AgentMessage::StepWaiting {
                    build_id: id,
                    step: 0,
                })
                .await?;
            anyhow::Ok(agent)
        }
    };
    let mut b = reconnect("b", second).await?;
    waiting_for_lock(&farm, second).await?;
    // The holder comes back; its repeated request is answered.
    let mut a = reconnect("a", first).await?;
    expect_granted(&mut a, first).await?;
    let now = jiff::Timestamp::now();
    a.send(&AgentMessage::StepFinished {
        build_id: first,
        result: StepResult {
            step: 0,
            outcome: Outcome::Success,
            exit_code: Some(0),
            signal: None,
            started_at: now,
            finished_at: now,
        },
    })
    .await?;
    // Only now does the waiting step get the lock.
    expect_granted(&mut b, second).await?;
    a.send(&AgentMessage::BuildFinished {
        result: result(first, Outcome::Success, "one\n"),
    })
    .await?;
    assert_eq!(
        farm.wait_build(first).await?.outcome,
        Some(Outcome::Success)
    );
    Ok(())
}

/// A step that got its lock and never finishes loses it when its lease (the
/// step's timeout plus grace) ends: the build is cancelled on its worker
/// and re-queued as a retry with the reason, and the waiting step runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_lock_grant_ends_with_its_lease() -> anyhow::Result<()> {
    let farm = step_lock_farm(Some("1s")).await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let first = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, first);
    a.accept_and_wait_for_step(first, 0).await?;
    expect_granted(&mut a, first).await?;
    let granted_at = Instant::now();

    let mut b = farm.fake_agent("b", PresenceState::Available).await?;
    let second = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(b.expect_start().await?, second);
    b.accept_and_wait_for_step(second, 0).await?;
    waiting_for_lock(&farm, second).await?;

    // a never finishes its step: the master ends the lease. (Both agents
    // keep reading meanwhile, so they answer the master's heartbeats.)
    let cancelled = async {
        loop {
            if let MasterMessage::CancelBuild { build_id, reason } = a.recv().await? {
                assert_eq!(build_id, first);
                return anyhow::Ok((reason, granted_at.elapsed()));
            }
        }
    };
    let (cancelled, granted) = tokio::join!(cancelled, expect_granted(&mut b, second));
    let (reason, after) = cancelled?;
    granted?;
    assert!(reason.contains("lease ended"), "{reason}");
    // The lease runs from the master's grant, which precedes the agent's
    // receipt of it (`granted_at`) by the grant's delivery time.
    assert!(
        after >= std::time::Duration::from_millis(10_500),
        "not before the step's timeout (1 s) plus the grace (10 s): {after:?}"
    );
    let build = api.build(first).await?;
    assert_eq!(build.retries, 1, "{build:?}");
    assert!(
        build
            .retry_reason
            .as_deref()
            .is_some_and(|r| r.contains("lease ended")),
        "{build:?}"
    );
    let text = master_metrics(&farm).await?;
    assert_eq!(
        sample(
            &text,
            "nightshift_master_retries_total",
            "reason=\"lock_lease_ended\""
        ),
        1.0
    );

    // a is idle and first in the list, but the build does not go straight
    // back to it: it waits for b, which is busy, and says why.
    farm.wait_build_state(first, "waiting, a cooling off", |b| {
        b.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("a cooling off") && w.contains("b busy"))
    })
    .await
    .with_context(|| farm.master_log())?;
    let now = jiff::Timestamp::now();
    b.send(&AgentMessage::StepFinished {
        build_id: second,
        result: StepResult {
            step: 0,
            outcome: Outcome::Success,
            exit_code: Some(0),
            signal: None,
            started_at: now,
            finished_at: now,
        },
    })
    .await?;
    b.send(&AgentMessage::BuildFinished {
        result: result(second, Outcome::Success, "two\n"),
    })
    .await?;
    // b is free: the build goes to b, never to a.
    let handed_to_a = async {
        loop {
            if let MasterMessage::StartBuild { build_id, .. } = a.recv().await?
                && build_id == first
            {
                return anyhow::Ok(());
            }
        }
    };
    tokio::select! {
        started = b.expect_start() => assert_eq!(started?, first),
        wrong = handed_to_a => {
            wrong?;
            bail!("build {first} went straight back to a");
        }
    }
    assert_eq!(api.build(first).await?.worker.as_deref(), Some("b"));
    Ok(())
}

/// The cool-off after a lease ended survives a master restart: the build
/// is still kept from the worker whose step held its locks too long, and
/// goes to the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_cool_off_survives_a_master_restart() -> anyhow::Result<()> {
    let mut farm = step_lock_farm(Some("1s")).await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;
    a.send(&AgentMessage::StepWaiting {
        build_id: id,
        step: 0,
    })
    .await?;
    expect_granted(&mut a, id).await?;
    // a never finishes the step: the lease (1 s + 10 s grace) ends.
    loop {
        if let MasterMessage::CancelBuild { build_id, .. } = a.recv().await?
            && build_id == id
        {
            break;
        }
    }
    let cooling = |b: &nightshift_proto::api::BuildInfo| {
        b.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("a cooling off"))
    };
    farm.wait_build_state(id, "waiting, a cooling off", cooling)
        .await
        .with_context(|| farm.master_log())?;
    drop(a);
    farm.kill_master().await?;
    farm.start_master().await?;
    // a is back, idle and first in the list: the build still waits.
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    farm.wait_worker("a", "a connected", |w| w.connected)
        .await?;
    farm.wait_build_state(
        id,
        "still waiting, a cooling off after the restart",
        cooling,
    )
    .await
    .with_context(|| farm.master_log())?;
    let mut b = farm.fake_agent("b", PresenceState::Available).await?;
    let handed_to_a = async {
        loop {
            if let MasterMessage::StartBuild { build_id, .. } = a.recv().await?
                && build_id == id
            {
                return anyhow::Ok(());
            }
        }
    };
    tokio::select! {
        started = b.expect_start() => assert_eq!(started?, id),
        wrong = handed_to_a => {
            wrong?;
            bail!("build {id} went back to a after the restart:\n{}", farm.master_log());
        }
    }
    Ok(())
}

/// The wait-before-start histogram measures waits this master saw: a build
/// queued before a restart and started after it is not counted (its wait
/// began in the previous process); one queued after the restart is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_restored_at_a_restart_stay_out_of_the_wait_histogram() -> anyhow::Result<()> {
    let mut farm = farm_with_release("60s").await?;
    let api = farm.api()?;
    let restored = api.submit("release", BTreeMap::new()).await?.build_id;
    farm.kill_master().await?;
    farm.start_master().await?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    assert_eq!(a.expect_start().await?, restored);
    let count = |text: &str| {
        sample(
            text,
            "nightshift_master_wait_before_start_seconds_count",
            "",
        )
    };
    let text = master_metrics(&farm).await?;
    assert_eq!(count(&text), 0.0, "a restored build was counted:\n{text}");
    a.send(&AgentMessage::BuildFinished {
        result: result(restored, Outcome::Success, "one\n"),
    })
    .await?;
    farm.wait_build(restored).await?;
    let fresh = api.submit("release", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, fresh);
    let text = master_metrics(&farm).await?;
    assert_eq!(
        count(&text),
        1.0,
        "the fresh build was not counted:\n{text}"
    );
    Ok(())
}

/// VmRSS of process `pid` in bytes, from /proc.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = fs_err::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")?;
    Ok(kib * 1024)
}

/// A step running `yes` on a link the master throttles to 10 frames/s: the
/// real agent stays under 64 MiB resident (the step waits on its pipe while
/// output waits for credit), and the build's result and the end of its log
/// still arrive. (The minute-long run is in `nightshift-bench`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_flooding_a_slow_link_keeps_the_agent_small_and_its_result_arrives()
-> anyhow::Result<()> {
    const LIMIT: u64 = 64 * 1024 * 1024;
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w"))
        .builder(
            "flood",
            &["w"],
            &[("flood", "timeout 12 yes; echo after-the-flood")],
        )
        .master_toml("[agent_limits]\nframes_per_second = 10\nframe_burst = 10\n")
        .start()
        .await?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    let pid = farm.agent("w").context("the worker runs")?.child.id();
    let api = farm.api()?;
    let id = api.submit("flood", BTreeMap::new()).await?.build_id;
    farm.wait_build_state(id, "the flood running", |b| b.state == BuildState::Running)
        .await?;
    // Sample the agent's RSS while the build runs (a measurement, not a
    // synchronisation: the build's end is awaited through the API).
    let mut peak = 0;
    let mut samples = 0;
    let finished = loop {
        peak = peak.max(rss_bytes(pid)?);
        samples += 1;
        let build = api.wait(id, 1).await?;
        if build.state == BuildState::Finished {
            break build;
        }
    };
    eprintln!(
        "agent peak RSS {:.1} MiB over {samples} samples",
        peak as f64 / 1048576.0
    );
    assert!(
        peak < LIMIT,
        "the agent reached {peak} bytes resident (limit {LIMIT})\n{}",
        farm.worker_log("w")
    );
    assert_eq!(
        finished.outcome,
        Some(Outcome::Success),
        "{finished:?}\n{}",
        farm.worker_log("w")
    );
    let log = api.log(id).await?.log;
    assert!(
        log.ends_with("y\nafter-the-flood\n"),
        "the log's end: {:?}",
        &log[log.len().saturating_sub(200)..]
    );
    // The slow link carried megabytes, not gigabytes: the step waited.
    assert!(
        log.len() < 32 * 1024 * 1024,
        "{} bytes: the step was not held back",
        log.len()
    );
    Ok(())
}
