//! Tests of the build runner: steps in order, streamed output, environment, timeouts and kills, cancel, lock grants, paths, logs.

use super::*;
use crate::daemon::outgoing::FRAME_COST;
use nightshift_proto::clock::SystemClock;

fn step(name: &str, command: &str) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        command: command.to_owned(),
        timeout_secs: None,
        env: BTreeMap::new(),
        workdir: None,
        needs_grant: false,
        checkout: false,
        upload: None,
    }
}

struct Harness {
    workdir: tempfile::TempDir,
    events: mpsc::Receiver<RunnerEvent>,
    sender: mpsc::Sender<RunnerEvent>,
    credit: OutputCredit,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_credit(OutputCredit::default())
    }

    fn with_credit(credit: OutputCredit) -> Harness {
        let (sender, events) = mpsc::channel(EVENT_QUEUE);
        Harness {
            workdir: tempfile::tempdir().unwrap(),
            events,
            sender,
            credit,
        }
    }

    fn start(&self, build_id: BuildId, steps: Vec<StepSpec>) -> BuildControl {
        self.start_capped(build_id, steps, None)
    }

    /// [`Harness::start`] with the master's `max_log_bytes`.
    fn start_capped(
        &self,
        build_id: BuildId,
        steps: Vec<StepSpec>,
        max_log_bytes: Option<u64>,
    ) -> BuildControl {
        let settings = Arc::new(RunnerSettings {
            artifacts: None,
            workdir: self.workdir.path().to_owned(),
            kill_grace: Duration::from_millis(500),
            git: Default::default(),
            credit: self.credit.clone(),
        });
        let mut properties = BTreeMap::new();
        properties.insert("branch-name".to_owned(), "main".to_owned());
        spawn(
            BuildRequest {
                build_id,
                builder: "demo".to_owned(),
                steps,
                properties,
                source: None,
                max_log_bytes,
            },
            settings,
            Arc::new(BuildTrees::without_cgroups()),
            Arc::new(SystemClock),
            self.sender.clone(),
        )
    }

    async fn next(&mut self) -> RunnerEvent {
        tokio::time::timeout(Duration::from_secs(60), self.events.recv())
            .await
            .expect("the runner reports within a minute")
            .expect("the runner's channel stays open")
    }

    /// Collects events until the build finishes.
    /// Collects events until the build finishes (giving back their
    /// credit, as the link does once it has written them).
    async fn finish(&mut self) -> (Vec<RunnerEvent>, BuildResult) {
        let mut seen = Vec::new();
        loop {
            match self.next().await {
                RunnerEvent::Finished { result } => return (seen, result),
                event => seen.push(without_credit(event)),
            }
        }
    }
}

fn without_credit(event: RunnerEvent) -> RunnerEvent {
    match event {
        RunnerEvent::StepWaiting { build_id, step, .. } => RunnerEvent::StepWaiting {
            build_id,
            step,
            credit: Credit::none(),
        },
        RunnerEvent::StepStarted {
            build_id, step, at, ..
        } => RunnerEvent::StepStarted {
            build_id,
            step,
            at,
            credit: Credit::none(),
        },
        RunnerEvent::Output {
            build_id,
            step,
            data,
            ..
        } => RunnerEvent::Output {
            build_id,
            step,
            data,
            credit: Credit::none(),
        },
        RunnerEvent::StepFinished {
            build_id, result, ..
        } => RunnerEvent::StepFinished {
            build_id,
            result,
            credit: Credit::none(),
        },
        finished @ RunnerEvent::Finished { .. } => finished,
    }
}

#[tokio::test]
async fn a_step_writing_faster_than_its_credit_comes_back_waits_on_its_pipe() {
    // 256 KiB of credit, held by the test as a link that writes nothing.
    let credit = OutputCredit::new(256 * 1024);
    let mut harness = Harness::with_credit(credit.clone());
    let marker = harness.workdir.path().join("demo/wrote-everything");
    // 8 MB: far more than the credit, the batch, the read buffer and
    // the pipe together can take from the step.
    harness.start(
        7,
        vec![step(
            "flood",
            "head -c 8000000 /dev/zero | tr '\\0' y; touch wrote-everything; echo done",
        )],
    );
    let mut held = Vec::new();
    let mut bytes = 0;
    // The largest frame: a batch just under full plus one read.
    while credit.available() >= FRAME_COST + BATCH_BYTES + 16 * 1024 + 4 {
        let event = harness.next().await;
        if let RunnerEvent::Output { data, .. } = &event {
            bytes += data.len();
        }
        held.push(event);
    }
    // The credit is spent and nothing is given back: the step can only
    // have written what the credit, one batch, one read and the pipe hold.
    assert!(bytes <= 256 * 1024, "{bytes} bytes of output arrived");
    assert!(
        !marker.exists(),
        "the step finished writing 8 MB although only {bytes} bytes left it"
    );
    // The link catches up: everything arrives, in order, and the step ends.
    drop(held);
    let (events, result) = harness.finish().await;
    assert_eq!(
        result.outcome,
        Outcome::Success,
        "{}",
        result.reason.unwrap_or_default()
    );
    let rest = output_of(&events);
    assert_eq!(bytes + rest.len(), 8_000_000 + "done\n".len());
    assert!(rest.ends_with("yyydone\n"), "{}", &rest[rest.len() - 20..]);
    assert!(marker.exists());
}

