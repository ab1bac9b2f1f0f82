//! End-to-end tests of step-lock grants and their leases (issue 8) through
//! the real `master` binary and fake agents: a grant survives a SIGKILL and
//! restart of the master, ends with its lease (the build is re-queued as a
//! retry and the waiting step runs), and the cool-off after a lease ended
//! survives a restart.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail};
use nightshift_policy::PresenceState;
use nightshift_proto::wire::{AgentMessage, MasterMessage, Outcome, StepResult};
use nightshift_tests::{FakeAgent, Farm, WorkerSpec, metric_sample, one_step_result};

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
        result: one_step_result(first, Outcome::Success, "one\n"),
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
    let text = farm.master_metrics().await?;
    assert_eq!(
        metric_sample(
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
        result: one_step_result(second, Outcome::Success, "two\n"),
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
