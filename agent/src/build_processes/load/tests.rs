//! Tests of build accounting and the load sampler with real build processes, with and without a delegated cgroup.

use super::*;
use std::sync::Arc;

/// A fresh cgroup for a test to put builds under, or a loud failure:
/// these tests must run where a cgroup v2 can be created (CI runs as
/// root) unless `NIGHTSHIFT_SKIP_CGROUP_TESTS=1` says otherwise.
pub(crate) fn test_cgroup(tag: &str) -> Option<TestCgroup> {
    let skip = std::env::var("NIGHTSHIFT_SKIP_CGROUP_TESTS").is_ok_and(|v| v == "1");
    let made = (|| {
        let mount = super::super::build_cgroup::cgroup2_mount()
            .ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
        let own = fs_err::read_to_string("/proc/self/cgroup")
            .map_err(|error| format!("/proc/self/cgroup: {error}"))?;
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or("no cgroup v2 line in /proc/self/cgroup")?
            .trim_start_matches('/')
            .to_owned();
        let dir = mount
            .join(relative)
            .join(format!("nightshift-test-{}-{tag}", std::process::id()));
        fs_err::create_dir(&dir).map_err(|error| format!("mkdir {}: {error}", dir.display()))?;
        Ok::<_, String>(dir)
    })();
    match made {
        Ok(dir) => Some(TestCgroup(dir)),
        Err(problem) if skip => {
            eprintln!("skipped (NIGHTSHIFT_SKIP_CGROUP_TESTS=1): {problem}");
            None
        }
        Err(problem) => panic!(
            "cannot create a cgroup v2 for this test ({problem}); run as root on a cgroup v2 host, or set NIGHTSHIFT_SKIP_CGROUP_TESTS=1 to skip the cgroup tests"
        ),
    }
}

/// A test cgroup, removed (with its children) when dropped.
pub(crate) struct TestCgroup(pub PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(entries) = fs_err::read_dir(&self.0) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = fs_err::remove_dir(entry.path());
                }
            }
        }
        let _ = fs_err::remove_dir(&self.0);
    }
}

#[test]
fn a_process_group_is_found_and_counted() {
    // Our own process group contains at least this test process.
    let me = read_stat(Path::new("/proc/self/stat")).unwrap();
    let trees = BuildTrees::without_cgroups();
    trees.begin(1);
    trees.set_step_group(1, Some(me.pgrp));
    let usage = trees.usage();
    assert!(usage.cpu_usec > 0, "{usage:?}");
    trees.end(1);
}

/// Runs `command; times` as a build; returns the CPU time of the
/// processes the step reaped, as the shell's `times` reports it (a
/// figure independent of the agent's accounting and of how busy the
/// machine is).
async fn run_build(trees: &Arc<BuildTrees>, build_id: BuildId, command: &str) -> Duration {
    use crate::daemon::runner::{self, BuildRequest, RunnerEvent, RunnerSettings};
    use nightshift_proto::clock::SystemClock;
    let work = tempfile::tempdir().unwrap();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(runner::EVENT_QUEUE);
    let _control = runner::spawn(
        BuildRequest {
            build_id,
            builder: "burn".into(),
            steps: vec![nightshift_proto::wire::StepSpec {
                name: "burn".into(),
                command: format!("{command}; times"),
                timeout_secs: None,
                env: Default::default(),
                workdir: None,
                needs_grant: false,
                checkout: false,
                upload: None,
            }],
            properties: Default::default(),
            source: None,
            max_log_bytes: None,
        },
        Arc::new(RunnerSettings {
            artifacts: None,
            workdir: work.path().to_owned(),
            kill_grace: Duration::from_millis(500),
            git: Default::default(),
            credit: Default::default(),
        }),
        trees.clone(),
        Arc::new(SystemClock),
        events_tx,
    );
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), events.recv())
            .await
            .expect("the build ends")
            .expect("the runner reports");
        if let RunnerEvent::Finished { result } = event {
            assert_eq!(
                result.outcome,
                nightshift_proto::wire::Outcome::Success,
                "{}",
                result.log
            );
            return children_cpu(&result.log);
        }
    }
}

