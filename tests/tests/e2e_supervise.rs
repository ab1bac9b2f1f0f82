//! End-to-end tests of `[supervise]` with a stand-in CI agent
//! (`ci-agent-standin`, which implements GitLab Runner's SIGQUIT and the
//! Buildkite agent's SIGTERM graceful-stop contracts): the real `worker`
//! starts it when available, drains it when away, stops it hard when it
//! ignores the graceful signal, restarts it with backoff when it crashes,
//! replaces a leftover of a crashed run without ever running two, and
//! `worker stop --graceful [--deadline]` drains it and exits 0.

use std::path::Path;
use std::time::Duration;

use nightshift_tests::supervised::{SupervisedWorker, alive};

const STANDIN: &str = env!("CARGO_BIN_EXE_ci-agent-standin");

fn supervise_toml(kind: &str, contract: &str, events: &Path, extra: &str) -> String {
    format!(
        "[supervise]\nkind = \"{kind}\"\ncommand = \"{STANDIN}\"\nargs = [\"{contract}\"]\n{extra}\n[supervise.env]\nSTANDIN_EVENTS = \"{}\"\nSTANDIN_JOB_SECS = \"3\"\n",
        events.display()
    )
}

fn events(path: &Path) -> Vec<String> {
    fs_err::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The events of process `pid`, without the timestamp and pid.
fn events_of(path: &Path, pid: u64) -> Vec<String> {
    events(path)
        .into_iter()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ' ');
            let _at = fields.next()?;
            let who: u64 = fields.next()?.parse().ok()?;
            (who == pid).then(|| fields.next().unwrap_or("").to_owned())
        })
        .collect()
}

fn pid_of(supervised: &serde_json::Value) -> u64 {
    supervised["pid"]
        .as_u64()
        .expect("a running CI agent has a pid")
}

#[tokio::test]
async fn gitlab_runner_contract_away_drains_the_job_and_auto_starts_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut worker = SupervisedWorker::start(
        dir.path(),
        "gl-1",
        &supervise_toml("gitlab-runner", "gitlab", &log, ""),
    )
    .unwrap();

    let running = worker
        .wait_supervised("the runner to run a job", |s| {
            s["state"] == "running" && s["job_running"] == true
        })
        .await
        .unwrap();
    assert_eq!(running["kind"], "gitlab-runner");
    assert_eq!(running["wanted"], true);
    let first = pid_of(&running);
    let human = worker.cli_ok(&["status"]).unwrap();
    assert!(
        human.contains("ci agent: gitlab-runner running pid"),
        "{human}"
    );

    worker
        .cli_ok(&["set-availability", "away", "--reason", "my turn"])
        .unwrap();
    let draining = worker
        .wait_supervised("the runner to drain", |s| s["state"] == "draining")
        .await
        .unwrap();
    assert_eq!(draining["wanted"], false);
    assert!(
        draining["why"].as_str().unwrap().contains("my turn"),
        "{draining}"
    );
    let stopped = worker
        .wait_supervised("the runner to exit", |s| s["state"] == "stopped")
        .await
        .unwrap();
    assert_eq!(stopped["last_exit"]["status"], "exit 0", "{stopped}");
    assert_eq!(stopped["last_exit"]["requested"], true);
    assert_eq!(stopped["last_exit"]["stopped_hard"], false);
    let seen = events_of(&log, first);
    let quit = seen
        .iter()
        .position(|e| e == "signal SIGQUIT")
        .expect("SIGQUIT");
    // The job running at SIGQUIT ran to its end, and no new one started.
    let last_start = seen
        .iter()
        .rposition(|e| e.starts_with("job-start"))
        .unwrap();
    assert!(last_start < quit, "{seen:?}");
    assert!(
        seen[quit..].iter().any(|e| e.starts_with("job-end")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|e| e.starts_with("job-aborted")),
        "{seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some("exit 0"));
    assert!(!alive(first as i32));

    worker.cli_ok(&["set-availability", "auto"]).unwrap();
    let again = worker
        .wait_supervised("the runner to start again", |s| s["state"] == "running")
        .await
        .unwrap();
    assert_ne!(pid_of(&again), first);
    assert_eq!(again["restarts"], 0, "a requested stop is not a crash");
    assert!(!events(&log).iter().any(|e| e.contains("second-instance")));
}

