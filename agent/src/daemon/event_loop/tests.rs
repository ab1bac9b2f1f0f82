//! Tests of the event loop with a fake clock, a fake link and real runners.

use super::builds::push_tail;
use super::*;
use crate::daemon::manual;
use crate::handle::{AgentStatus, ManualRequest};
use nightshift_policy::Source;
use nightshift_policy::{AvailabilityConfig, PresenceState};
use nightshift_proto::clock::{SystemClock, TestClock};
use nightshift_proto::wire::{AgentMessage, MasterMessage};
use nightshift_proto::wire::{BuildResult, Outcome, StepSpec};
use tokio::sync::oneshot;

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// A step named `name` running `command`, waiting for a lock grant when
/// `needs_grant`.
fn step(name: &str, command: &str, needs_grant: bool) -> StepSpec {
    StepSpec {
        name: name.into(),
        command: command.into(),
        timeout_secs: None,
        env: BTreeMap::new(),
        workdir: None,
        needs_grant,
        checkout: false,
        upload: None,
    }
}

/// A test clock that, once [`ShiftedClock::shift`] is called, reads `by`
/// ahead of tokio's time: a starved process or a suspended laptop.
#[derive(Debug)]
struct ShiftedClock {
    base: TestClock,
    by: SignedDuration,
    shifted: std::sync::atomic::AtomicBool,
}

impl ShiftedClock {
    fn new(start: &str, by: SignedDuration) -> Arc<Self> {
        Arc::new(Self {
            base: TestClock::starting_at(at(start)),
            by,
            shifted: false.into(),
        })
    }

    fn shift(&self) {
        self.shifted
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> Timestamp {
        let now = self.base.now();
        if self.shifted.load(std::sync::atomic::Ordering::SeqCst) {
            now + self.by
        } else {
            now
        }
    }
}

fn policy(toml_text: &str) -> Policy {
    let config: AvailabilityConfig = toml::from_str(toml_text).unwrap();
    Policy::compile(&config, jiff::tz::TimeZone::UTC).unwrap()
}

const NIGHTS: &str = r#"
        timezone = "UTC"
        default = "away"
        [[schedule]]
        name = "nights"
        hours = "19:00-07:00"
    "#;
const ALWAYS: &str = r#"
        timezone = "UTC"
        default = "available"
    "#;

struct Fixture {
    wiring: Wiring,
    task: tokio::task::JoinHandle<Exit>,
    state: tempfile::TempDir,
    _work: tempfile::TempDir,
    clock: Arc<dyn Clock>,
    /// How long to wait for a frame: virtual days with paused time,
    /// a real minute otherwise.
    patience: Duration,
}

fn start(policy_text: &str, clock: Arc<dyn Clock>, max_builds: u32) -> Fixture {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    start_in(policy_text, clock, max_builds, state, work)
}

fn start_in(
    policy_text: &str,
    clock: Arc<dyn Clock>,
    max_builds: u32,
    state: tempfile::TempDir,
    work: tempfile::TempDir,
) -> Fixture {
    let manual = manual::load(state.path(), clock.now()).unwrap();
    let (daemon, inbox, wiring) = Daemon::new(
        Settings {
            worker: "w1".into(),
            master_url: "wss://master.test".into(),
            max_builds,
            state_dir: state.path().to_owned(),
            overrun: SignedDuration::ZERO,
        },
        clock.clone(),
        policy(policy_text),
        manual,
        Spool::open(state.path()).unwrap(),
        Arc::new(RunnerSettings {
            artifacts: None,
            workdir: work.path().to_owned(),
            kill_grace: Duration::from_millis(500),
            git: Default::default(),
            credit: Default::default(),
        }),
        Arc::new(BuildTrees::without_cgroups()),
    );
    let task = tokio::spawn(daemon.run(inbox));
    let patience = if clock.now() < at("2027-01-01T00:00:00Z") {
        Duration::from_secs(3 * 86400)
    } else {
        Duration::from_secs(60)
    };
    Fixture {
        wiring,
        task,
        state,
        _work: work,
        clock,
        patience,
    }
}

impl Fixture {
    /// The link comes up, as the link task would report it.
    async fn link_up(&self) {
        self.link_up_with(None).await;
    }

