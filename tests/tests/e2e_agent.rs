//! End-to-end tests of the worker agent against a real master: both binaries
//! started on loopback over TLS by the harness, driven through their CLIs
//! and signals.
//!
//! Build steps wait for "gate" files the test creates, so a test decides
//! exactly when a build may finish. Every wait is on a fact the master's API
//! or the agent's status shows (a build's state and worker, a worker's
//! presence and source, the agent's master link), or on a process exit.

use std::path::PathBuf;

use nightshift_policy::{PresenceState, Source};
use nightshift_proto::api::{BuildInfo, BuildState};
use nightshift_proto::wire::{BuildId, Outcome};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};
use nix::sys::signal::Signal;

/// A farm whose builder `gated` runs on `names`; its one step waits for the
/// gate file of its build id. Builder `env` prints what systemd could leak.
struct Gated {
    farm: Farm,
    gates: tempfile::TempDir,
}

fn available(name: &str) -> WorkerSpec {
    WorkerSpec::new(name).worker_toml("[availability]\ntimezone = \"UTC\"\ndefault = \"available\"")
}

impl Gated {
    async fn start(specs: Vec<WorkerSpec>) -> anyhow::Result<Gated> {
        let gates = tempfile::tempdir()?;
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let wait = format!(
            "n=0; while [ ! -e {}/$NIGHTSHIFT_BUILD_ID ]; do n=$((n+1)); [ $n -gt 2400 ] && exit 9; sleep 0.05; done; echo done-$NIGHTSHIFT_BUILD_ID",
            gates.path().display()
        );
        let mut builder = Farm::builder()
            .missing_timeout("2s")
            .builder("gated", &names, &[("wait", &wait)])
            .builder(
                "env",
                &names,
                &[(
                    "env",
                    "echo notify=${NOTIFY_SOCKET-unset} watchdog=${WATCHDOG_USEC-unset}",
                )],
            );
        for spec in specs {
            builder = builder.worker(spec);
        }
        Ok(Gated {
            farm: builder.start().await?,
            gates,
        })
    }

    async fn submit(&self, builder: &str) -> anyhow::Result<BuildId> {
        Ok(self
            .farm
            .api()?
            .submit(builder, Default::default())
            .await?
            .build_id)
    }

    fn open_gate(&self, id: BuildId) -> anyhow::Result<()> {
        fs_err::write(self.gates.path().join(id.to_string()), b"")?;
        Ok(())
    }

    /// Starts `name`'s agent and waits until the master sees it available.
    async fn start_worker(&mut self, name: &str) -> anyhow::Result<()> {
        self.farm.start_worker(name)?;
        self.farm
            .wait_worker_state(name, PresenceState::Available)
            .await?;
        Ok(())
    }

    async fn wait_running_on(&self, id: BuildId, worker: &str) -> anyhow::Result<BuildInfo> {
        self.farm
            .wait_build_state(id, &format!("build {id} running on {worker}"), |b| {
                b.state == BuildState::Running && b.worker.as_deref() == Some(worker)
            })
            .await
    }

