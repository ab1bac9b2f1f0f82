//! End-to-end tests of latent (on-demand) workers through the real binaries:
//! `process` instances started by the master (the `worker` next to it) with
//! `max_starting`, a `command` provider that fails or has no capacity, and
//! what `master workers` shows meanwhile.

use std::collections::BTreeMap;
use std::path::Path;

use nightshift_policy::PresenceState;
use nightshift_proto::api::{BuildState, WorkerInfo};
use nightshift_proto::wire::{BuildId, Outcome};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn script(dir: &Path, name: &str, body: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    fs_err::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.display().to_string())
}

async fn latent_of(farm: &Farm, name: &str) -> anyhow::Result<Option<WorkerInfo>> {
    Ok(farm
        .api()?
        .workers()
        .await?
        .workers
        .into_iter()
        .find(|w| w.name == name))
}

/// Replays the master's log: how many latent instances were starting at
/// once at most (a start begins at "starting latent worker X" and ends when
/// X connects or its start fails).
fn max_starting_in_log(log: &str, latent: &[&str]) -> usize {
    let mut starting = std::collections::BTreeSet::new();
    let mut max = 0;
    for line in log.lines() {
        if let Some(rest) = line.split("starting latent worker ").nth(1) {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if latent.contains(&name) {
                starting.insert(name.to_owned());
                max = max.max(starting.len());
            }
        }
        for name in latent {
            if line.contains(&format!("worker {name} connected"))
                || line.contains(&format!("latent worker {name} refused"))
            {
                starting.remove(*name);
            }
        }
    }
    max
}

/// 20 requests against 5 latent `process` workers with `max_starting = 2`:
/// never more than 2 starting at once, and all 20 run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_20_requests_on_5_latent_workers_with_max_starting_2() -> anyhow::Result<()> {
    let names = ["l1", "l2", "l3", "l4", "l5"];
    let mut extra = String::from("max_starting = 2\n");
    for name in names {
        extra.push_str(&format!(
            "\n[[worker]]\nname = \"{name}\"\nmax_builds = 1\nlatent = {{ provider = \"process\", build_wait_timeout = \"30s\", start_timeout = \"60s\" }}\n"
        ));
    }
    extra.push_str(&format!(
        "\n[[builder]]\nname = \"burst\"\nworkers = [{}]\nsteps = [{{ name = \"hi\", command = \"echo hi from $PWD\" }}]\n",
        names.iter().map(|n| toml_str(n)).collect::<Vec<_>>().join(", ")
    ));
    let farm = Farm::builder().master_toml(&extra).start().await?;
    let api = farm.api()?;

    // Before any request, every latent worker is stopped.
    for name in names {
        let info = latent_of(&farm, name).await?.expect("configured");
        let latent = info.latent.expect("a latent worker shows its instance");
        assert_eq!(latent.state, "stopped");
        assert_eq!(latent.provider, "process");
    }

    let mut ids: Vec<BuildId> = Vec::new();
    for _ in 0..20 {
        ids.push(api.submit("burst", BTreeMap::new()).await?.build_id);
    }
    // Sample what the master shows while the burst runs, too.
    let sampler = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut max = 0;
            loop {
                let Ok(list) = api.workers().await else { break };
                let starting = list
                    .workers
                    .iter()
                    .filter(|w| w.latent.as_ref().is_some_and(|l| l.state == "starting"))
                    .count();
                max = max.max(starting);
                if max > 2 {
                    return max;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            max
        })
    };
    let mut used = std::collections::BTreeSet::new();
    for id in &ids {
        let build = farm.wait_build(*id).await?;
        assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
        used.insert(build.worker.expect("ran on a worker"));
    }
    sampler.abort();
    if let Ok(Ok(max)) = tokio::time::timeout(DEADLINE, sampler).await {
        assert!(max <= 2, "the API showed {max} instances starting at once");
    }
    let log = farm.master_log();
    let max = max_starting_in_log(&log, &names);
    assert!(
        (1..=2).contains(&max),
        "{max} latent instances were starting at once:\n{log}"
    );
    assert!(used.iter().all(|w| names.contains(&w.as_str())), "{used:?}");
    assert!(
        used.len() >= 2,
        "the burst should spread over instances: {used:?}"
    );
    // Instances that ran builds linger (build_wait_timeout = 30s).
    let list = api.workers().await?;
    let lingering = list
        .workers
        .iter()
        .filter(|w| {
            w.latent
                .as_ref()
                .is_some_and(|l| l.state == "lingering" || l.state == "running")
        })
        .count();
    assert!(lingering >= 1, "{list:?}");
    Ok(())
}