    /// [`Fixture::link_up`] from a master whose welcome says its
    /// `missing_timeout`.
    async fn link_up_with(&self, missing_timeout: Option<Duration>) {
        let presence = self.wiring.hello.borrow().presence.clone();
        self.wiring
            .link_events
            .send(LinkEvent::Up {
                presence,
                cancel: Vec::new(),
                missing_timeout,
            })
            .unwrap();
        let mut status = self.wiring.handle.status.clone();
        tokio::time::timeout(
            self.patience,
            status.wait_for(|status| status.master.connected),
        )
        .await
        .expect("the daemon sees the link up")
        .unwrap();
    }

    fn master_sends(&self, message: MasterMessage) {
        self.wiring
            .link_events
            .send(LinkEvent::Frame(message))
            .unwrap();
    }

    /// The next frame for the master that is not build chatter.
    async fn next_to_master(&mut self) -> AgentMessage {
        loop {
            let message = tokio::time::timeout(self.patience, self.wiring.to_master.recv())
                .await
                .expect("a frame for the master within a minute")
                .expect("the daemon keeps its channel open")
                .message;
            match message {
                AgentMessage::Output { .. }
                | AgentMessage::StepStarted { .. }
                | AgentMessage::StepFinished { .. } => continue,
                other => return other,
            }
        }
    }

    async fn next_presence(&mut self) -> Presence {
        match self.next_to_master().await {
            AgentMessage::Presence { presence, .. } => presence,
            other => panic!("expected a presence, got {other:?}"),
        }
    }

    async fn set_manual(&self, manual: Option<ManualRequest>) -> Result<Presence, String> {
        let (reply, answer) = oneshot::channel();
        self.wiring
            .handle
            .commands
            .send(ControlCommand::SetManual { manual, reply })
            .await
            .unwrap();
        answer.await.unwrap()
    }

    async fn stop(&self, graceful: bool, deadline: Option<SignedDuration>) {
        let (reply, answer) = oneshot::channel();
        self.wiring
            .handle
            .commands
            .send(ControlCommand::Stop {
                graceful,
                deadline,
                reply,
            })
            .await
            .unwrap();
        answer.await.unwrap().unwrap();
    }

    /// The master hands out `build_id`: one step running `command`.
    fn start_build(&self, build_id: BuildId, command: &str) {
        self.start_steps(build_id, vec![step("only", command, false)]);
    }

    /// The master hands out `build_id` with these steps.
    fn start_steps(&self, build_id: BuildId, steps: Vec<StepSpec>) {
        self.master_sends(MasterMessage::StartBuild {
            build_id,
            builder: "demo".into(),
            steps,
            properties: BTreeMap::new(),
            source: None,
            holds_locks: false,
            max_log_bytes: None,
        });
    }

    /// The link drops, as the link task would report it.
    fn link_down(&self) {
        self.wiring
            .link_events
            .send(LinkEvent::Down {
                error: "connection reset".into(),
            })
            .unwrap();
    }

    /// Waits (a real minute at most) until the daemon's status says `done`.
    async fn wait_status(&self, done: impl FnMut(&AgentStatus) -> bool) -> AgentStatus {
        let mut status = self.wiring.handle.status.clone();
        tokio::time::timeout(Duration::from_secs(60), status.wait_for(done))
            .await
            .expect("the status within a minute")
            .unwrap()
            .clone()
    }

    /// The next frame to the master must refuse `build_id`; returns why.
    async fn expect_refused(&mut self, build_id: BuildId) -> String {
        match self.next_to_master().await {
            AgentMessage::BuildRefused {
                build_id: refused,
                reason,
            } if refused == build_id => reason,
            other => panic!("expected build {build_id} refused, got {other:?}"),
        }
    }

    /// The next frame to the master must say step `step` of `build_id`
    /// waits for its locks.
    async fn expect_step_waiting(&mut self, build_id: BuildId, step: u32) {
        let frame = self.next_to_master().await;
        assert!(
            matches!(frame, AgentMessage::StepWaiting { build_id: b, step: s } if b == build_id && s == step),
            "expected step {step} of build {build_id} waiting, got {frame:?}"
        );
    }

