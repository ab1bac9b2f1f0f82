//! End-to-end: the farm's own builds never count as the owner's load, in
//! both accounting modes (process tree and one cgroup per build), even when a
//! step's processes leave its process group through `timeout`, `setsid` or
//! a double fork; and builds run at the owner-friendly priorities of
//! `[builds]`, shown in `worker status --json`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nightshift_policy::PresenceState;
use nightshift_proto::wire::Outcome;
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, test_cgroup, wait_for};

/// Three CPU burners that each leave the step's process group: GNU
/// `timeout` (new group), `setsid` (new session) and a double fork (the
/// burner's parent exits, init adopts it). Each appends its pid to `pids`
/// in the build directory; the step itself ends after 9 s while the burners
/// would run on.
const ESCAPING_BURNERS: &str = "\
printf 'echo $$ >> pids; while :; do :; done\\n' > burn.sh; rm -f pids; \
timeout 60 sh burn.sh & \
setsid sh burn.sh & \
sh -c 'sh burn.sh &'; \
sleep 9";

/// Load settings that make a worker go away when foreign CPU passes 60 %
/// for 4 s, sampled every second.
const LOAD_POLICY: &str =
    "[availability.load]\nmax_cpu_percent = 60\nfor = \"4s\"\nsample_every = \"1s\"\n";

/// CPU ticks used so far by `pids` (0 for the gone).
fn ticks_of(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs_err::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat.rsplit_once(')')?.1.to_owned();
            let fields: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|n| n.parse().ok())
                .collect();
            Some(fields.iter().sum::<u64>())
        })
        .sum()
}

/// The machine's CPU use over `span`, in percent (from /proc/stat).
async fn machine_cpu_percent(span: Duration) -> f64 {
    let read = || -> (u64, u64) {
        let text = fs_err::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|n| n.parse().ok())
            .collect();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        (fields.iter().sum(), idle)
    };
    let (total0, idle0) = read();
    tokio::time::sleep(span).await;
    let (total1, idle1) = read();
    let total = total1.saturating_sub(total0).max(1) as f64;
    100.0 * (1.0 - idle1.saturating_sub(idle0) as f64 / total)
}