#[tokio::test]
async fn buildkite_contract_graceful_stop_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut worker = SupervisedWorker::start(
        dir.path(),
        "bk-1",
        &supervise_toml("buildkite-agent", "buildkite", &log, ""),
    )
    .unwrap();
    let running = worker
        .wait_supervised("the agent to run a job", |s| s["job_running"] == true)
        .await
        .unwrap();
    let pid = pid_of(&running);
    let said = worker.cli_ok(&["stop", "--graceful"]).unwrap();
    assert!(said.contains("exits when"), "{said}");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).unwrap(), Some(0));
    let seen = events_of(&log, pid);
    assert!(seen.contains(&"signal SIGTERM".to_owned()), "{seen:?}");
    assert!(
        !seen.iter().any(|e| e.starts_with("job-aborted")),
        "{seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some("exit 0"), "{seen:?}");
    assert!(!alive(pid as i32));
    assert!(
        worker.supervised_pidfile().is_none(),
        "the pidfile is removed"
    );
}

#[tokio::test]
async fn graceful_stop_deadline_sends_the_hard_signal() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut worker = SupervisedWorker::start(
        dir.path(),
        "gl-deadline",
        &supervise_toml("gitlab-runner", "gitlab", &log, "")
            .replace("STANDIN_JOB_SECS = \"3\"", "STANDIN_JOB_SECS = \"600\""),
    )
    .unwrap();
    let running = worker
        .wait_supervised("the runner to run a job", |s| s["job_running"] == true)
        .await
        .unwrap();
    let pid = pid_of(&running);
    worker
        .cli_ok(&["stop", "--graceful", "--deadline", "1s"])
        .unwrap();
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).unwrap(), Some(0));
    let seen = events_of(&log, pid);
    assert_eq!(
        seen.iter()
            .filter(|e| e.starts_with("signal"))
            .collect::<Vec<_>>(),
        ["signal SIGQUIT", "signal SIGTERM"],
        "{seen:?}"
    );
    assert!(seen.contains(&"job-aborted 1".to_owned()), "{seen:?}");
    let text = worker.log();
    assert!(
        text.contains("stop deadline; stopped with SIGTERM"),
        "{text}"
    );
}

#[tokio::test]
async fn ignoring_the_graceful_signal_past_stop_timeout_is_a_hard_stop_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut worker = SupervisedWorker::start(
        dir.path(),
        "stubborn",
        &supervise_toml(
            "command",
            "ignore",
            &log,
            "graceful_signal = \"SIGTERM\"\nhard_signal = \"SIGINT\"\nstop_timeout = \"2s\"\n",
        ),
    )
    .unwrap();
    let running = worker
        .wait_supervised("the agent to run", |s| s["state"] == "running")
        .await
        .unwrap();
    let pid = pid_of(&running);
    worker.cli_ok(&["set-availability", "away"]).unwrap();
    let draining = worker
        .wait_supervised("the agent to drain", |s| s["state"] == "draining")
        .await
        .unwrap();
    assert!(draining["hard_stop_at"].is_string(), "{draining}");
    let stopped = worker
        .wait_supervised("the hard stop", |s| s["state"] == "stopped")
        .await
        .unwrap();
    let exit = &stopped["last_exit"];
    assert_eq!(exit["stopped_hard"], true, "{stopped}");
    assert_eq!(exit["status"], "exit 130");
    assert!(
        exit["reason"]
            .as_str()
            .unwrap()
            .contains("ignored SIGTERM for stop_timeout (2s); stopped with SIGINT"),
        "{exit}"
    );
    let seen = events_of(&log, pid);
    let tail = &seen[seen.len() - 3..];
    assert_eq!(tail[0], "signal SIGINT", "{seen:?}");
    assert!(tail[1].starts_with("job-aborted"), "{seen:?}");
    assert_eq!(tail[2], "exit 130", "{seen:?}");
    assert!(seen.contains(&"signal SIGTERM".to_owned()), "{seen:?}");
    let human = worker.cli_ok(&["status"]).unwrap();
    assert!(human.contains("last exit: exit 130"), "{human}");
    assert!(human.contains("(stopped hard)"), "{human}");
}