    /// The next frame to the master must be its goodbye.
    async fn expect_goodbye(&mut self) {
        let frame = self.next_to_master().await;
        assert!(
            matches!(frame, AgentMessage::Goodbye { .. }),
            "expected a goodbye, got {frame:?}"
        );
    }

    /// The master stores `build_id`'s result; the stopping daemon then says
    /// goodbye, exits, and has dropped the result from its spool.
    async fn store_result_and_exit(mut self, build_id: BuildId) -> Exit {
        self.master_sends(MasterMessage::ResultStored { build_id });
        self.expect_goodbye().await;
        let (exit, state) = self.exit().await;
        assert!(
            !state
                .path()
                .join(format!("results/{build_id}.json"))
                .exists()
        );
        exit
    }

    /// The next frame to the master must accept `build_id`.
    async fn expect_accepted(&mut self, build_id: BuildId) {
        assert_eq!(
            self.next_to_master().await,
            AgentMessage::BuildAccepted { build_id }
        );
    }

    /// The next frame to the master must be a build's result; returns it.
    async fn next_result(&mut self) -> BuildResult {
        match self.next_to_master().await {
            AgentMessage::BuildFinished { result } => result,
            other => panic!("expected a build result, got {other:?}"),
        }
    }

    /// Waits for the daemon to end; returns its exit and its state dir.
    async fn exit(self) -> (Exit, tempfile::TempDir) {
        let exit = tokio::time::timeout(self.patience, self.task)
            .await
            .expect("the daemon exits")
            .unwrap();
        (exit, self.state)
    }
}

#[tokio::test(start_paused = true)]
async fn a_schedule_boundary_is_pushed_exactly_at_the_boundary_and_nothing_before() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T18:30:00Z")));
    let mut fixture = start(NIGHTS, clock, 1);
    assert_eq!(
        fixture.wiring.hello.borrow().presence.state,
        PresenceState::Away
    );
    fixture.link_up().await;
    // Half an hour of capped sleeps and re-checks, then the window opens.
    let presence = fixture.next_presence().await;
    assert_eq!(presence.state, PresenceState::Available);
    assert_eq!(presence.source, Source::Schedule("nights".into()));
    assert_eq!(fixture.clock.now(), at("2026-11-23T19:00:00Z"));
    assert_eq!(presence.since, at("2026-11-23T19:00:00Z"));
    assert_eq!(presence.until, Some(at("2026-11-24T07:00:00Z")));
    let status = fixture.wiring.handle.status.borrow().clone();
    assert_eq!(status.presence.state, PresenceState::Available);
    assert_eq!(status.counters.presence_changes, 1);
    // And it closes at 07:00.
    let presence = fixture.next_presence().await;
    assert_eq!(presence.state, PresenceState::Away);
    assert_eq!(fixture.clock.now(), at("2026-11-24T07:00:00Z"));
}