/// A start script that fails: the instance is stopped (stop script runs),
/// the worker is backed off with its reason shown, and the request stays
/// queued until a worker can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_latent_start_leaves_the_request_queued() -> anyhow::Result<()> {
    let scripts = tempfile::tempdir()?;
    let stopped = scripts.path().join("stopped");
    let start = script(
        scripts.path(),
        "start",
        "echo 'no image named ci-base' >&2; exit 1",
    )?;
    let stop = script(
        scripts.path(),
        "stop",
        &format!("touch {}", stopped.display()),
    )?;
    let extra = format!(
        r#"
[[worker]]
name = "vm"
max_builds = 1
latent = {{ provider = "command", start = {start}, stop = {stop}, start_timeout = "60s" }}

[[builder]]
name = "app"
workers = ["vm", "w1"]
steps = [{{ name = "s", command = "echo built" }}]
"#,
        start = toml_str(&start),
        stop = toml_str(&stop),
    );
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .master_toml(&extra)
        .start()
        .await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;

    let vm = wait_for("the failed start to be backed off", DEADLINE, || {
        let farm = &farm;
        async move {
            let info = latent_of(farm, "vm").await?;
            Ok(info.filter(|w| {
                w.latent
                    .as_ref()
                    .is_some_and(|l| l.state == "stopped" && l.retry_after.is_some())
            }))
        }
    })
    .await?;
    let latent = vm.latent.expect("latent");
    assert!(latent.reason.contains("start failed"), "{latent:?}");
    assert!(
        latent.reason.contains("no image named ci-base"),
        "{latent:?}"
    );
    assert!(
        stopped.exists(),
        "the stop script ran after the failed start"
    );
    let build = api.build(id).await?;
    assert_eq!(build.state, BuildState::Queued, "{build:?}");
    let why = build.waiting_for.unwrap_or_default();
    assert!(why.contains("backed off"), "{why}");
    let (code, stdout, _) = farm.master_cli(&["workers"])?;
    assert_eq!(code, 0);
    assert!(stdout.contains("[latent stopped:"), "{stdout}");

    // Nothing was lost: once a worker can take it, it runs.
    farm.start_worker("w1")?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("w1"));
    Ok(())
}

/// A provider with no capacity ("not now", exit 75): the master tries
/// another latent worker instead of failing the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_now_tries_another_latent_worker() -> anyhow::Result<()> {
    let scripts = tempfile::tempdir()?;
    let start = script(
        scripts.path(),
        "start",
        "echo 'quota: 0 VMs left' >&2; exit 75",
    )?;
    let stop = script(scripts.path(), "stop", "exit 0")?;
    let extra = format!(
        r#"
[[worker]]
name = "cloud"
max_builds = 1
latent = {{ provider = "command", start = {start}, stop = {stop} }}

[[worker]]
name = "local"
max_builds = 1
latent = {{ provider = "process", build_wait_timeout = "0s" }}

[[builder]]
name = "app"
workers = ["cloud", "local"]
steps = [{{ name = "s", command = "echo built" }}]
"#,
        start = toml_str(&start),
        stop = toml_str(&stop),
    );
    let farm = Farm::builder().master_toml(&extra).start().await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
    assert_eq!(build.worker.as_deref(), Some("local"));
    let cloud = latent_of(&farm, "cloud")
        .await?
        .and_then(|w| w.latent)
        .expect("latent");
    assert!(
        cloud.reason.contains("not now: quota: 0 VMs left"),
        "{cloud:?}"
    );
    // build_wait_timeout = 0: the instance stops right after its build.
    wait_for("local to stop after its build", DEADLINE, || {
        let farm = &farm;
        async move {
            let local = latent_of(farm, "local").await?.and_then(|w| w.latent);
            Ok(local.filter(|l| l.state == "stopped"))
        }
    })
    .await?;
    Ok(())
}

/// A latent worker that turns `away` finishes its current build and is
/// then stopped (no lingering), even with a long `build_wait_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latent_worker_that_turns_away_is_stopped_after_its_build() -> anyhow::Result<()> {
    let extra = format!(
        r#"
[[worker]]
name = "l1"
max_builds = 1
latent = {{ provider = "process", build_wait_timeout = "10m" }}

[[builder]]
name = "app"
workers = ["l1"]
steps = [{{ name = "s", command = {cmd} }}]
"#,
        cmd = toml_str("touch s.started; while [ ! -f s.go ]; do sleep 0.05; done; rm -f s.go"),
    );
    let farm = Farm::builder().master_toml(&extra).start().await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let instance = farm.data_dir().join("latent").join("l1");
    let build_dir = instance.join("work").join("app");
    wait_for("the build to run on the latent instance", DEADLINE, || {
        let path = build_dir.join("s.started");
        async move { Ok(path.exists().then_some(())) }
    })
    .await?;

    // The owner takes the instance back while it builds.
    let output = std::process::Command::new(farm.worker_bin())
        .args([
            "set-availability",
            "away",
            "--reason",
            "maintenance",
            "--config",
        ])
        .arg(instance.join("worker.toml"))
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    farm.wait_worker_state("l1", nightshift_policy::PresenceState::Away)
        .await?;
    let l1 = latent_of(&farm, "l1")
        .await?
        .and_then(|w| w.latent)
        .expect("latent");
    assert_eq!(l1.state, "running", "the build runs on: {l1:?}");

    fs_err::write(build_dir.join("s.go"), b"")?;
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
    let stopped = wait_for("l1 to be stopped after its build", DEADLINE, || {
        let farm = &farm;
        async move {
            let l1 = latent_of(farm, "l1").await?.and_then(|w| w.latent);
            Ok(l1.filter(|l| l.state == "stopped"))
        }
    })
    .await?;
    assert!(stopped.reason.contains("worker turned away"), "{stopped:?}");
    Ok(())
}