    fn spooled(&self, worker: &str, id: BuildId) -> PathBuf {
        self.farm
            .worker_state_dir(worker)
            .join(format!("results/{id}.json"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_turned_away_mid_build_finishes_it_and_gets_no_new_one() -> anyhow::Result<()> {
    let mut g = Gated::start(vec![available("w1"), available("w2")]).await?;
    g.start_worker("w1").await?;
    let first = g.submit("gated").await?;
    g.wait_running_on(first, "w1").await?;

    let (code, _, stderr) = g.farm.worker_cli(
        "w1",
        &["set-availability", "away", "--reason", "owner is back"],
    )?;
    assert_eq!(code, 0, "set-availability failed: {stderr}");
    g.farm.wait_worker_state("w1", PresenceState::Away).await?;
    g.start_worker("w2").await?;
    let second = g.submit("gated").await?;
    let third = g.submit("gated").await?;
    g.wait_running_on(second, "w2").await?;
    g.open_gate(second)?;
    g.open_gate(third)?;
    assert_eq!(
        g.farm.wait_build(second).await?.worker.as_deref(),
        Some("w2")
    );
    assert_eq!(
        g.farm.wait_build(third).await?.worker.as_deref(),
        Some("w2")
    );

    // The away worker's own build was never disturbed.
    let running = g.farm.api()?.build(first).await?;
    assert_eq!(running.state, BuildState::Running, "{running:?}");
    assert_eq!(running.worker.as_deref(), Some("w1"));
    let workers = g.farm.api()?.workers().await?;
    let w1 = workers
        .workers
        .iter()
        .find(|worker| worker.name == "w1")
        .expect("w1 is listed");
    assert_eq!(w1.state, PresenceState::Away);
    assert_eq!(w1.running, vec![first]);

    g.open_gate(first)?;
    let first = g.farm.wait_build(first).await?;
    assert_eq!(first.worker.as_deref(), Some("w1"));
    assert_eq!(first.outcome, Some(Outcome::Success));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_exits_zero_after_its_build_and_the_queued_request_runs_elsewhere()
-> anyhow::Result<()> {
    let mut g = Gated::start(vec![available("w1"), available("w2")]).await?;
    g.start_worker("w1").await?;
    let first = g.submit("gated").await?;
    g.wait_running_on(first, "w1").await?;

    let (code, _, stderr) = g.farm.worker_cli("w1", &["stop", "--graceful"])?;
    assert_eq!(code, 0, "worker stop --graceful failed: {stderr}");
    g.farm
        .wait_worker("w1", "w1 away because it is stopping", |w| {
            w.state == PresenceState::Away && w.source == Some(Source::Stopping)
        })
        .await?;
    let second = g.submit("gated").await?;
    g.start_worker("w2").await?;
    g.wait_running_on(second, "w2").await?;
    g.open_gate(second)?;
    assert_eq!(
        g.farm.wait_build(second).await?.worker.as_deref(),
        Some("w2")
    );

    g.open_gate(first)?;
    let code = g.farm.wait_worker_exit("w1", DEADLINE).await?;
    assert_eq!(code, Some(0), "{}", g.farm.worker_log("w1"));
    let first = g.farm.wait_build(first).await?;
    assert_eq!(first.worker.as_deref(), Some("w1"));
    assert_eq!(first.outcome, Some(Outcome::Success));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_a_graceful_stop_and_a_second_one_cancels_the_build_for_requeueing()
-> anyhow::Result<()> {
    let mut g = Gated::start(vec![available("w1"), available("w2")]).await?;
    g.start_worker("w1").await?;
    let first = g.submit("gated").await?;
    g.wait_running_on(first, "w1").await?;

    g.farm.signal_worker("w1", Signal::SIGTERM)?;
    g.farm
        .wait_worker("w1", "w1 stopping after SIGTERM", |w| {
            w.source == Some(Source::Stopping)
        })
        .await?;
    g.farm.signal_worker("w1", Signal::SIGTERM)?;
    let code = g.farm.wait_worker_exit("w1", DEADLINE).await?;
    assert_eq!(code, Some(0), "{}", g.farm.worker_log("w1"));
    // Cancelled on w1 and back in the queue, not finished.
    let requeued = g
        .farm
        .wait_build_state(first, "the cancelled build re-queued", |b| {
            b.state == BuildState::Queued
        })
        .await?;
    assert_eq!(requeued.outcome, None, "{requeued:?}");

    // It runs on the next worker.
    g.open_gate(first)?;
    g.start_worker("w2").await?;
    let build = g.farm.wait_build(first).await?;
    assert_eq!(build.worker.as_deref(), Some("w2"));
    assert_eq!(build.outcome, Some(Outcome::Success));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_build_has_its_build_requeued_and_finished_elsewhere()
-> anyhow::Result<()> {
    let mut g = Gated::start(vec![available("w1"), available("w2")]).await?;
    g.start_worker("w1").await?;
    let first = g.submit("gated").await?;
    g.wait_running_on(first, "w1").await?;
    g.farm.kill_worker("w1")?;

    g.start_worker("w2").await?;
    g.open_gate(first)?;
    let build = g.farm.wait_build(first).await?;
    assert_eq!(build.worker.as_deref(), Some("w2"));
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert!(build.retries >= 1, "{build:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_restarted_receives_the_result_of_a_build_that_finished_meanwhile()
-> anyhow::Result<()> {
    let mut g = Gated::start(vec![available("w1")]).await?;
    g.start_worker("w1").await?;
    let first = g.submit("gated").await?;
    g.wait_running_on(first, "w1").await?;

    g.farm.kill_master().await?;
    g.open_gate(first)?;
    // With the master gone, the agent keeps the result in its spool.
    let spooled = g.spooled("w1", first);
    wait_for(
        "the result spooled while the master is down",
        DEADLINE,
        || {
            let exists = spooled.exists();
            async move { Ok(exists.then_some(())) }
        },
    )
    .await?;

    g.farm.start_master().await?;
    let build = g.farm.wait_build(first).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("w1"));
    let log = g.farm.api()?.log(first).await?.log;
    assert!(log.contains(&format!("done-{first}")), "{log}");
    // Acknowledged, so no longer spooled.
    wait_for("the result unspooled after the ack", DEADLINE, || {
        let gone = !spooled.exists();
        async move { Ok(gone.then_some(())) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_stopping_and_builds_never_see_its_socket() -> anyhow::Result<()> {
    let mut g = Gated::start(vec![available("w1").env("WATCHDOG_USEC", "60000000")]).await?;
    g.farm.start_worker("w1")?;
    g.farm.wait_worker_ready("w1").await?;

    let build = g.submit("env").await?;
    let info = g.farm.wait_build(build).await?;
    assert_eq!(info.outcome, Some(Outcome::Success));
    let log = g.farm.api()?.log(build).await?.log;
    assert!(log.contains("notify=unset watchdog=unset"), "{log}");

    g.farm.signal_worker("w1", Signal::SIGTERM)?;
    let agent = g.farm.agent("w1").expect("w1 runs");
    let mut notifications = agent.notifications_watch();
    tokio::time::timeout(
        DEADLINE,
        notifications.wait_for(|seen| seen.iter().any(|m| m == "STOPPING=1")),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no STOPPING=1 within {DEADLINE:?}"))?
    .map_err(|_| anyhow::anyhow!("the notify socket reader stopped"))?;
    let code = g.farm.wait_worker_exit("w1", DEADLINE).await?;
    assert_eq!(code, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_without_disturbing_a_running_build() -> anyhow::Result<()> {
    let mut g = Gated::start(vec![
        available("w1").presents_token("not-the-right-token"),
        available("w2"),
    ])
    .await?;
    g.start_worker("w2").await?;
    let first = g.submit("gated").await?;
    g.wait_running_on(first, "w2").await?;

    g.farm.start_worker("w1")?;
    g.farm.wait_worker_ready("w1").await?;
    // The agent says why it is not connected; it keeps trying, with
    // backoff, and never gets in.
    let refused = wait_for("w1's agent to report the refusal", DEADLINE, || {
        let status = g.farm.worker_cli_json("w1", &["status", "--json"]);
        async move {
            let status = status?;
            let error = status["master"]["error"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            Ok(error.contains("refused").then_some(status))
        }
    })
    .await?;
    assert_eq!(refused["master"]["connected"], false, "{refused}");
    let workers = g.farm.api()?.workers().await?;
    let w1 = workers
        .workers
        .iter()
        .find(|w| w.name == "w1")
        .expect("w1 is listed");
    assert!(!w1.connected, "{w1:?}");

    g.open_gate(first)?;
    let build = g.farm.wait_build(first).await?;
    assert_eq!(build.worker.as_deref(), Some("w2"));
    assert_eq!(build.outcome, Some(Outcome::Success));
    Ok(())
}

#[test]
fn a_bad_config_exits_2_naming_the_problem() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("worker.toml");
    fs_err::write(
        &config,
        "name = \"w1\"\nmaster = \"wss://127.0.0.1:1\"\ntoken = \"t\"\nmax_bulds = 2\n",
    )?;
    let output = std::process::Command::new(nightshift_tests::bin_dir()?.join("worker"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_bulds"), "{stderr}");
    assert!(stderr.contains("worker.toml"), "{stderr}");
    Ok(())
}

/// The master's count of TLS handshakes of `kind` ("full", "resumed").
async fn tls_handshakes(farm: &Farm, kind: &str) -> anyhow::Result<u64> {
    let (status, text) = farm.api()?.call_raw("GET", "/metrics", None).await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {text}");
    let line = format!("nightshift_master_tls_handshakes_total{{kind=\"{kind}\"}} ");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no {line:?} in /metrics:\n{text}"))?;
    Ok(value.trim().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumes_its_tls_session_after_a_master_restart() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut g = Gated::start(vec![available("w1")]).await?;
    g.start_worker("w1").await?;
    // Its first connection was a full handshake, and the master keeps the
    // key that sealed the worker's session ticket, readable by it only.
    let keys = g.farm.data_dir().join("tls").join("ticket.keys");
    let mode = fs_err::metadata(&keys)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", keys.display());

    g.farm.kill_master().await?;
    g.farm.start_master().await?;
    // The restarted master opens the ticket the worker presents (the
    // admin API client of this test has none: its handshakes are full).
    let resumed = wait_for(
        "the worker's reconnection resumed its TLS session",
        DEADLINE,
        || async {
            let resumed = tls_handshakes(&g.farm, "resumed").await?;
            Ok((resumed >= 1).then_some(resumed))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\nmaster log:\n{}", g.farm.master_log()))?;
    assert!(resumed >= 1);
    assert!(tls_handshakes(&g.farm, "full").await? >= 1);
    g.farm
        .wait_worker_state("w1", PresenceState::Available)
        .await?;
    let build = g.submit("env").await?;
    assert_eq!(
        g.farm.wait_build(build).await?.outcome,
        Some(Outcome::Success)
    );
    Ok(())
}