#[tokio::test]
async fn an_agent_that_exits_by_itself_is_restarted_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut worker = SupervisedWorker::start(
        dir.path(),
        "crashy",
        &supervise_toml("command", "crash", &log, ""),
    )
    .unwrap();
    let restarting = worker
        .wait_supervised("three restarts", |s| {
            s["restarts"].as_u64().unwrap_or(0) >= 3 && s["state"] == "restarting"
        })
        .await
        .unwrap();
    let exit = &restarting["last_exit"];
    assert_eq!(exit["status"], "exit 3", "{restarting}");
    assert_eq!(exit["requested"], false);
    assert!(
        exit["reason"]
            .as_str()
            .unwrap()
            .contains("exited by itself with exit 3 while it should run; restarting in"),
        "{exit}"
    );
    assert!(restarting["restart_at"].is_string());
    // Backoff: the starts are spaced ever further apart (1 s, 2 s, ...).
    let starts: Vec<f64> = events(&log)
        .iter()
        .filter(|line| line.ends_with(" start"))
        .filter_map(|line| line.split(' ').next()?.parse().ok())
        .collect();
    assert!(starts.len() >= 3, "{starts:?}");
    assert!(
        starts[2] - starts[1] >= 1.9,
        "second pause ≥ 2 s: {starts:?}"
    );
    assert!(
        starts[1] - starts[0] >= 0.9,
        "first pause ≥ 1 s: {starts:?}"
    );
    // Away: no more restarts.
    worker.cli_ok(&["set-availability", "away"]).unwrap();
    let stopped = worker
        .wait_supervised("no restart while away", |s| s["state"] == "stopped")
        .await
        .unwrap();
    assert!(stopped["restart_at"].is_null(), "{stopped}");
}

#[tokio::test]
async fn a_leftover_of_a_crashed_worker_is_drained_before_a_new_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut worker = SupervisedWorker::start(
        dir.path(),
        "phoenix",
        &supervise_toml("gitlab-runner", "gitlab", &log, ""),
    )
    .unwrap();
    let running = worker
        .wait_supervised("the runner to run a job", |s| s["job_running"] == true)
        .await
        .unwrap();
    let old = pid_of(&running);
    worker.kill().unwrap();
    assert!(alive(old as i32), "the runner outlives the crashed worker");

    worker.restart().unwrap();
    let new = worker
        .wait_supervised("a new runner after the old one exited", |s| {
            s["state"] == "running" && s["pid"].as_u64().is_some_and(|pid| pid != old)
        })
        .await
        .unwrap();
    assert!(!alive(old as i32));
    let old_events = events_of(&log, old);
    assert!(
        old_events.contains(&"signal SIGQUIT".to_owned()),
        "{old_events:?}"
    );
    assert_eq!(
        old_events.last().map(String::as_str),
        Some("exit 0"),
        "{old_events:?}"
    );
    assert!(!old_events.iter().any(|e| e.starts_with("job-aborted")));
    // Never two at once: the new one started after the old one exited, and
    // none found the other's lock. The worker reports the new pid as soon as
    // it has spawned it; the stand-in writes its "start" line a moment later.
    let new_start_line = format!("{} start", pid_of(&new));
    let all = nightshift_tests::wait_for(
        "the new runner's start event",
        Duration::from_secs(10),
        || {
            let all = events(&log);
            let seen = all.iter().any(|line| line.ends_with(&new_start_line));
            async move { Ok(seen.then_some(all)) }
        },
    )
    .await
    .unwrap();
    let old_exit = all
        .iter()
        .position(|line| line.ends_with(&format!("{old} exit 0")))
        .unwrap();
    let new_start = all
        .iter()
        .position(|line| line.ends_with(&new_start_line))
        .unwrap();
    assert!(old_exit < new_start, "{all:?}");
    assert!(
        !all.iter().any(|e| e.contains("second-instance")),
        "{all:?}"
    );
    assert!(worker.log().contains("left by an earlier run"));
}

#[test]
fn packaging_supervise_example_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let dir = tempfile::tempdir().unwrap();
    let bb = dir.path().join("bb");
    fs_err::create_dir_all(&bb).unwrap();
    fs_err::write(bb.join("buildbot.tac"), "allow_shutdown = 'signal'\n").unwrap();
    let text = fs_err::read_to_string(root.join("examples/worker-supervise.toml"))
        .unwrap()
        .replace("/var/lib/buildbot/worker", &bb.display().to_string())
        .replace(
            "/var/lib/nightshift-supervise",
            &dir.path().display().to_string(),
        );
    let config = dir.path().join("worker.toml");
    fs_err::write(&config, text).unwrap();
    let output = std::process::Command::new(nightshift_tests::bin_dir().unwrap().join("worker"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("supervises buildbot-worker `/usr/bin/buildbot-worker start --nodaemon .`"),
        "{stdout}"
    );
    assert!(stdout.contains("sends SIGHUP"), "{stdout}");
    // Without allow_shutdown = 'signal' the config is refused (exit 2).
    fs_err::write(bb.join("buildbot.tac"), "allow_shutdown = None\n").unwrap();
    let output = std::process::Command::new(nightshift_tests::bin_dir().unwrap().join("worker"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("supervise.kind"));
}
