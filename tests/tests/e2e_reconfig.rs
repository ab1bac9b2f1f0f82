//! End-to-end tests of reconfiguration through the real binaries: `master
//! reconfig` and SIGHUP reload master.toml while a build runs; the build
//! keeps its steps and finishes; an invalid file is refused whole and the
//! running config stays; a removed worker is drained, then released.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nightshift_policy::PresenceState;
use nightshift_proto::api::BuildState;
use nightshift_proto::wire::{BuildId, Outcome};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn build_dir(farm: &Farm, worker: &str, builder: &str) -> PathBuf {
    farm.dir
        .path()
        .join("workers")
        .join(worker)
        .join("work")
        .join(builder)
}

async fn wait_file(what: &str, path: &Path) -> anyhow::Result<()> {
    wait_for(what, DEADLINE, || async { Ok(path.exists().then_some(())) }).await
}

fn builder_toml(name: &str, workers: &[&str], command: &str) -> String {
    format!(
        "\n[[builder]]\nname = {}\nworkers = [{}]\nsteps = [{{ name = \"s\", command = {} }}]\n",
        toml_str(name),
        workers
            .iter()
            .map(|w| toml_str(w))
            .collect::<Vec<_>>()
            .join(", "),
        toml_str(command)
    )
}

const GATED: &str =
    "touch s.started; while [ ! -f s.go ]; do sleep 0.05; done; rm -f s.go; echo old steps";

/// Rewrites master.toml by replacing `from` with `to` (which must occur).
fn edit_config(farm: &Farm, from: &str, to: &str) -> anyhow::Result<()> {
    let text = fs_err::read_to_string(&farm.config)?;
    anyhow::ensure!(text.contains(from), "master.toml has no {from:?}:\n{text}");
    fs_err::write(&farm.config, text.replacen(from, to, 1))?;
    Ok(())
}