fn output_of(events: &[RunnerEvent]) -> String {
    events
        .iter()
        .filter_map(|event| match event {
            RunnerEvent::Output { data, .. } => Some(data.as_str()),
            _ => None,
        })
        .collect()
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

async fn wait_until_dead(pid: i32) -> bool {
    for _ in 0..200 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn steps_run_in_order_in_the_builder_directory_and_stop_at_the_first_failure() {
    let mut harness = Harness::new();
    let mut second = step("fail", "echo to-stderr >&2; exit 3");
    second.workdir = Some("sub/dir".into());
    harness.start(
        7,
        vec![
            step("first", "pwd; echo hello"),
            second,
            step("never", "echo never-runs"),
        ],
    );
    let (events, result) = harness.finish().await;
    assert_eq!(result.build_id, 7);
    assert_eq!(result.outcome, Outcome::Failure);
    assert_eq!(result.steps.len(), 2);
    assert_eq!(result.steps[0].outcome, Outcome::Success);
    assert_eq!(result.steps[0].exit_code, Some(0));
    assert_eq!(result.steps[1].outcome, Outcome::Failure);
    assert_eq!(result.steps[1].exit_code, Some(3));
    assert_eq!(result.reason.as_deref(), Some("step `fail` exited with 3"));
    let build_dir = harness.workdir.path().join("demo");
    assert!(
        result
            .log
            .starts_with(&format!("{}\nhello\n", build_dir.display())),
        "{}",
        result.log
    );
    assert!(result.log.contains("to-stderr"));
    assert!(!result.log.contains("never-runs"));
    assert!(build_dir.join("sub/dir").is_dir());
    assert_eq!(output_of(&events), result.log);
    let kinds: Vec<_> = events
        .iter()
        .filter(|event| !matches!(event, RunnerEvent::Output { .. }))
        .map(|event| match event {
            RunnerEvent::StepStarted { step, .. } => format!("started {step}"),
            RunnerEvent::StepFinished { result, .. } => format!("finished {}", result.step),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["started 0", "finished 0", "started 1", "finished 1"]
    );
}

/// Issue 8: output past the master's `max_log_bytes` does not cross
/// the link. The step runs to its end (its pipe is still drained), the
/// log says once that it is full, and the result's last line says how
/// much was not sent.
#[tokio::test]
async fn output_past_max_log_bytes_is_not_sent_and_the_step_runs_on() {
    let mut harness = Harness::new();
    harness.start_capped(
        3,
        vec![step("loud", "seq 1 200000"), step("after", "echo after")],
        Some(8192),
    );
    let (events, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Success, "{}", result.log);
    assert_eq!(result.steps.len(), 2, "both steps ran");
    let sent = output_of(&events);
    assert!(sent.len() <= 8192, "{} bytes sent", sent.len());
    assert_eq!(
        sent.matches("log reached max_log_bytes (8192 bytes)")
            .count(),
        1,
        "{sent}"
    );
    assert!(!sent.contains("after\n"), "{sent}");
    assert!(result.log.starts_with(&sent));
    assert!(
        result.log.len() <= 8192,
        "{} bytes in the result",
        result.log.len()
    );
    // `seq 1 200000` writes 1,288,895 bytes: nearly all were withheld.
    let last = result.log.trim_end().lines().last().unwrap_or_default();
    let withheld: u64 = last
        .strip_prefix("[nightshift: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in the last line {last:?}"));
    assert!(
        withheld > 1_280_000 && last.ends_with("bytes of output past max_log_bytes were not sent]"),
        "{last}"
    );
}

#[tokio::test]
async fn output_is_streamed_in_batches_and_kept_whole_in_the_log() {
    let mut harness = Harness::new();
    harness.start(1, vec![step("lines", "seq 1 20000")]);
    let (events, result) = harness.finish().await;
    let expected: String = (1..=20000).map(|n| format!("{n}\n")).collect();
    assert_eq!(result.log, expected);
    assert_eq!(output_of(&events), expected);
    let chunks = events
        .iter()
        .filter(|event| matches!(event, RunnerEvent::Output { .. }))
        .count();
    assert!(
        chunks < 100,
        "20000 lines should travel in a few batches, not {chunks}"
    );
}

#[tokio::test]
#[allow(
    unsafe_code,
    reason = "set_var: the variables a real agent inherits from systemd"
)]
async fn steps_see_their_env_and_properties_but_never_the_systemd_socket() {
    // SAFETY: tests that read these variables are in this module only,
    // and no other test depends on them being unset.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", "/run/systemd/notify");
        std::env::set_var("WATCHDOG_USEC", "1000000");
        std::env::set_var("LISTEN_FDS", "1");
    }
    let mut harness = Harness::new();
    let mut env_step = step(
        "env",
        "echo \"notify=${NOTIFY_SOCKET-unset} watchdog=${WATCHDOG_USEC-unset} listen=${LISTEN_FDS-unset}\"; \
         echo \"greeting=$GREETING build=$NIGHTSHIFT_BUILD_ID builder=$NIGHTSHIFT_BUILDER branch=$NIGHTSHIFT_PROP_BRANCH_NAME\"",
    );
    env_step.env.insert("GREETING".into(), "hi there".into());
    harness.start(42, vec![env_step]);
    let (_, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Success);
    assert_eq!(
        result.log,
        "notify=unset watchdog=unset listen=unset\n\
         greeting=hi there build=42 builder=demo branch=main\n"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_tree_including_grandchildren() {
    let mut harness = Harness::new();
    let mut slow = step(
        "slow",
        "sleep 300 & echo grandchild=$!; sh -c 'sleep 300' & wait",
    );
    slow.timeout_secs = Some(1);
    harness.start(3, vec![slow, step("after", "echo not-reached")]);
    let (events, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Timeout);
    assert_eq!(result.steps.len(), 1);
    assert_eq!(result.steps[0].outcome, Outcome::Timeout);
    assert!(
        result
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("timeout of 1 s"),
        "{:?}",
        result.reason
    );
    let log = output_of(&events);
    let pid: i32 = log
        .lines()
        .find_map(|line| line.strip_prefix("grandchild="))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no grandchild pid in {log:?}"));
    assert!(
        wait_until_dead(pid).await,
        "grandchild {pid} survived the timeout"
    );
    assert!(!result.log.contains("not-reached"));
}

#[tokio::test]
async fn processes_that_left_the_steps_group_or_session_die_with_the_step() {
    let mut harness = Harness::new();
    // `setsid` and a double fork: neither is in the step's process group
    // after its parent is gone, and the step does not wait for them.
    harness.start(
        11,
        vec![step(
            "escape",
            "setsid sh -c 'echo setsid=$$; exec sleep 300' & \
             sh -c 'sh -c \"echo orphan=\\$\\$; setsid sleep 300\" &'; \
             sleep 1",
        )],
    );
    let (events, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Success, "{}", result.log);
    let log = output_of(&events);
    let pids: Vec<i32> = log
        .lines()
        .filter_map(|line| line.split_once('=')?.1.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{log}");
    for pid in pids {
        assert!(wait_until_dead(pid).await, "{pid} outlived its step: {log}");
    }
}

#[tokio::test]
async fn the_builds_processes_are_gone_before_its_artifacts_are_read() {
    let mut harness = Harness::new();
    let upload = StepSpec {
        upload: Some(nightshift_proto::wire::ArtifactUpload {
            patterns: vec!["dist/*".into()],
            max_file_bytes: 1 << 20,
            max_build_bytes: 1 << 20,
        }),
        ..step("artifacts", "upload artifacts dist/*")
    };
    harness.start(
        12,
        vec![
            step(
                "daemon",
                "setsid sh -c 'echo daemon=$$; exec sleep 300' & sleep 1",
            ),
            upload,
        ],
    );
    let (events, result) = harness.finish().await;
    // This harness has no master: the upload step fails, saying so.
    assert_eq!(result.outcome, Outcome::Failure, "{}", result.log);
    assert_eq!(result.steps.len(), 2, "{}", result.log);
    assert!(
        result.log.contains("no master to upload to"),
        "{}",
        result.log
    );
    let log = output_of(&events);
    let pid: i32 = log
        .lines()
        .find_map(|line| line.strip_prefix("daemon=")?.trim().parse().ok())
        .expect("the daemon's pid");
    assert!(
        wait_until_dead(pid).await,
        "a daemon of the last real step outlived it: {log}"
    );
}

#[tokio::test]
async fn a_step_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let mut harness = Harness::new();
    let stubborn = step(
        "stubborn",
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    );
    let control = harness.start(4, vec![stubborn]);
    loop {
        if let RunnerEvent::Output { data, .. } = harness.next().await
            && data.contains("ready")
        {
            break;
        }
    }
    control.cancel("owner wants the machine back");
    let (_, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(result.steps[0].signal, Some(libc::SIGKILL));
    assert_eq!(
        result.reason.as_deref(),
        Some("owner wants the machine back")
    );
}

#[tokio::test]
async fn cancelling_stops_the_running_step_and_skips_the_rest() {
    let mut harness = Harness::new();
    let control = harness.start(
        5,
        vec![
            step("long", "echo started; sleep 300"),
            step("next", "echo no"),
        ],
    );
    loop {
        if let RunnerEvent::Output { data, .. } = harness.next().await
            && data.contains("started")
        {
            break;
        }
    }
    control.cancel("the master re-queued it");
    let (_, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(result.steps.len(), 1);
    assert_eq!(result.steps[0].signal, Some(libc::SIGTERM));
    assert!(!result.log.contains("no\n"));
}

#[tokio::test]
async fn a_step_needing_locks_waits_for_its_grant() {
    let mut harness = Harness::new();
    let mut locked = step("locked", "echo in-lock");
    locked.needs_grant = true;
    let control = harness.start(6, vec![step("free", "true"), locked]);
    let mut waiting = false;
    while !waiting {
        match harness.next().await {
            RunnerEvent::StepWaiting { build_id, step, .. } => {
                assert_eq!((build_id, step), (6, 1));
                waiting = true;
            }
            RunnerEvent::StepStarted { step, .. } => assert_eq!(step, 0),
            RunnerEvent::Finished { .. } => panic!("finished without waiting for the grant"),
            _ => {}
        }
    }
    // Nothing starts before the grant...
    assert!(
        tokio::time::timeout(Duration::from_millis(300), harness.events.recv())
            .await
            .is_err()
    );
    control.grant(0); // a grant for another step is not this one's
    control.grant(1);
    let (_, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Success);
    assert_eq!(result.log, "in-lock\n");
}

#[tokio::test]
async fn a_build_cancelled_while_waiting_for_locks_ends_cancelled() {
    let mut harness = Harness::new();
    let mut locked = step("locked", "echo in-lock");
    locked.needs_grant = true;
    let control = harness.start(8, vec![locked]);
    assert!(matches!(
        harness.next().await,
        RunnerEvent::StepWaiting { step: 0, .. }
    ));
    control.cancel("stop deadline");
    let (_, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert!(result.steps.is_empty());
    assert_eq!(result.reason.as_deref(), Some("stop deadline"));
}

#[tokio::test]
async fn paths_leaving_the_workdir_are_refused() {
    let mut harness = Harness::new();
    let mut escape = step("escape", "touch escaped");
    escape.workdir = Some("../..".into());
    harness.start(9, vec![escape]);
    let (_, result) = harness.finish().await;
    assert_eq!(result.outcome, Outcome::Failure);
    assert!(result.log.contains("contains `..`"), "{}", result.log);
    assert!(safe_join(Path::new("/w"), "/etc").is_err());
    assert_eq!(
        safe_join(Path::new("/w"), "a/./b").unwrap(),
        Path::new("/w/a/./b")
    );
}

#[test]
fn split_utf8_characters_are_joined_across_reads() {
    let mut batch = Batch::default();
    let text = "grüße ✓";
    let bytes = text.as_bytes();
    for chunk in bytes.chunks(1) {
        batch.push(chunk);
    }
    assert_eq!(batch.take().as_deref(), Some(text));
    batch.push(b"bad \xff byte");
    assert_eq!(batch.take().as_deref(), Some("bad \u{FFFD} byte"));
    batch.push(b"\xe2\x9c");
    assert_eq!(batch.take(), None);
    assert_eq!(batch.finish().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn a_huge_log_keeps_its_tail_and_says_what_was_dropped() {
    let mut log = Log::default();
    let line = "x".repeat(1023) + "\n";
    for _ in 0..2048 {
        log.push(&line);
    }
    log.push("the end\n");
    let text = log.finish();
    assert!(text.len() <= LOG_LIMIT + 200, "{}", text.len());
    assert!(text.starts_with("[nightshift: "));
    assert!(text.ends_with("the end\n"));
}