/// Runs the escaping burners as a build and checks the agent's figures;
/// returns the farm with its worker still running.
async fn burn_and_watch(spec: WorkerSpec, accounting: &str) -> anyhow::Result<Farm> {
    let mut farm = Farm::builder()
        .worker(spec)
        .builder("burn", &["w"], &[("burn", ESCAPING_BURNERS)])
        .start()
        .await?;
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
    // On a machine already busy with other work the owner's load is real
    // and going away is right; the presence check needs a quiet machine.
    let baseline = machine_cpu_percent(Duration::from_secs(2)).await;

    let api = farm.api()?;
    let id = api.submit("burn", BTreeMap::new()).await?.build_id;
    let pids_file = farm.worker_dir("w").join("work/burn/pids");
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let started = Instant::now();
    let mut pids: Vec<i32> = Vec::new();
    let mut window: Option<(Instant, u64)> = None;
    let mut true_shares = Vec::new();
    let mut agent_shares = Vec::new();
    let mut samples = Vec::new();
    let mut went_away = false;
    // Watch the agent's figures against the burners' own CPU while the
    // step runs (it sleeps 9 s).
    while started.elapsed() < Duration::from_secs(60) {
        let info = api.build(id).await?;
        if info.outcome.is_some() {
            break;
        }
        if pids.len() < 3 {
            pids = fs_err::read_to_string(&pids_file)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| line.trim().parse().ok())
                .collect();
        }
        let status = farm.worker_cli_json("w", &["status", "--json"])?;
        let state = status["presence"]["state"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let build = status["load"]["build_cpu_percent"].as_f64().unwrap_or(0.0);
        let foreign = status["load"]["cpu_percent"].as_f64().unwrap_or(0.0);
        let now = Instant::now();
        let ticks = ticks_of(&pids);
        if pids.len() == 3 {
            match window {
                None => window = Some((now, ticks)),
                Some((then, then_ticks)) if now.duration_since(then) >= Duration::from_secs(2) => {
                    let seconds = now.duration_since(then).as_secs_f64();
                    true_shares.push(
                        ticks.saturating_sub(then_ticks) as f64 / ticks_per_sec / seconds / cpus
                            * 100.0,
                    );
                    agent_shares.push(build);
                    window = Some((now, ticks));
                }
                Some(_) => {}
            }
        }
        samples.push(format!("{state} build={build:.0}% foreign={foreign:.0}%"));
        went_away |= state == "away";
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let info = farm.wait_build(id).await?;
    assert_eq!(info.outcome, Some(Outcome::Success), "{info:?}");
    assert_eq!(pids.len(), 3, "not every burner started: {pids:?}");
    // The agent counts what the escaped burners really use as the build's:
    // without that its figure would stay near zero (the step's own group
    // holds only an idle `sh` and `sleep`).
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    let (truth, claimed) = (mean(&true_shares), mean(&agent_shares));
    eprintln!("build share: the agent counted {claimed:.1} %, the burners used {truth:.1} %");
    assert!(truth > 1.0, "the burners got no CPU: {true_shares:?}");
    assert!(
        claimed >= truth * 0.7,
        "the agent counted {claimed:.1} % as the build's, but its processes used {truth:.1} %: agent {agent_shares:?}, burners {true_shares:?}, samples {samples:?}"
    );
    if baseline < 30.0 {
        assert!(
            !went_away,
            "the worker went away during its own build on a quiet machine (baseline {baseline:.0} %): {samples:?}\n{}",
            farm.worker_log("w")
        );
    } else {
        eprintln!(
            "the machine was busy before the build ({baseline:.0} % CPU): the owner's load was real, presence not checked"
        );
    }
    // Nothing the step started outlives it, whatever group it moved to.
    for pid in &pids {
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(*pid) {
            assert!(Instant::now() < deadline, "burner {pid} outlived its step");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(farm)
}

/// Whether the process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match fs_err::read_to_string(format!("/proc/{pid}/stat")) {
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
    let mut farm = burn_and_watch(spec, "process-tree").await?;
    farm.stop_worker("w").await?;
    Ok(())
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
    let mut farm = burn_and_watch(spec, "cgroup").await?;
    // The agent moved itself into a leaf so build cgroups could get
    // controllers; the running agent removes every build cgroup once its
    // killed processes are gone.
    let dir = cgroup.0.clone();
    let removed = wait_for("every build cgroup to be removed", DEADLINE, || {
        let dir = dir.clone();
        async move { Ok((build_cgroups(&dir)?.is_empty()).then_some(())) }
    })
    .await;
    if let Err(error) = removed {
        let mut report = String::new();
        for name in build_cgroups(&dir)? {
            let path = dir.join(&name);
            let read = |file: &str| fs_err::read_to_string(path.join(file)).unwrap_or_default();
            report.push_str(&format!(
                "{name}: events {:?}, procs {:?}\n",
                read("cgroup.events"),
                read("cgroup.procs")
            ));
            for pid in read("cgroup.procs").split_whitespace() {
                let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                report.push_str(&format!("  {stat}\n"));
            }
        }
        anyhow::bail!("{error}\n{report}\n{}", farm.worker_log("w"));
    }
    farm.stop_worker("w").await?;
    Ok(())
}

/// The build cgroups (everything but the agent's own leaf) under `dir`.
fn build_cgroups(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    Ok(fs_err::read_dir(dir)?
        .flatten()
        .filter(|entry| entry.path().is_dir() && entry.file_name() != "agent")
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect())
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
        .start()
        .await?;
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
    farm.stop_worker("w").await?;
    Ok(())
}
