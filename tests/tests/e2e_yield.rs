//! End-to-end: the farm's own builds never count as the owner's load, in
//! both accounting modes (process tree and one cgroup per build), even when a
//! step's processes leave its process group through `timeout`, `setsid` or
//! a double fork; and builds run at the owner-friendly priorities of
//! `[builds]`, shown in `worker status --json`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nightshift_policy::PresenceState;
use nightshift_proto::wire::Outcome;
use nightshift_tests::{Farm, WorkerSpec, test_cgroup};

/// Three CPU burners that each leave the step's process group: GNU
/// `timeout` (new group), `setsid` (new session) and a double fork (the
/// burner's parent exits, init adopts it). Each prints its pid; the step
/// itself ends after 9 s while the burners would run for a minute.
const ESCAPING_BURNERS: &str = "\
timeout 60 sh -c 'echo burner=$$; while :; do :; done' & \
setsid sh -c 'echo burner=$$; exec timeout 60 sh -c \"while :; do :; done\"' & \
sh -c \"sh -c 'echo burner=\\$\\$; while :; do :; done' &\" ; \
sleep 9; echo step-done";

/// Load settings that make a worker go away when foreign CPU passes 60 %
/// for 4 s, sampled every second.
const LOAD_POLICY: &str =
    "[availability.load]\nmax_cpu_percent = 60\nfor = \"4s\"\nsample_every = \"1s\"\n";

async fn burn_and_watch(spec: WorkerSpec, accounting: &str) -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(spec)
        .builder("burn", &["w"], &[("burn", ESCAPING_BURNERS)])
        .start()?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    farm.wait_worker_state("w", PresenceState::Available)
        .await?;
    let status = farm.worker_cli_json("w", &["status", "--json"])?;
    assert_eq!(
        status["isolation"]["accounting"],
        accounting,
        "{status:#}\n{}",
        farm.worker_log("w")
    );

    let api = farm.api()?;
    let id = api.submit("burn", BTreeMap::new()).await?.build_id;
    let started = Instant::now();
    let mut max_build_share: f64 = 0.0;
    let mut samples = Vec::new();
    // Watch the agent's own figures while the build burns.
    while started.elapsed() < Duration::from_secs(60) {
        let status = farm.worker_cli_json("w", &["status", "--json"])?;
        let state = status["presence"]["state"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let build = status["load"]["build_cpu_percent"].as_f64().unwrap_or(0.0);
        let foreign = status["load"]["cpu_percent"].as_f64().unwrap_or(0.0);
        max_build_share = max_build_share.max(build);
        samples.push(format!("{state} build={build:.0}% foreign={foreign:.0}%"));
        assert_ne!(
            state,
            "away",
            "the worker went away during its own build; samples: {samples:?}\n{}",
            farm.worker_log("w")
        );
        let info = api.build(id).await?;
        if info.outcome.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let info = farm.wait_build(id).await?;
    assert_eq!(info.outcome, Some(Outcome::Success), "{info:?}");
    // Without accounting escaped processes the builds' share would stay near
    // zero: the step's own group only holds an idle `sh` and `sleep`.
    assert!(
        max_build_share >= 25.0,
        "the burners were not counted as the build's: {samples:?}"
    );
    // Nothing the step started outlives it, whatever group it moved to.
    let log = api.log(id).await?.log;
    let pids: Vec<i32> = log
        .lines()
        .filter_map(|line| line.strip_prefix("burner=")?.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "{log}");
    for pid in pids {
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "burner {pid} outlived its step\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        farm.wait_worker_state("w", PresenceState::Available)
            .await?
            .state,
        PresenceState::Available
    );
    farm.stop_worker("w")?;
    Ok(())
}

/// Whether the process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_build_processes_are_the_builds_load_in_process_tree_mode() -> anyhow::Result<()> {
    // Normal priority: the burners must really burn beside the other work
    // on a shared test machine for the figures to mean something.
    let spec = WorkerSpec::new("w").worker_toml(&format!(
        "{LOAD_POLICY}[builds]\ncgroups = \"off\"\ncpu_priority = \"normal\"\n"
    ));
    burn_and_watch(spec, "process-tree").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_build_processes_are_the_builds_load_in_cgroup_mode() -> anyhow::Result<()> {
    let Some(cgroup) = test_cgroup("yield")? else {
        return Ok(());
    };
    let spec = WorkerSpec::new("w")
        .in_cgroup(&cgroup.0)
        .worker_toml(&format!(
            "{LOAD_POLICY}[builds]\ncgroups = \"required\"\ncpu_priority = \"normal\"\n"
        ));
    burn_and_watch(spec, "cgroup").await?;
    // The agent moved itself into a leaf so build cgroups could get
    // controllers; every build cgroup is gone.
    let left: Vec<String> = std::fs::read_dir(&cgroup.0)?
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["agent"], "{left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_at_idle_priority_by_default_and_the_status_says_so() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w").worker_toml("[builds]\ncgroups = \"off\"\n"))
        // A grandchild in a new session reports its nice value (field 19)
        // and scheduling policy (field 41; 5 = SCHED_IDLE).
        .builder(
            "prio",
            &["w"],
            &[(
                "show",
                "setsid sh -c 'echo prio=$(cut -d\" \" -f19,41 /proc/$$/stat)'",
            )],
        )
        .start()?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    let status = farm.worker_cli_json("w", &["status", "--json"])?;
    let isolation = &status["isolation"];
    assert_eq!(isolation["cpu_priority"], "idle", "{status:#}");
    assert_eq!(isolation["io_priority"], "idle", "{status:#}");
    assert_eq!(isolation["cpu_weight"], 1, "{status:#}");
    assert_eq!(isolation["cpu_weight_applied"], false, "{status:#}");
    let api = farm.api()?;
    let id = api.submit("prio", BTreeMap::new()).await?.build_id;
    let info = farm.wait_build(id).await?;
    assert_eq!(info.outcome, Some(Outcome::Success), "{info:?}");
    let log = api.log(id).await?.log;
    assert!(log.contains("prio=19 5"), "{log}");
    farm.stop_worker("w")?;
    Ok(())
}