#[tokio::test(start_paused = true)]
async fn a_build_offered_just_after_the_window_closed_is_refused() {
    // The window closed at 07:00, but the loop has not yet handled the
    // boundary when the master's offer arrives (a starved process).
    let late = ShiftedClock::new("2026-11-24T06:59:30Z", SignedDuration::from_secs(60));
    let mut fixture = start(NIGHTS, late.clone(), 1);
    fixture.link_up().await;
    late.shift();
    fixture.start_build(9, "true");
    let mut away_first = false;
    loop {
        match fixture.next_to_master().await {
            AgentMessage::Presence { presence, .. } => {
                away_first |= presence.state == PresenceState::Away;
            }
            AgentMessage::BuildRefused { build_id, reason } => {
                assert_eq!(build_id, 9);
                assert!(reason.contains("away"), "{reason}");
                break;
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(
        away_first,
        "the master hears of the close before the refusal"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_jump_is_noticed_within_a_minute() {
    // A suspended laptop: tokio's clock stood still while the wall
    // clock moved past the boundary.
    let jumping = ShiftedClock::new("2026-11-23T17:00:00Z", SignedDuration::from_hours(3));
    let mut fixture = start(NIGHTS, jumping.clone(), 1);
    fixture.link_up().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    jumping.shift();
    let started = tokio::time::Instant::now();
    let presence = fixture.next_presence().await;
    assert_eq!(presence.state, PresenceState::Available);
    assert!(started.elapsed() <= MAX_SLEEP, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_manual_state_is_pushed_persisted_and_runs_out_by_itself() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T12:00:00Z")));
    let mut fixture = start(ALWAYS, clock, 1);
    fixture.link_up().await;
    let presence = fixture
        .set_manual(Some(ManualRequest {
            state: PresenceState::Away,
            until: Some(at("2026-11-23T13:00:00Z")),
            reason: Some("gaming".into()),
        }))
        .await
        .unwrap();
    assert_eq!(presence.state, PresenceState::Away);
    assert_eq!(presence.source, Source::Manual);
    let pushed = fixture.next_presence().await;
    assert_eq!(pushed, presence);
    assert!(manual::path(fixture.state.path()).exists());
    assert_eq!(
        fixture
            .wiring
            .handle
            .status
            .borrow()
            .manual
            .as_ref()
            .map(|m| m.state),
        Some(PresenceState::Away)
    );

    let back = fixture.next_presence().await;
    assert_eq!(back.state, PresenceState::Available);
    assert_eq!(back.source, Source::Default);
    assert_eq!(fixture.clock.now(), at("2026-11-23T13:00:00Z"));
    assert!(!manual::path(fixture.state.path()).exists());
    assert_eq!(fixture.wiring.handle.status.borrow().manual, None);
}

#[tokio::test(start_paused = true)]
async fn a_manual_state_survives_a_restart() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T12:00:00Z")));
    let fixture = start(ALWAYS, clock.clone(), 1);
    fixture
        .set_manual(Some(ManualRequest {
            state: PresenceState::Reluctant,
            until: None,
            reason: None,
        }))
        .await
        .unwrap();
    fixture.task.abort();
    let restarted = start_in(
        ALWAYS,
        clock,
        1,
        fixture.state,
        tempfile::tempdir().unwrap(),
    );
    let hello = restarted.wiring.hello.borrow().presence.clone();
    assert_eq!(hello.state, PresenceState::Reluctant);
    assert_eq!(hello.source, Source::Manual);
}

#[tokio::test(start_paused = true)]
async fn bad_manual_requests_are_refused_and_change_nothing() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T12:00:00Z")));
    let fixture = start(ALWAYS, clock, 1);
    let error = fixture
        .set_manual(Some(ManualRequest {
            state: PresenceState::Away,
            until: Some(at("2026-11-23T11:00:00Z")),
            reason: None,
        }))
        .await
        .unwrap_err();
    assert!(error.contains("not in the future"), "{error}");
    let error = fixture
        .set_manual(Some(ManualRequest {
            state: PresenceState::Offline,
            until: None,
            reason: None,
        }))
        .await
        .unwrap_err();
    assert!(error.contains("offline"), "{error}");
    assert_eq!(
        fixture.wiring.handle.status.borrow().presence.state,
        PresenceState::Available
    );
    assert!(!manual::path(fixture.state.path()).exists());
}

#[tokio::test(start_paused = true)]
async fn an_away_worker_refuses_builds_and_a_master_override_is_applied() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T12:00:00Z")));
    let mut fixture = start(NIGHTS, clock, 1);
    fixture.link_up().await;
    fixture.start_build(5, "true");
    let reason = fixture.expect_refused(5).await;
    assert!(reason.contains("away"), "{reason}");
    fixture
        .set_manual(Some(ManualRequest {
            state: PresenceState::Available,
            until: None,
            reason: None,
        }))
        .await
        .unwrap();
    assert_eq!(
        fixture.next_presence().await.state,
        PresenceState::Available
    );
    // The manual state beats the automatic sources, the master's too.
    fixture.set_manual(None).await.unwrap();
    assert_eq!(fixture.next_presence().await.state, PresenceState::Away);
    fixture.master_sends(MasterMessage::MasterOverride {
        presence: Some(Presence {
            state: PresenceState::Away,
            reason: "paused by the admin".into(),
            source: Source::Master,
            since: at("2026-11-23T12:00:00Z"),
            until: None,
        }),
    });
    let presence = fixture.next_presence().await;
    assert_eq!(presence.source, Source::Master);
    assert_eq!(presence.reason, "paused by the admin");
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_while_the_link_is_down_and_the_hello_carries_the_presence() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T18:59:00Z")));
    let mut fixture = start(NIGHTS, clock, 1);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(fixture.wiring.to_master.try_recv().is_err());
    let hello = fixture.wiring.hello.borrow().presence.clone();
    assert_eq!(hello.state, PresenceState::Available);
    // Welcomed with that presence: nothing more to push.
    fixture.link_up().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(fixture.wiring.to_master.try_recv().is_err());
    assert!(fixture.wiring.handle.status.borrow().master.connected);
}

#[tokio::test(start_paused = true)]
async fn sigterm_with_no_builds_goes_away_says_goodbye_and_exits() {
    let clock: Arc<dyn Clock> = Arc::new(TestClock::starting_at(at("2026-11-23T12:00:00Z")));
    let mut fixture = start(ALWAYS, clock, 1);
    fixture.link_up().await;
    fixture.wiring.signals.send(SignalKind::Terminate).unwrap();
    let presence = fixture.next_presence().await;
    assert_eq!(presence.state, PresenceState::Away);
    assert_eq!(presence.source, Source::Stopping);
    fixture.expect_goodbye().await;
    assert!(matches!(fixture.exit().await.0, Exit::Stopped(_)));
}

// Builds run real processes, so these use the real clock.

#[tokio::test]
async fn a_graceful_stop_finishes_the_running_build_refuses_new_ones_then_exits() {
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 2);
    fixture.link_up().await;
    fixture.start_build(1, "sleep 1; echo done");
    fixture.expect_accepted(1).await;
    assert_eq!(fixture.wiring.hello.borrow().running, vec![1]);
    fixture.stop(true, None).await;
    assert_eq!(fixture.next_presence().await.source, Source::Stopping);
    fixture.start_build(2, "true");
    fixture.expect_refused(2).await;
    let result = fixture.next_result().await;
    assert_eq!((result.build_id, result.outcome), (1, Outcome::Success));
    assert_eq!(result.log, "done\n");
    assert!(fixture.state.path().join("results/1.json").exists());
    // Waits for the master to store the result before leaving: the daemon
    // decides while it sends the result, so a Goodbye would already follow it.
    while let Ok(message) = fixture.wiring.to_master.try_recv() {
        assert!(
            !matches!(message.message, AgentMessage::Goodbye { .. }),
            "left before the master stored the result: {:?}",
            message.message
        );
    }
    assert!(!fixture.task.is_finished());
    let exit = fixture.store_result_and_exit(1).await;
    assert!(matches!(exit, Exit::Stopped(_)));
}

#[tokio::test]
async fn a_second_sigterm_cancels_the_build_at_once_and_reports_it_cancelled() {
    // The build ran: it is not "refused" (which the master would re-queue
    // as if it never ran) but reported cancelled with why, so the master
    // counts a retry with that reason.
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
    fixture.link_up().await;
    fixture.start_build(1, "sleep 300");
    fixture.expect_accepted(1).await;
    fixture.wiring.signals.send(SignalKind::Terminate).unwrap();
    assert_eq!(fixture.next_presence().await.source, Source::Stopping);
    fixture.wiring.signals.send(SignalKind::Terminate).unwrap();
    match fixture.next_to_master().await {
        AgentMessage::BuildFinished { result } => {
            assert_eq!(result.build_id, 1);
            assert_eq!(result.outcome, nightshift_proto::wire::Outcome::Cancelled);
            let reason = result.reason.unwrap_or_default();
            assert!(
                reason.contains("a second SIGTERM") && reason.contains("re-queues"),
                "{reason}"
            );
        }
        other => panic!("expected the cancelled result, got {other:?}"),
    }
    fixture.store_result_and_exit(1).await;
}

#[tokio::test]
async fn at_the_stop_deadline_the_build_is_reported_cancelled_with_the_deadline() {
    // Issue 8: the build ran, so it is not "refused": its result says it
    // was cancelled and why, and the master counts a retry.
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
    fixture.link_up().await;
    fixture.start_build(1, "sleep 300");
    fixture.expect_accepted(1).await;
    fixture
        .stop(true, Some(SignedDuration::from_millis(300)))
        .await;
    assert_eq!(fixture.next_presence().await.source, Source::Stopping);
    let result = fixture.next_result().await;
    assert_eq!(result.build_id, 1);
    assert_eq!(result.outcome, nightshift_proto::wire::Outcome::Cancelled);
    assert_eq!(
        result.reason.as_deref(),
        Some("its stop deadline of 0.3 s ran out")
    );
    fixture.store_result_and_exit(1).await;
}

#[test]
fn seconds_for_people() {
    assert_eq!(seconds_text(Duration::from_secs(2)), "2");
    assert_eq!(seconds_text(Duration::from_millis(1999)), "2");
    assert_eq!(seconds_text(Duration::from_millis(300)), "0.3");
    assert_eq!(seconds_text(Duration::from_millis(1500)), "1.5");
}

#[tokio::test]
async fn a_result_finished_while_disconnected_is_delivered_after_reconnecting() {
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
    fixture.link_up().await;
    fixture.start_build(9, "sleep 0.3; echo finished offline");
    fixture.expect_accepted(9).await;
    fixture.link_down();
    fixture
        .wait_status(|status| status.counters.builds_run == 1)
        .await;
    assert!(fixture.state.path().join("results/9.json").exists());
    while let Ok(Outgoing { message, .. }) = fixture.wiring.to_master.try_recv() {
        assert!(
            !matches!(message, AgentMessage::BuildFinished { .. }),
            "sent while down"
        );
    }
    fixture.link_up().await;
    let result = fixture.next_result().await;
    assert_eq!(result.build_id, 9);
    assert_eq!(result.log, "finished offline\n");
    fixture.master_sends(MasterMessage::ResultStored { build_id: 9 });
    let state = fixture.state.path().to_owned();
    tokio::time::timeout(Duration::from_secs(60), async {
        while state.join("results/9.json").exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refused_result_is_dropped_from_the_spool_and_not_sent_again() {
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
    fixture.link_up().await;
    fixture.start_build(9, "echo done");
    fixture.expect_accepted(9).await;
    assert!(matches!(
        fixture.next_to_master().await,
        AgentMessage::BuildFinished { .. }
    ));
    assert!(fixture.state.path().join("results/9.json").exists());
    fixture.master_sends(MasterMessage::ResultRefused {
        build_id: 9,
        reason: "not assigned to this worker: it is unknown or finished".into(),
    });
    // Link events are handled in order: the refusal before the reconnect.
    fixture.link_down();
    fixture.link_up().await;
    // After the welcome the spool is re-sent at once; a build handed out
    // next is answered after it. Nothing of build 9 comes first.
    fixture.start_build(10, "true");
    match fixture.next_to_master().await {
        AgentMessage::BuildAccepted { build_id: 10 } => {}
        other => panic!("expected build 10 accepted, nothing re-sent; got {other:?}"),
    }
    assert!(!fixture.state.path().join("results/9.json").exists());
}

#[tokio::test]
async fn a_full_worker_refuses_and_the_welcome_cancels_builds_requeued_elsewhere() {
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
    fixture.link_up().await;
    fixture.start_build(1, "sleep 300");
    fixture.expect_accepted(1).await;
    fixture.start_build(2, "true");
    let reason = fixture.expect_refused(2).await;
    assert!(reason.contains("full"), "{reason}");
    let presence = fixture.wiring.hello.borrow().presence.clone();
    fixture
        .wiring
        .link_events
        .send(LinkEvent::Up {
            presence,
            cancel: vec![1],
            missing_timeout: None,
        })
        .unwrap();
    fixture
        .wait_status(|status| status.builds.is_empty() && status.counters.builds_run == 1)
        .await;
    // The master moved it elsewhere: no result, nothing spooled.
    while let Ok(Outgoing { message, .. }) = fixture.wiring.to_master.try_recv() {
        assert!(
            !matches!(
                message,
                AgentMessage::BuildFinished { .. } | AgentMessage::BuildRefused { .. }
            ),
            "{message:?}"
        );
    }
    assert!(!fixture.state.path().join("results/1.json").exists());
}

#[tokio::test]
async fn a_step_waiting_for_its_locks_asks_again_after_a_reconnect() {
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
    fixture.link_up().await;
    fixture.start_steps(4, vec![step("locked", "echo compiled", true)]);
    fixture.expect_accepted(4).await;
    fixture.expect_step_waiting(4, 0).await;
    // The link drops; the master's grant (sent meanwhile) is lost.
    fixture.link_down();
    fixture.link_up().await;
    // The waiting step asks again after the reconnect.
    fixture.expect_step_waiting(4, 0).await;
    fixture.master_sends(MasterMessage::StepGranted {
        build_id: 4,
        step: 0,
    });
    let result = fixture.next_result().await;
    assert_eq!(result.build_id, 4);
    assert_eq!(result.outcome, nightshift_proto::wire::Outcome::Success);
}

#[test]
fn the_tail_keeps_the_last_lines() {
    let mut tail = Vec::new();
    push_tail(&mut tail, "a\nb");
    push_tail(&mut tail, "c\n");
    assert_eq!(tail, vec!["a\n", "bc\n"]);
    for n in 0..40 {
        push_tail(&mut tail, &format!("line {n}\n"));
    }
    assert_eq!(tail.len(), TAIL_LINES);
    assert_eq!(tail.last().map(String::as_str), Some("line 39\n"));
}

/// Issue 8 (soak): a master gives the locks of a worker it lost to others
/// once its `missing_timeout` ends. A step running on a lock grant is
/// cancelled when the master has been lost for half of it, so the lock
/// never has two holders; its result says why (the master counts a retry).
/// A build holding no lock runs on.
#[tokio::test]
async fn a_step_holding_a_lock_stops_when_the_master_is_lost_for_half_its_missing_timeout() {
    let mut fixture = start(ALWAYS, Arc::new(SystemClock), 2);
    fixture.link_up_with(Some(Duration::from_secs(2))).await;
    for (build_id, needs_grant) in [(4, true), (5, false)] {
        fixture.start_steps(build_id, vec![step("locked", "sleep 300", needs_grant)]);
        fixture.expect_accepted(build_id).await;
        if needs_grant {
            fixture.expect_step_waiting(build_id, 0).await;
        }
    }
    fixture.master_sends(MasterMessage::StepGranted {
        build_id: 4,
        step: 0,
    });
    // The granted step runs: its start comes through.
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), fixture.wiring.to_master.recv())
            .await
            .expect("a frame within a minute")
            .expect("the channel stays open");
        if matches!(frame.message, AgentMessage::StepStarted { build_id: 4, .. }) {
            break;
        }
    }
    let lost = Instant::now();
    fixture.link_down();
    fixture
        .wait_status(|status| status.counters.builds_run == 1)
        .await;
    let fenced_after = lost.elapsed();
    assert!(
        fenced_after >= Duration::from_secs(1),
        "cancelled {fenced_after:?} after the loss, before half the missing_timeout"
    );
    let spooled = fs_err::read_to_string(fixture.state.path().join("results/4.json")).unwrap();
    let result: nightshift_proto::wire::BuildResult = serde_json::from_str(&spooled).unwrap();
    assert_eq!(result.outcome, Outcome::Cancelled);
    let reason = result.reason.unwrap_or_default();
    assert!(reason.contains("missing_timeout of 2 s"), "{reason}");
    let status = fixture.wiring.handle.status.borrow().clone();
    let running: Vec<BuildId> = status.builds.iter().map(|b| b.build_id).collect();
    assert_eq!(running, vec![5], "the build without a lock runs on");
}
