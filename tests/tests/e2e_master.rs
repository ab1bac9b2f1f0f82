//! End-to-end tests of the real `master` binary: raw fake agents over TLS
//! WebSockets exercise authentication, bad frames, assignment rules, pause,
//! restarts and missing workers; the last tests use real `worker` agents.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightshift_policy::PresenceState;
use nightshift_proto::api::BuildState;
use nightshift_proto::wire::{AgentMessage, MasterMessage, Outcome};
use nightshift_tests::{DEADLINE, FakeAgent, Farm, WorkerSpec, presence, wait_for};

async fn two_worker_farm() -> anyhow::Result<Farm> {
    Farm::builder()
        .worker(WorkerSpec::new("a"))
        .worker(WorkerSpec::new("b"))
        .builder("app", &["a", "b"], &[("build", "echo building")])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_at_the_upgrade() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let refusal = FakeAgent::try_connect(&farm, Some("not-the-token"))
        .await?
        .err()
        .expect("a wrong token gets no WebSocket");
    assert_eq!(refusal.status, 401, "{refusal:?}");
    assert!(refusal.error.contains("wrong token"), "{refusal:?}");
    // No token at all is refused too, and names the header.
    let refusal = FakeAgent::try_connect(&farm, None)
        .await?
        .err()
        .expect("no token gets no WebSocket");
    assert_eq!(refusal.status, 401, "{refusal:?}");
    assert!(refusal.error.contains("Authorization"), "{refusal:?}");
    // A valid token naming another worker in its hello is refused there.
    let token_a = farm.worker_spec("a")?.token.clone();
    let mut agent = FakeAgent::connect(&farm, Some(&token_a)).await?;
    agent
        .hello("b", PresenceState::Available, 1, vec![])
        .await?;
    let seen = agent.expect_closed().await?;
    assert!(
        matches!(seen.first(), Some(MasterMessage::Refused { reason }) if reason.contains("wrong token")),
        "{seen:?}"
    );
    let workers = farm.api()?.workers().await?;
    assert!(workers.workers.iter().all(|w| !w.connected));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_agents_the_master_answers_retry_after_and_keeps_serving() -> anyhow::Result<()> {
    let farm = Farm::builder()
        .worker(WorkerSpec::new("a"))
        .worker(WorkerSpec::new("b"))
        .worker(WorkerSpec::new("c"))
        .builder("app", &["a", "b", "c"], &[("build", "echo building")])
        .master_toml("max_agents = 2")
        .start()
        .await?;
    assert!(
        farm.master_log().contains("room for 2 agents"),
        "the master says how many agents it can hold:\n{}",
        farm.master_log()
    );
    let token =
        |name: &str| -> anyhow::Result<String> { Ok(farm.worker_spec(name)?.token.clone()) };
    let mut a = FakeAgent::connect(&farm, Some(&token("a")?)).await?;
    a.hello("a", PresenceState::Available, 1, vec![]).await?;
    assert!(matches!(a.recv().await?, MasterMessage::Welcome { .. }));
    let mut b = FakeAgent::connect(&farm, Some(&token("b")?)).await?;
    b.hello("b", PresenceState::Available, 1, vec![]).await?;
    assert!(matches!(b.recv().await?, MasterMessage::Welcome { .. }));
    // The third is shed with a clear answer, not a hang or a crash.
    let refusal = FakeAgent::try_connect(&farm, Some(&token("c")?))
        .await?
        .err()
        .expect("over max_agents the upgrade is refused");
    assert_eq!(refusal.status, 503, "{refusal:?}");
    assert!(refusal.error.contains("limit of 2 agents"), "{refusal:?}");
    let retry_after = refusal.retry_after.expect("a Retry-After header");
    assert!((1..=60).contains(&retry_after), "{refusal:?}");
    // The admin API still answers at the agents' limit, and builds still run.
    let api = farm.api()?;
    let id = api.submit("app", Default::default()).await?.build_id;
    let started = tokio::select! {
        started = a.expect_start() => started?,
        started = b.expect_start() => started?,
    };
    assert_eq!(started, id);
    // A slot frees when an agent leaves; then c gets in.
    b.close().await;
    let mut c =
        nightshift_tests::wait_for("c to get a slot", nightshift_tests::DEADLINE, || async {
            match FakeAgent::try_connect(&farm, Some(&token("c")?)).await? {
                Ok(agent) => Ok(Some(agent)),
                Err(_) => Ok(None),
            }
        })
        .await?;
    c.hello("c", PresenceState::Available, 1, vec![]).await?;
    assert!(matches!(c.recv().await?, MasterMessage::Welcome { .. }));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_refused_with_both_versions() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let token = farm.worker_spec("a")?.token.clone();
    let mut agent = FakeAgent::connect(&farm, Some(&token)).await?;
    agent
        .send_text(r#"{"type":"hello","protocol":99,"worker":"a","future_field":true}"#)
        .await?;
    let seen = agent.expect_closed().await?;
    assert!(
        matches!(seen.first(), Some(MasterMessage::Refused { reason }) if reason.contains("99") && reason.contains("version 1")),
        "{seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_only_that_connection_while_a_build_goes_on() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;

    // b sends bad JSON: only b is closed.
    let mut b = farm.fake_agent("b", PresenceState::Away).await?;
    b.send_text("{this is not json").await?;
    b.expect_closed().await?;
    // A frame over the size limit closes that connection too.
    let mut b = farm.fake_agent("b", PresenceState::Away).await?;
    // The master may reset the connection while the frame is still going out.
    if b.send_text(&"x".repeat(nightshift_proto::wire::MAX_FRAME_BYTES + 10))
        .await
        .is_ok()
    {
        b.expect_closed().await?;
    }
    // Whatever happened to b, the master keeps b's slot usable: b reconnects.
    let b = farm.fake_agent("b", PresenceState::Away).await?;
    b.close().await;
    // A wrong-token attempt (refused at the upgrade) does not disturb a either.
    let refusal = FakeAgent::try_connect(&farm, Some("wrong"))
        .await?
        .err()
        .expect("a wrong token gets no WebSocket");
    assert_eq!(refusal.status, 401, "{refusal:?}");

    a.finish(id, Outcome::Success, "still fine\n").await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("a"));
    assert!(
        farm.master_log().contains("bad frame"),
        "the reason is logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_may_not_finish_another_workers_build() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let mut b = farm.fake_agent("b", PresenceState::Away).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    b.finish(id, Outcome::Failure, "forged\n").await?;
    // b's forged result is refused (the master counts the refusal), and the
    // build still runs on a.
    wait_for("b's forged result to be refused", DEADLINE, || {
        let farm = &farm;
        async move {
            let (status, text) = farm.api()?.call_raw("GET", "/metrics", None).await?;
            anyhow::ensure!(status == 200, "/metrics answered {status}: {text}");
            Ok(text
                .lines()
                .any(|line| {
                    line == "nightshift_master_refused_total{what=\"result\",reason=\"not_handed_to_it\"} 1"
                })
                .then_some(()))
        }
    })
    .await?;
    let build = api.build(id).await?;
    assert_eq!(build.state, BuildState::Running, "{build:?}");
    a.finish(id, Outcome::Success, "genuine\n").await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("a"));
    assert_eq!(api.log(id).await?.log, "genuine\n");
    assert!(farm.master_log().contains("not assigned to it"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_start_finish_stores_the_result_and_the_log() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let props = BTreeMap::from([("branch".to_owned(), "main".to_owned())]);
    let id = api.submit("app", props.clone()).await?.build_id;
    match a.recv().await? {
        MasterMessage::StartBuild {
            build_id,
            builder,
            steps,
            properties,
            source,
            ..
        } => {
            assert_eq!(source, None);
            assert_eq!(build_id, id);
            assert_eq!(builder, "app");
            assert_eq!(steps.len(), 1);
            assert_eq!(steps[0].command, "echo building");
            assert_eq!(properties, props);
        }
        other => panic!("expected StartBuild, got {other:?}"),
    }
    a.finish(id, Outcome::Success, "line 1\nline 2\n").await?;
    loop {
        if let MasterMessage::ResultStored { build_id } = a.recv().await? {
            assert_eq!(build_id, id);
            break;
        }
    }
    let build = farm.wait_build(id).await?;
    assert_eq!(build.state, BuildState::Finished);
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.steps.len(), 1);
    assert_eq!(build.properties, props);
    assert_eq!(api.log(id).await?.log, "line 1\nline 2\n");
    // Delivering the same result again is acknowledged and changes nothing.
    a.finish(id, Outcome::Failure, "other\n").await?;
    loop {
        if let MasterMessage::ResultStored { build_id } = a.recv().await? {
            assert_eq!(build_id, id);
            break;
        }
    }
    assert_eq!(api.build(id).await?.outcome, Some(Outcome::Success));
    // The CLI shows it.
    let (code, out, _) = farm.master_cli(&["builds"])?;
    assert_eq!(code, 0);
    assert!(out.contains("success"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reluctant_worker_gets_a_build_only_when_available_ones_are_busy() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut r = farm.fake_agent("b", PresenceState::Reluctant).await?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let first = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, first);
    assert_eq!(api.build(first).await?.worker.as_deref(), Some("a"));
    let second = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(
        r.expect_start().await?,
        second,
        "a is busy, so the reluctant b gets it"
    );
    a.finish(first, Outcome::Success, "").await?;
    r.finish(second, Outcome::Success, "").await?;
    farm.wait_build(second).await?;
    // Both idle again: the next one goes to the available worker.
    let third = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, third);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_away_worker_gets_no_build_until_it_is_available() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Away).await?;
    match a.recv().await? {
        MasterMessage::Released { reason } => assert!(reason.contains("away"), "{reason}"),
        other => panic!("an away idle worker is released, got {other:?}"),
    }
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm
        .wait_build_state(id, "the build to say what it waits for", |b| {
            b.waiting_for.is_some()
        })
        .await?;
    assert_eq!(build.state, BuildState::Queued);
    let why = build.waiting_for.unwrap_or_default();
    assert!(why.contains("a away") && why.contains("b offline"), "{why}");
    let workers = api.workers().await?;
    let a_info = workers.workers.iter().find(|w| w.name == "a").unwrap();
    assert_eq!(a_info.state, PresenceState::Away);
    assert!(a_info.connected);
    a.send(&AgentMessage::Presence {
        presence: presence(PresenceState::Available),
        outlook: None,
    })
    .await?;
    assert_eq!(a.expect_start().await?, id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_builds_and_resume_hands_them_out() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let (code, out, err) = farm.master_cli(&["pause"])?;
    assert_eq!(code, 0, "{out}{err}");
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm
        .wait_build_state(id, "the paused reason", |b| b.waiting_for.is_some())
        .await?;
    assert_eq!(build.waiting_for.as_deref(), Some("master is paused"));
    assert!(api.workers().await?.paused);
    let (code, _, _) = farm.master_cli(&["resume"])?;
    assert_eq!(code, 0);
    assert_eq!(a.expect_start().await?, id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_restarted_keeps_its_queue_and_takes_a_late_result()
-> anyhow::Result<()> {
    let mut farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let running = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, running);
    a.send(&AgentMessage::BuildAccepted { build_id: running })
        .await?;
    let queued = api.submit("app", BTreeMap::new()).await?.build_id;

    farm.kill_master().await?;
    drop(a);
    farm.start_master().await?;
    let api = farm.api()?;
    assert_eq!(api.build(queued).await?.state, BuildState::Queued);
    assert_eq!(api.build(running).await?.state, BuildState::Running);

    // The agent comes back still running the first build and delivers it.
    let token = farm.worker_spec("a")?.token.clone();
    let mut a = FakeAgent::connect(&farm, Some(&token)).await?;
    a.hello("a", PresenceState::Available, 1, vec![running])
        .await?;
    match a.recv().await? {
        MasterMessage::Welcome { cancel, .. } => assert!(cancel.is_empty(), "{cancel:?}"),
        other => panic!("expected welcome, got {other:?}"),
    }
    a.finish(
        running,
        Outcome::Success,
        "finished while the master was down\n",
    )
    .await?;
    let build = farm.wait_build(running).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(
        api.log(running).await?.log,
        "finished while the master was down\n"
    );
    // And the queued request was not lost.
    assert_eq!(a.expect_start().await?, queued);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_missing_longer_than_missing_timeout_has_its_build_requeued() -> anyhow::Result<()>
{
    let farm = Farm::builder()
        .worker(WorkerSpec::new("a"))
        .worker(WorkerSpec::new("b"))
        .builder("app", &["a", "b"], &[("build", "true")])
        .missing_timeout("2s")
        .start()
        .await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;
    a.close().await;
    let build = farm
        .wait_build_state(id, "the build to be re-queued", |b| b.retries == 1)
        .await?;
    assert_eq!(build.state, BuildState::Queued);
    assert!(
        build
            .retry_reason
            .as_deref()
            .unwrap_or("")
            .contains("missing"),
        "{build:?}"
    );
    let mut b = farm.fake_agent("b", PresenceState::Available).await?;
    assert_eq!(b.expect_start().await?, id);
    // a comes back still running it: told to cancel, since b has it now.
    let token = farm.worker_spec("a")?.token.clone();
    let mut a = FakeAgent::connect(&farm, Some(&token)).await?;
    a.hello("a", PresenceState::Available, 1, vec![id]).await?;
    match a.recv().await? {
        MasterMessage::Welcome { cancel, .. } => assert_eq!(cancel, vec![id]),
        other => panic!("expected welcome, got {other:?}"),
    }
    b.finish(id, Outcome::Success, "").await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.worker.as_deref(), Some("b"));
    assert_eq!(build.retries, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_is_requeued_at_once_and_runs_elsewhere() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    let mut b = farm.fake_agent("b", PresenceState::Available).await?;
    // a turned away in the same instant: it refuses and says so.
    a.send(&AgentMessage::Presence {
        presence: presence(PresenceState::Away),
        outlook: None,
    })
    .await?;
    a.send(&AgentMessage::BuildRefused {
        build_id: id,
        reason: "turned away".into(),
    })
    .await?;
    let refused_at = Instant::now();
    assert_eq!(b.expect_start().await?, id);
    // At once: no timer is involved (a lost build would wait for
    // missing_timeout, 60 s here); the bound leaves room for a loaded machine.
    let waited = refused_at.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "re-queued only after {waited:?}"
    );
    b.finish(id, Outcome::Success, "").await?;
    assert_eq!(farm.wait_build(id).await?.worker.as_deref(), Some("b"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_exits_by_outcome_and_bad_input_is_refused() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let config = farm.config.clone();
    let master = farm.master_bin();
    let cli = std::thread::spawn(move || {
        std::process::Command::new(master)
            .args(["submit", "app", "--wait", "--json", "--config"])
            .arg(config)
            .output()
    });
    let id = a.expect_start().await?;
    a.finish(id, Outcome::Failure, "boom\n").await?;
    let output = cli.join().expect("cli thread")?;
    assert_eq!(output.status.code(), Some(1), "a failed build exits 1");
    let shown: nightshift_proto::api::BuildInfo = serde_json::from_slice(&output.stdout)?;
    assert_eq!(shown.outcome, Some(Outcome::Failure));

    let (code, _, err) = farm.master_cli(&["submit", "nosuchbuilder"])?;
    assert_eq!(code, 1);
    assert!(err.contains("no builder `nosuchbuilder`"), "{err}");
    let (code, _, err) = farm.master_cli(&["submit", "app", "--prop", "novalue"])?;
    assert_eq!(code, 2, "usage error: {err}");
    // A bad token gets 401.
    let bad =
        nightshift_proto::api::ApiClient::new(farm.url(), "nope".into(), Some(farm.tls_client()?))?;
    let err = bad.workers().await.unwrap_err();
    assert_eq!(err.status, Some(401));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_master_toml_exits_2_naming_file_line_and_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("master.toml");
    fs_err::write(
        &config,
        "listen = \"127.0.0.1:1\"\n[[builder]]\nname = \"x\"\nworkers = [\"ghost\"]\nsteps = [{ name = \"s\", command = \"true\" }]\n",
    )?;
    let output = std::process::Command::new(nightshift_tests::bin_dir()?.join("master"))
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("master.toml:4:")
            && err.contains("builder[0].workers[0]")
            && err.contains("ghost"),
        "{err}"
    );
    assert!(
        !dir.path().join("nightshift-data").exists(),
        "nothing created for a bad config"
    );

    // Several different errors in one file: `check` and `run` both report
    // every one of them, each with line, column and key, and exit 2.
    fs_err::write(
        &config,
        "listen = \"127.0.0.1:1\"\nmissing_timeout = \"5 parsecs\"\n\
         [[worker]]\nname = \"w\"\ntoken_sha256 = \"abc\"\n\
         [[lock]]\nname = \"db\"\nscope = \"master\"\n\
         [[builder]]\nname = \"x\"\nworkers = [\"w\"]\ncolour = \"blue\"\n\
         locks = [{ name = \"db\", access = \"sometimes\" }]\n\
         steps = [{ name = \"s\", command = \"true\" }]\n",
    )?;
    for command in ["check", "run"] {
        let output = std::process::Command::new(nightshift_tests::bin_dir()?.join("master"))
            .args([command, "--config"])
            .arg(&config)
            .output()?;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "master {command}: {err}");
        for expected in [
            "master.toml:2:19: missing_timeout: ",
            "master.toml:5:16: worker[0].token_sha256: ",
            "master.toml:12:1: builder[0].colour: unknown key `colour`",
            "master.toml:13:34: builder[0].locks[0].access: unknown value `sometimes`",
        ] {
            assert!(
                err.contains(expected),
                "master {command}: {expected} in {err}"
            );
        }
        assert_eq!(err.lines().count(), 4, "master {command}: {err}");
        assert!(
            !dir.path().join("nightshift-data").exists(),
            "master {command}: nothing created for a bad config"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_worker_runs_a_build_and_its_log_lands() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .builder(
            "app",
            &["w1"],
            &[
                ("greet", "echo hello from the build"),
                ("fail-not", "echo second >&2"),
            ],
        )
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.wait_worker_state("w1", PresenceState::Available)
        .await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
    assert_eq!(build.steps.len(), 2);
    let log = api.log(id).await?.log;
    assert!(
        log.contains("hello from the build") && log.contains("second"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_dropped_after_missed_heartbeats() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    farm.wait_worker_state("a", PresenceState::Available)
        .await?;
    let took = a
        .stay_silent_until_dropped(std::time::Duration::from_secs(60))
        .await?;
    let beat = std::time::Duration::from_secs(nightshift_proto::wire::HEARTBEAT_SECS);
    assert!(took >= beat * 2, "dropped too early: {took:?}");
    farm.wait_worker_state("a", PresenceState::Offline).await?;
    assert!(farm.master_log().contains("missed heartbeats"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_requests_get_clear_errors_and_change_nothing() -> anyhow::Result<()> {
    let farm = two_worker_farm().await?;
    let api = farm.api()?;
    let (status, body) = api
        .call_raw("POST", "/api/v1/builds", Some("{not json".into()))
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("error"), "{body}");
    let (status, body) = api
        .call_raw(
            "POST",
            "/api/v1/builds",
            Some(r#"{"builder":"app","prop":{}}"#.into()),
        )
        .await?;
    assert_eq!(status, 400);
    assert!(body.contains("prop"), "the unknown field is named: {body}");
    let (status, body) = api.call_raw("GET", "/api/v1/builds/abc", None).await?;
    assert_eq!(status, 400);
    assert!(body.contains("`abc` is not a build id"), "{body}");
    let (status, _) = api.call_raw("GET", "/api/v1/builds/9999", None).await?;
    assert_eq!(status, 404);
    assert!(
        api.builds(10).await?.builds.is_empty(),
        "nothing was queued"
    );

    // The dashboard is a plain page listing the workers.
    let (status, page) = api.call_raw("GET", "/", None).await?;
    assert_eq!(status, 200);
    assert!(
        page.contains("nightshift master") && page.contains(">a<"),
        "{page}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_queued_before_any_worker_connects_runs_completely_once() -> anyhow::Result<()> {
    const BURST: usize = 150;
    let farm = Farm::builder()
        .worker(WorkerSpec::new("a").max_builds(2))
        .worker(WorkerSpec::new("b").max_builds(2))
        .builder("app", &["a", "b"], &[("build", "true")])
        .start()
        .await?;
    let api = farm.api()?;
    let mut ids = Vec::new();
    for _ in 0..BURST {
        ids.push(api.submit("app", BTreeMap::new()).await?.build_id);
    }
    // Every StartBuild either agent receives, per build id.
    let starts = Arc::new(Mutex::new(BTreeMap::<u64, u32>::new()));
    let mut tasks = Vec::new();
    for name in ["a", "b"] {
        let token = farm.worker_spec(name)?.token.clone();
        let mut agent = FakeAgent::connect(&farm, Some(&token)).await?;
        agent
            .hello(name, PresenceState::Available, 2, vec![])
            .await?;
        let starts = Arc::clone(&starts);
        tasks.push(tokio::spawn(async move {
            loop {
                match agent.recv().await {
                    Ok(MasterMessage::StartBuild { build_id, .. }) => {
                        *starts
                            .lock()
                            .unwrap_or_else(|poison| poison.into_inner())
                            .entry(build_id)
                            .or_default() += 1;
                        if agent
                            .finish(build_id, Outcome::Success, "ok\n")
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    for id in &ids {
        let build = farm.wait_build(*id).await?;
        assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
        assert_eq!(build.retries, 0);
    }
    let builds = api.builds(1000).await?.builds;
    assert_eq!(builds.len(), BURST);
    // Completely once: each build was started exactly once, and nothing else.
    let starts = starts
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .clone();
    let started: Vec<u64> = starts.keys().copied().collect();
    let mut expected: Vec<u64> = ids.clone();
    expected.sort_unstable();
    assert_eq!(
        started, expected,
        "the builds started are the builds submitted"
    );
    let twice: Vec<_> = starts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "started more than once: {twice:?}");
    let on_a = builds
        .iter()
        .filter(|b| b.worker.as_deref() == Some("a"))
        .count();
    assert!(
        on_a > 0 && on_a < BURST,
        "both workers took builds: {on_a} on a"
    );
    for task in tasks {
        task.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_workers_a_reluctant_one_builds_only_when_the_available_one_is_busy()
-> anyhow::Result<()> {
    let gates = tempfile::tempdir()?;
    // Each build waits for its gate file, so the test decides when it ends.
    let step = format!(
        "n=0; while [ ! -e {}/$NIGHTSHIFT_BUILD_ID ]; do n=$((n+1)); [ $n -gt 1800 ] && exit 9; sleep 0.05; done; echo built-$NIGHTSHIFT_BUILD_ID",
        gates.path().display()
    );
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("eager"))
        .worker(
            WorkerSpec::new("shy")
                .worker_toml("[availability]\ntimezone = \"UTC\"\ndefault = \"reluctant\""),
        )
        .builder("gated", &["shy", "eager"], &[("wait", &step)])
        .start()
        .await?;
    farm.start_worker("eager")?;
    farm.start_worker("shy")?;
    farm.wait_worker_state("eager", PresenceState::Available)
        .await?;
    farm.wait_worker_state("shy", PresenceState::Reluctant)
        .await?;
    let api = farm.api()?;
    let open = |id: u64| fs_err::write(gates.path().join(id.to_string()), b"");

    let first = api.submit("gated", BTreeMap::new()).await?.build_id;
    let first_info = farm
        .wait_build_state(first, "the first build to start", |b| {
            b.state == BuildState::Running
        })
        .await?;
    assert_eq!(
        first_info.worker.as_deref(),
        Some("eager"),
        "available first"
    );
    let second = api.submit("gated", BTreeMap::new()).await?.build_id;
    let second_info = farm
        .wait_build_state(second, "the second build to start", |b| {
            b.state == BuildState::Running
        })
        .await?;
    assert_eq!(second_info.worker.as_deref(), Some("shy"), "eager is busy");
    open(first)?;
    open(second)?;
    assert_eq!(
        farm.wait_build(first).await?.outcome,
        Some(Outcome::Success)
    );
    assert_eq!(
        farm.wait_build(second).await?.outcome,
        Some(Outcome::Success)
    );
    assert!(
        api.log(second)
            .await?
            .log
            .contains(&format!("built-{second}"))
    );

    // Both idle again: the reluctant one is passed over.
    let third = api.submit("gated", BTreeMap::new()).await?.build_id;
    open(third)?;
    assert_eq!(
        farm.wait_build(third).await?.worker.as_deref(),
        Some("eager")
    );
    Ok(())
}
