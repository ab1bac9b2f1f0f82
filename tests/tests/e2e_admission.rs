//! End-to-end test of window-aware admission through the real `master` and
//! `worker` binaries: once a builder's history says its builds take ~5 s, a
//! worker whose availability ends in a few seconds is not given one — the
//! build goes to another worker, or waits (saying why in `master builds
//! --json`) — and is never started where the window would cut it.
//!
//! The closing window is the owner's `set-availability available --for 4s`
//! on a worker that is `away` by default: it ends at a chosen instant, which
//! the agent sends to the master with its presence. Everything is awaited
//! with generous deadlines; nothing depends on a tight sleep.

use nightshift_policy::PresenceState;
use nightshift_proto::api::{BuildInfo, BuildList, BuildState, WorkerInfo};
use nightshift_proto::wire::{BuildId, Outcome};
use nightshift_tests::{Farm, WorkerSpec};

/// The builder's one step: about five seconds of work.
const FIVE_SECONDS: &str = "sleep 5";

async fn submit(farm: &Farm) -> anyhow::Result<BuildId> {
    Ok(farm
        .api()?
        .submit("five", Default::default())
        .await?
        .build_id)
}

/// Build `id` as `master builds --json` prints it.
fn listed(farm: &Farm, id: BuildId) -> anyhow::Result<BuildInfo> {
    let (code, stdout, stderr) = farm.master_cli(&["builds", "--json"])?;
    anyhow::ensure!(code == 0, "`master builds --json` exited {code}: {stderr}");
    let list: BuildList = serde_json::from_str(&stdout)?;
    list.builds
        .into_iter()
        .find(|b| b.id == id)
        .ok_or_else(|| anyhow::anyhow!("build {id} is not in `master builds --json`: {stdout}"))
}

/// The owner of `worker` sets its availability by hand.
fn set_availability(farm: &Farm, worker: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["set-availability"];
    all.extend_from_slice(args);
    let (code, _, stderr) = farm.worker_cli(worker, &all)?;
    anyhow::ensure!(
        code == 0,
        "`worker {}` exited {code}: {stderr}",
        all.join(" ")
    );
    Ok(())
}

/// The owner of `worker` makes it available for 4 more seconds; returns it
/// as the master shows it once the master knows that end.
async fn available_for_four_seconds(farm: &Farm, worker: &str) -> anyhow::Result<WorkerInfo> {
    set_availability(farm, worker, &["available", "--for", "4s"])?;
    farm.wait_worker(worker, "it to be available with a known end", |w| {
        w.state == PresenceState::Available && w.until.is_some()
    })
    .await
}

/// The owner of `steady` sends it away; waits until the master shows it.
async fn steady_goes_away(farm: &Farm) -> anyhow::Result<()> {
    set_availability(farm, "steady", &["away"])?;
    farm.wait_worker_state("steady", PresenceState::Away)
        .await?;
    Ok(())
}