async fn submit(farm: &Farm, builder: &str) -> anyhow::Result<BuildId> {
    Ok(farm.api()?.submit(builder, BTreeMap::new()).await?.build_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_survives_reconfig_and_an_invalid_config_is_refused() -> anyhow::Result<()>
{
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .master_toml(&builder_toml("app", &["w1"], GATED))
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.wait_worker_state("w1", PresenceState::Available)
        .await?;
    let dir = build_dir(&farm, "w1", "app");
    let first = submit(&farm, "app").await?;
    wait_file("the first build to run", &dir.join("s.started")).await?;

    // Change the running builder and add one; the build in flight goes on.
    edit_config(
        &farm,
        &toml_str(GATED),
        &toml_str("echo new steps > v2.txt"),
    )?;
    let text = fs_err::read_to_string(&farm.config)?;
    fs_err::write(
        &farm.config,
        format!("{text}{}", builder_toml("extra", &["w1"], "echo extra")),
    )?;
    let (code, stdout, stderr) = farm.master_cli(&["reconfig"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("builders added: extra"), "{stdout}");
    assert!(stdout.contains("builders changed: app"), "{stdout}");
    let running = farm.api()?.build(first).await?;
    assert_eq!(running.state, BuildState::Running, "{running:?}");

    fs_err::write(dir.join("s.go"), b"")?;
    let done = farm.wait_build(first).await?;
    assert_eq!(done.outcome, Some(Outcome::Success), "{done:?}");
    let log = farm.api()?.log(first).await?.log;
    assert!(
        log.contains("old steps"),
        "the build kept the steps it started with: {log}"
    );
    assert!(!dir.join("v2.txt").exists());

    // New builds get the new steps, and the new builder exists.
    let second = submit(&farm, "app").await?;
    assert_eq!(
        farm.wait_build(second).await?.outcome,
        Some(Outcome::Success)
    );
    assert!(dir.join("v2.txt").exists(), "new builds run the new steps");
    let extra = submit(&farm, "extra").await?;
    assert_eq!(
        farm.wait_build(extra).await?.outcome,
        Some(Outcome::Success)
    );

    // An invalid file (unknown lock, bad max_builds) is refused whole, with
    // every error; the running config stays.
    let good = fs_err::read_to_string(&farm.config)?;
    edit_config(
        &farm,
        "name = \"extra\"",
        "name = \"extra\"\nlocks = [{ name = \"nolock\", access = \"exclusive\" }]",
    )?;
    edit_config(&farm, "max_builds = 1", "max_builds = 0")?;
    let (code, stdout, stderr) = farm.master_cli(&["reconfig"])?;
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("nolock"), "{stderr}");
    assert!(stderr.contains("max_builds"), "{stderr}");
    // The master itself refuses it too (the API, as a remote admin sees it).
    let refused = farm
        .api()?
        .reconfig()
        .await
        .expect_err("an invalid config is refused");
    assert_eq!(refused.status, Some(422), "{refused}");
    assert!(
        refused.message.contains("refused, the running one stays"),
        "{refused}"
    );
    assert!(
        refused.message.contains("unknown lock `nolock`"),
        "{refused}"
    );
    assert!(
        refused.message.contains("worker[0].max_builds"),
        "{refused}"
    );
    let still = submit(&farm, "extra").await?;
    assert_eq!(
        farm.wait_build(still).await?.outcome,
        Some(Outcome::Success)
    );

    // SIGHUP reloads too.
    fs_err::write(
        &farm.config,
        format!("{good}{}", builder_toml("third", &["w1"], "echo third")),
    )?;
    let pid = farm.master_pid().expect("the master runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let api = farm.api()?;
    let third = wait_for("SIGHUP to add builder third", DEADLINE, || {
        let api = api.clone();
        async move {
            Ok(api
                .submit("third", BTreeMap::new())
                .await
                .ok()
                .map(|r| r.build_id))
        }
    })
    .await?;
    assert_eq!(
        farm.wait_build(third).await?.outcome,
        Some(Outcome::Success)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_worker_is_drained_then_released() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .worker(WorkerSpec::new("w2"))
        .master_toml(&builder_toml("app", &["w1"], GATED))
        .master_toml(&builder_toml("other", &["w2"], "echo other"))
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.start_worker("w2")?;
    farm.wait_worker_state("w1", PresenceState::Available)
        .await?;
    farm.wait_worker_state("w2", PresenceState::Available)
        .await?;
    let dir = build_dir(&farm, "w1", "app");
    let id = submit(&farm, "app").await?;
    wait_file("the build on w1 to run", &dir.join("s.started")).await?;

    // Remove w1 (and move builder app to w2).
    let text = fs_err::read_to_string(&farm.config)?;
    let start = text.find("[[worker]]\nname = \"w1\"").expect("w1's entry");
    let end = text[start + 1..]
        .find("[[")
        .map_or(text.len(), |i| start + 1 + i);
    let text = format!("{}{}", &text[..start], &text[end..]).replacen(
        "workers = [\"w1\"]",
        "workers = [\"w2\"]",
        1,
    );
    fs_err::write(&farm.config, text)?;
    let (code, stdout, stderr) = farm.master_cli(&["reconfig"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("workers removed: w1"), "{stdout}");

    // Its running build goes on to the end...
    let api = farm.api()?;
    assert_eq!(api.build(id).await?.state, BuildState::Running);
    let draining = api.workers().await?;
    let w1 = draining
        .workers
        .iter()
        .find(|w| w.name == "w1")
        .expect("w1 shown while draining");
    assert!(w1.reason.contains("removed from master.toml"), "{w1:?}");
    assert_eq!(w1.running, vec![id]);
    fs_err::write(dir.join("s.go"), b"")?;
    let done = farm.wait_build(id).await?;
    assert_eq!(done.outcome, Some(Outcome::Success), "{done:?}");
    assert_eq!(done.worker.as_deref(), Some("w1"));
    // ...then w1 is released and gone from the master.
    wait_for("w1 to be gone", DEADLINE, || {
        let api = api.clone();
        async move {
            let list = api.workers().await?;
            Ok((!list.workers.iter().any(|w| w.name == "w1")).then_some(()))
        }
    })
    .await?;
    // New builds of app go to w2.
    let next = submit(&farm, "app").await?;
    let build = farm
        .wait_build_state(next, "app to run on w2", |b| b.worker.is_some())
        .await?;
    assert_eq!(build.worker.as_deref(), Some("w2"));
    fs_err::create_dir_all(build_dir(&farm, "w2", "app"))?;
    fs_err::write(build_dir(&farm, "w2", "app").join("s.go"), b"")?;
    assert_eq!(farm.wait_build(next).await?.outcome, Some(Outcome::Success));
    Ok(())
}

/// A master-side schedule (`schedule` in the `[[worker]]`, added by a
/// reconfig) restricts the worker as a `master` source, most restrictive
/// wins; removing it lets the queued build run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_side_schedule_keeps_a_worker_away_outside_its_window() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .master_toml(&builder_toml("app", &["w1"], "echo built"))
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.wait_worker_state("w1", PresenceState::Available)
        .await?;

    // A window that opens two hours from now: the worker is outside it.
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let open = now.checked_add(jiff::SignedDuration::from_hours(2))?;
    let close = now.checked_add(jiff::SignedDuration::from_hours(3))?;
    let hours = format!("{}-{}", open.strftime("%H:%M"), close.strftime("%H:%M"));
    let schedule = format!(
        "name = \"w1\"\ntimezone = \"UTC\"\nschedule = [{{ name = \"later\", hours = \"{hours}\" }}]"
    );
    edit_config(&farm, "name = \"w1\"", &schedule)?;
    let (code, stdout, stderr) = farm.master_cli(&["reconfig"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("workers changed: w1"), "{stdout}");

    let w1 = farm.wait_worker_state("w1", PresenceState::Away).await?;
    assert_eq!(w1.source, Some(nightshift_policy::Source::Master), "{w1:?}");
    let id = submit(&farm, "app").await?;
    let queued = farm
        .wait_build_state(id, "the build to wait for w1", |b| {
            b.waiting_for
                .as_deref()
                .is_some_and(|w| w.contains("w1 away"))
        })
        .await?;
    assert_eq!(queued.state, BuildState::Queued);

    // The schedule goes: the worker's own presence counts again.
    edit_config(&farm, &schedule, "name = \"w1\"")?;
    let (code, stdout, stderr) = farm.master_cli(&["reconfig"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let done = farm.wait_build(id).await?;
    assert_eq!(done.outcome, Some(Outcome::Success), "{done:?}");
    Ok(())
}
