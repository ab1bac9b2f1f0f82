//! End-to-end tests of the trust boundary (issue 8) through the real
//! `master` (and `worker`) binaries: a worker acts only on builds handed to
//! it (no adopting, forging or consuming another's cancel), what the master
//! counts of it (retries, the wait histogram across a restart), and both
//! `/metrics` (the master's behind the admin token) pass a real Prometheus
//! parser (`promtool`).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use nightshift_policy::PresenceState;
use nightshift_proto::api::BuildState;
use nightshift_proto::wire::{AgentMessage, BuildResult, MasterMessage, Outcome};
use nightshift_tests::{
    DEADLINE, FakeAgent, Farm, WorkerSpec, metric_sample, one_step_result, wait_for,
};

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
    let farm = Farm::with_release("60s").await?;
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
        result: one_step_result(id, Outcome::Success, "forged\n"),
    })
    .await?;
    let text = wait_for("both refusals counted", DEADLINE, || {
        let farm = &farm;
        async move {
            let text = farm.master_metrics().await?;
            let adoption = metric_sample(
                &text,
                "nightshift_master_refused_total",
                "what=\"adoption\",reason=\"builder_does_not_list_it\"",
            );
            let result = metric_sample(
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
    let farm = Farm::with_release("1s").await?;
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
        result: one_step_result(id, Outcome::Success, "forged\n"),
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
            let text = farm.master_metrics().await?;
            Ok((metric_sample(
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
        result: one_step_result(id, Outcome::Success, "genuine\n"),
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
    let farm = Farm::with_release("60s").await?;
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
            ..one_step_result(id, Outcome::Cancelled, "")
        },
    })
    .await?;
    wait_for("b's cancel refused", DEADLINE, || {
        let farm = &farm;
        async move {
            let text = farm.master_metrics().await?;
            Ok((metric_sample(
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
            ..one_step_result(id, Outcome::Cancelled, "cancelled\n")
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

    let text = farm.master_metrics().await?;
    promtool_check("master", &text)?;
    assert!(
        text.contains(
            "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"bad_signature\"} 0"
        ),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "nightshift_master_builds_finished_total",
            "outcome=\"success\""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "nightshift_master_wait_before_start_seconds_count",
            ""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sample(&text, "nightshift_master_queue_depth", "builder=\"app\""),
        0.0
    );
    assert_eq!(
        metric_sample(&text, "nightshift_master_workers_connected", ""),
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
    let text = farm.master_metrics().await?;
    assert_eq!(
        metric_sample(
            &text,
            "nightshift_master_retries_total",
            "reason=\"cancelled_on_worker\""
        ),
        1.0
    );
    Ok(())
}

/// The wait-before-start histogram measures waits this master saw: a build
/// queued before a restart and started after it is not counted (its wait
/// began in the previous process); one queued after the restart is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_restored_at_a_restart_stay_out_of_the_wait_histogram() -> anyhow::Result<()> {
    let mut farm = Farm::with_release("60s").await?;
    let api = farm.api()?;
    let restored = api.submit("release", BTreeMap::new()).await?.build_id;
    farm.kill_master().await?;
    farm.start_master().await?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    assert_eq!(a.expect_start().await?, restored);
    let count = |text: &str| {
        metric_sample(
            text,
            "nightshift_master_wait_before_start_seconds_count",
            "",
        )
    };
    let text = farm.master_metrics().await?;
    assert_eq!(count(&text), 0.0, "a restored build was counted:\n{text}");
    a.send(&AgentMessage::BuildFinished {
        result: one_step_result(restored, Outcome::Success, "one\n"),
    })
    .await?;
    farm.wait_build(restored).await?;
    let fresh = api.submit("release", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, fresh);
    let text = farm.master_metrics().await?;
    assert_eq!(
        count(&text),
        1.0,
        "the fresh build was not counted:\n{text}"
    );
    Ok(())
}