/// A farm of two workers for the builder `five`: `other`, listed first and
/// in its `default` state (so without admission it would be picked whenever
/// it is available), and `steady`, available with room for three builds.
/// Both are connected, and the builder has a history of three successful
/// ~5 s builds (on `steady`, at once).
async fn farm_with_history(other: &str, default: PresenceState) -> anyhow::Result<Farm> {
    let mut farm = Farm::builder()
        .worker(
            WorkerSpec::new(other)
                .worker_toml(&format!("[availability]\ndefault = \"{default}\"\n")),
        )
        .worker(WorkerSpec::new("steady").max_builds(3))
        .builder("five", &[other, "steady"], &[("work", FIVE_SECONDS)])
        .start()
        .await?;
    farm.start_worker(other)?;
    farm.start_worker("steady")?;
    farm.wait_worker_state(other, default).await?;
    farm.wait_worker_state("steady", PresenceState::Available)
        .await?;
    let mut history = Vec::new();
    for _ in 0..3 {
        history.push(submit(&farm).await?);
    }
    for id in history {
        let build = farm.wait_build(id).await?;
        assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
        assert_eq!(build.worker.as_deref(), Some("steady"), "{build:?}");
    }
    Ok(farm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_never_started_where_the_window_would_cut_it() -> anyhow::Result<()> {
    let farm = farm_with_history("closing", PresenceState::Away).await?;

    // 1. `closing` takes builds for 4 more seconds; `steady` has room. The
    //    build goes to `steady`.
    let closing = available_for_four_seconds(&farm, "closing").await?;
    let to_steady = submit(&farm).await?;
    let started = farm
        .wait_build_state(to_steady, "the build to start", |b| {
            b.state != BuildState::Queued
        })
        .await?;
    assert_eq!(
        started.worker.as_deref(),
        Some("steady"),
        "closing's availability ends at {:?}: {started:?}",
        closing.until
    );
    let shown = listed(&farm, to_steady)?;
    if shown.state == BuildState::Running {
        let estimate = shown.estimate_secs.expect("the estimate is shown");
        assert!(
            (6..=9).contains(&estimate),
            "estimate {estimate} s: {shown:?}"
        );
    }
    assert_eq!(
        farm.wait_build(to_steady).await?.outcome,
        Some(Outcome::Success)
    );

    // 2. Only `closing` takes builds, for 4 more seconds: the build waits,
    //    says why, and is not started there when its window closes.
    steady_goes_away(&farm).await?;
    available_for_four_seconds(&farm, "closing").await?;
    let waits = submit(&farm).await?;
    farm.wait_build_state(waits, "the build to wait for a window", |b| {
        b.waiting_for
            .as_deref()
            .is_some_and(|w| w.starts_with("no window fits"))
    })
    .await?;
    let shown = listed(&farm, waits)?;
    assert_eq!(shown.state, BuildState::Queued, "{shown:?}");
    let why = shown.waiting_for.clone().unwrap_or_default();
    // The estimate bounds the ~5 s runs from their hand-out, with a margin.
    let estimate = shown.estimate_secs.expect("the estimate is shown");
    assert!(
        (6..=9).contains(&estimate),
        "estimate {estimate} s: {shown:?}"
    );
    assert!(
        why.starts_with(&format!("no window fits {estimate}s before "))
            && why.contains("closing ends then"),
        "{why}"
    );
    // The window closes; the build was never handed to `closing`.
    farm.wait_worker_state("closing", PresenceState::Away)
        .await?;
    let after = listed(&farm, waits)?;
    assert_eq!(after.state, BuildState::Queued, "{after:?}");
    assert_eq!(after.worker, None, "{after:?}");

    // 3. `steady` comes back: the build runs there, whole.
    set_availability(&farm, "steady", &["auto"])?;
    let done = farm.wait_build(waits).await?;
    assert_eq!(done.worker.as_deref(), Some("steady"), "{done:?}");
    assert_eq!(done.outcome, Some(Outcome::Success), "{done:?}");
    assert_eq!(done.retries, 0, "never started and cut: {done:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_would_run_into_reluctant_time_goes_to_a_worker_available_throughout()
-> anyhow::Result<()> {
    let farm = farm_with_history("turning", PresenceState::Reluctant).await?;

    // 1. `turning` is available for 4 more seconds, then reluctant (its
    //    default) with no end: a ~5 s build would run into the owner's
    //    reluctant time, so `steady`, available throughout, gets it.
    let turning = available_for_four_seconds(&farm, "turning").await?;
    let to_steady = submit(&farm).await?;
    let started = farm
        .wait_build_state(to_steady, "the build to start", |b| {
            b.state != BuildState::Queued
        })
        .await?;
    assert_eq!(
        started.worker.as_deref(),
        Some("steady"),
        "turning turns reluctant at {:?}: {started:?}\n{}",
        turning.until,
        farm.master_log()
    );
    // The estimate shows on the dashboard's builders card and the build page.
    let api = farm.api()?;
    let (status, page) = api.call_raw("GET", "/", None).await?;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("Estimated duration")
            && ["5 s", "6 s", "7 s", "8 s"]
                .iter()
                .any(|words| page.contains(&format!(">{words}<"))),
        "{page}"
    );
    let (status, build_page) = api
        .call_raw("GET", &format!("/builds/{to_steady}"), None)
        .await?;
    assert_eq!(status, 200, "{build_page}");
    let done = farm.wait_build(to_steady).await?;
    assert_eq!(done.outcome, Some(Outcome::Success), "{done:?}");
    if build_page.contains("id=\"build-state\">running<") {
        assert!(build_page.contains("estimated "), "{build_page}");
    }

    // 2. Nobody else can take it: the reluctant time is lent for it.
    steady_goes_away(&farm).await?;
    available_for_four_seconds(&farm, "turning").await?;
    let lent = submit(&farm).await?;
    let done = farm.wait_build(lent).await?;
    assert_eq!(done.worker.as_deref(), Some("turning"), "{done:?}");
    assert_eq!(done.outcome, Some(Outcome::Success), "{done:?}");
    Ok(())
}