/// `times`' second line: the reaped children's user and system time.
fn children_cpu(log: &str) -> Duration {
    let line = log.lines().last().unwrap_or_default();
    let seconds = |field: &str| -> f64 {
        let (minutes, rest) = field.split_once('m').unwrap_or(("0", field));
        minutes.parse::<f64>().unwrap_or(0.0) * 60.0
            + rest.trim_end_matches('s').parse::<f64>().unwrap_or(0.0)
    };
    let total: f64 = line.split_whitespace().map(seconds).sum();
    Duration::from_secs_f64(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_burning_build_is_counted_as_the_builds_own_load() {
    let trees = Arc::new(BuildTrees::without_cgroups());
    let mut sampler = LoadSampler::new().unwrap();
    assert_eq!(sampler.sample(&trees, Timestamp::now()), None);
    let window = std::time::Instant::now();
    // A grandchild in a session of its own burns CPU for two seconds.
    let burned = run_build(
        &trees,
        1,
        "setsid sh -c 'end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done'",
    )
    .await;
    let sample = sampler
        .sample(&trees, Timestamp::now())
        .expect("a second sample has a value");
    let window = window.elapsed();
    assert!(burned > Duration::ZERO, "the burner got no CPU at all");
    // What the burner used, as a share of the machine over the window:
    // without build accounting the sampler's figure would be zero.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let expected = burned.as_secs_f64() / window.as_secs_f64() / cpus * 100.0;
    assert!(
        sample.build_cpu_percent >= expected * 0.8,
        "build share {} but the burner used {expected:.1} % ({burned:?} in {window:?}): {sample:?}",
        sample.build_cpu_percent,
    );
    assert!(
        sample.cpu_percent <= (sample.raw_cpu_percent - sample.build_cpu_percent).max(0.0) + 1e-9
    );
}

#[tokio::test]
async fn short_lived_build_processes_are_counted_after_they_exit() {
    let trees = Arc::new(BuildTrees::without_cgroups());
    let before = trees.usage().cpu_usec;
    // Hundreds of processes that each burn a little CPU and exit.
    let burned = run_build(
        &trees,
        2,
        "for n in $(seq 1 40); do sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'; done",
    )
    .await;
    let used = Duration::from_micros(trees.usage().cpu_usec - before);
    assert!(
        used.as_secs_f64() >= burned.as_secs_f64() * 0.9 - 0.05,
        "the build's processes used {burned:?} but only {used:?} of CPU was attributed to it"
    );
}

#[tokio::test]
async fn with_a_delegated_cgroup_builds_are_accounted_by_their_cgroup() {
    let state = tempfile::tempdir().unwrap();
    let Some(cgroup) = test_cgroup("accounting") else {
        return;
    };
    let parent = cgroup.0.clone();
    let trees = Arc::new(BuildTrees::under_cgroup(state.path(), &parent));
    let before = trees.usage().cpu_usec;
    let burned = run_build(
        &trees,
        3,
        "test \"$(cat /proc/self/cgroup | grep '^0::' | cut -d/ -f2-)\" != '' || exit 7; \
         for n in $(seq 1 40); do sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'; done",
    )
    .await;
    let used = Duration::from_micros(trees.usage().cpu_usec - before);
    assert!(
        used.as_secs_f64() >= burned.as_secs_f64() * 0.9 - 0.05,
        "the build's processes used {burned:?} but its cgroup accounted only {used:?}"
    );
    assert!(
        !parent
            .join(format!("nightshift-{}-build-3", std::process::id()))
            .exists(),
        "the build's cgroup is removed when it ends"
    );
}

#[test]
fn a_build_cgroup_still_holding_processes_is_removed_once_they_are_gone() {
    use super::super::build_cgroup::CgroupSweeper;
    let Some(cgroup) = test_cgroup("sweeper") else {
        return;
    };
    let build = cgroup
        .0
        .join(format!("nightshift-{}-build-9", std::process::id()));
    fs_err::create_dir(&build).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    fs_err::write(build.join("cgroup.procs"), child.id().to_string()).unwrap();
    let sweeper = CgroupSweeper::default();
    sweeper.remove(build.clone());
    assert!(build.is_dir(), "removed while a process was in it");
    assert_eq!(sweeper.pending(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while build.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} outlived its last process",
            build.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sweeper.pending(), 0);
}

#[test]
fn a_recorded_leftover_cgroup_is_emptied_and_a_neighbours_is_not() {
    let state = tempfile::tempdir().unwrap();
    let Some(cgroup) = test_cgroup("leftovers") else {
        return;
    };
    let parent = cgroup.0.clone();
    let trees = BuildTrees::under_cgroup(state.path(), &parent);
    let tag = std::process::id();
    let ours = parent.join(format!("nightshift-{tag}0-build-5"));
    let neighbours = parent.join(format!("nightshift-{tag}1-build-5"));
    let spawn_in = |cgroup: &Path| {
        fs_err::create_dir_all(cgroup).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        fs_err::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
        child
    };
    let mut leftover = spawn_in(&ours);
    let mut neighbour = spawn_in(&neighbours);
    fs_err::write(
        state.path().join("running/5"),
        format!("-\n{}\n", ours.display()),
    )
    .unwrap();

    let report = trees.kill_leftovers();
    assert!(
        report.iter().any(|line| line.contains("build 5")),
        "{report:?}"
    );
    let status = leftover.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(
        neighbour.try_wait().unwrap().is_none(),
        "another agent's build cgroup was touched"
    );
    let _ = neighbour.kill();
    let _ = neighbour.wait();
    std::thread::sleep(Duration::from_millis(50));
    let _ = fs_err::remove_dir(&ours);
    let _ = fs_err::remove_dir(&neighbours);
}

#[test]
fn leftovers_of_a_crashed_agent_are_killed_and_nothing_else() {
    use std::os::unix::process::CommandExt;
    let state = tempfile::tempdir().unwrap();
    let settings = BuildSettings {
        cgroups: CgroupUse::Off,
        ..BuildSettings::default()
    };
    let trees = BuildTrees::detect(state.path(), &settings).unwrap();
    let spawn = |build: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 300 & wait")
            .env("NIGHTSHIFT_BUILD_ID", build)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut leftover = spawn("77");
    // A process group that is recorded but is not that build's.
    let mut stranger = spawn("78");
    let leftover_pid = leftover.id() as i32;
    fs_err::write(state.path().join("running/77"), leftover_pid.to_string()).unwrap();
    fs_err::write(
        state.path().join("running/79"),
        (stranger.id() as i32).to_string(),
    )
    .unwrap();
    // Let `sh` start its child so there is a grandchild to kill too.
    std::thread::sleep(Duration::from_millis(200));

    let report = trees.kill_leftovers();
    assert!(
        report.iter().any(|line| line.contains("build 77")),
        "{report:?}"
    );
    let status = leftover.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "an unrelated group was killed"
    );
    assert!(
        fs_err::read_dir(state.path().join("running"))
            .unwrap()
            .next()
            .is_none()
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(leftover_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}
