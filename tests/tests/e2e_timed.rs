//! End-to-end: a timed builder fires at its instant, in the master's time
//! zone, through the real `master` and `worker` binaries. The master's
//! trigger clock is moved with its documented test hook
//! (`NIGHTSHIFT_TEST_TRIGGER_CLOCK`) to just before 03:00 CEST on the
//! spring-forward night in Europe/Berlin, where `30 2 * * *` (02:30 does not
//! exist that night) fires at 03:00 CEST.

use nightshift_proto::api::BuildState;
use nightshift_proto::wire::Outcome;
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};

/// 15 s before 2026-03-29 03:00 CEST (01:00 UTC), when the triggers start.
const CLOCK_START: &str = "2026-03-29T00:59:45Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nightly_fires_at_its_instant_in_berlin_across_the_spring_forward_gap()
-> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .insecure()
        .master_env("NIGHTSHIFT_TEST_TRIGGER_CLOCK", CLOCK_START)
        .master_toml(
            "timezone = \"Europe/Berlin\"\n\n\
             [[builder]]\nname = \"nightly\"\nworkers = [\"w\"]\nschedule = \"30 2 * * *\"\n\
             steps = [{ name = \"build\", command = \"echo nightly build\" }]\n\n\
             [[builder]]\nname = \"mondays\"\nworkers = [\"w\"]\nschedule = \"30 2 * * 1\"\n\
             steps = [{ name = \"build\", command = \"echo monday build\" }]\n",
        )
        .worker(WorkerSpec::new("w"))
        .start()
        .await?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    let api = farm.api()?;
    let build = wait_for("the nightly build to be queued", DEADLINE * 2, || async {
        Ok(api.builds(10).await?.builds.into_iter().next())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\nmaster log:\n{}", farm.master_log()))?;
    assert_eq!(build.builder, "nightly", "{build:?}");
    assert_eq!(
        build.trigger.as_deref(),
        Some("schedule 2026-03-29 03:00 CEST"),
        "{build:?}"
    );
    let log = farm.master_log();
    assert!(
        log.contains("schedule of builder nightly fires (2026-03-29T01:00:00Z)"),
        "{log}"
    );
    assert!(
        log.contains("NIGHTSHIFT_TEST_TRIGGER_CLOCK is set"),
        "{log}"
    );
    let done = farm.wait_build(build.id).await?;
    assert_eq!(done.state, BuildState::Finished);
    assert_eq!(
        done.outcome,
        Some(Outcome::Success),
        "{}",
        farm.worker_log("w")
    );
    // Sunday 29 March: the Monday builder did not fire with it.
    let all = api.builds(10).await?.builds;
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(!farm.master_log().contains("builder mondays fires"));
    Ok(())
}

/// A hook value that is not an instant stops the master at start, naming
/// the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_trigger_clock_stops_the_master_with_a_clear_error() -> anyhow::Result<()> {
    let farm = Farm::builder().insecure().start().await?;
    let out = tokio::process::Command::new(farm.master_bin())
        .arg("run")
        .arg("--config")
        .arg(&farm.config)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("NIGHTSHIFT_TEST_TRIGGER_CLOCK", "tonight")
        .current_dir(farm.dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("NIGHTSHIFT_TEST_TRIGGER_CLOCK=`tonight`"),
        "{err}"
    );
    Ok(())
}