/// A master that stops (SIGTERM) stops its latent instances first: their
/// tokens die with it, so they could not serve the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_master_stops_its_latent_instances() -> anyhow::Result<()> {
    let scripts = tempfile::tempdir()?;
    let started = scripts.path().join("started");
    let stopped = scripts.path().join("stopped");
    let start = script(
        scripts.path(),
        "start",
        &format!("touch {}", started.display()),
    )?;
    let stop = script(
        scripts.path(),
        "stop",
        &format!("touch {}", stopped.display()),
    )?;
    let extra = format!(
        r#"
[[worker]]
name = "vm"
max_builds = 1
latent = {{ provider = "command", start = {start}, stop = {stop}, start_timeout = "10m" }}

[[builder]]
name = "app"
workers = ["vm"]
steps = [{{ name = "s", command = "true" }}]
"#,
        start = toml_str(&start),
        stop = toml_str(&stop),
    );
    let mut farm = Farm::builder().master_toml(&extra).start().await?;
    let api = farm.api()?;
    api.submit("app", BTreeMap::new()).await?;
    wait_for("the instance to be starting", DEADLINE, || {
        let farm = &farm;
        let started = started.clone();
        async move {
            let vm = latent_of(farm, "vm").await?.and_then(|w| w.latent);
            Ok(vm.filter(|l| l.state == "starting" && started.exists()))
        }
    })
    .await?;
    assert!(!stopped.exists());
    assert_eq!(farm.stop_master().await?, Some(0));
    assert!(
        stopped.exists(),
        "the stop script ran before the master exited"
    );
    Ok(())
}

/// A start that "succeeds" but whose agent never connects is stopped at
/// `start_timeout`, the worker is backed off, and the request stays queued;
/// the configured `health` script is asked and its answer is in the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_agent_never_connects_times_out_and_the_request_stays_queued()
-> anyhow::Result<()> {
    let scripts = tempfile::tempdir()?;
    let stopped = scripts.path().join("stopped");
    let asked = scripts.path().join("health-asked");
    let start = script(scripts.path(), "start", "exit 0")?;
    let stop = script(
        scripts.path(),
        "stop",
        &format!("touch {}", stopped.display()),
    )?;
    let health = script(
        scripts.path(),
        "health",
        &format!(
            "echo \"$NIGHTSHIFT_WORKER_NAME\" > {}; echo no such machine; exit 1",
            asked.display()
        ),
    )?;
    let extra = format!(
        r#"
[[worker]]
name = "vm"
max_builds = 1
latent = {{ provider = "command", start = {start}, stop = {stop}, health = {health}, start_timeout = "1s" }}

[[builder]]
name = "app"
workers = ["vm"]
steps = [{{ name = "s", command = "true" }}]
"#,
        start = toml_str(&start),
        stop = toml_str(&stop),
        health = toml_str(&health),
    );
    let farm = Farm::builder().master_toml(&extra).start().await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let vm = wait_for("the start to time out", DEADLINE, || {
        let farm = &farm;
        async move {
            let vm = latent_of(farm, "vm").await?.and_then(|w| w.latent);
            Ok(vm.filter(|l| l.state == "stopped" && l.retry_after.is_some()))
        }
    })
    .await?;
    assert!(
        vm.reason
            .contains("its agent did not connect within start_timeout (1s)"),
        "{vm:?}"
    );
    assert!(
        vm.reason.contains("the instance is gone") && vm.reason.contains("no such machine"),
        "the health script's answer is in the reason: {vm:?}"
    );
    assert_eq!(
        fs_err::read_to_string(&asked)?.trim(),
        "vm",
        "the health script ran for the worker"
    );
    assert!(stopped.exists(), "the timed-out instance was stopped");
    let build = api.build(id).await?;
    assert_eq!(build.state, BuildState::Queued, "{build:?}");
    assert_eq!(build.retries, 0, "the request was never handed out");
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
