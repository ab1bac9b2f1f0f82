//! Tests of the latent state machine with chosen instants, and of the
//! action driver with a fake provider under paused tokio time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::settings::{BACKOFF_FIRST, BACKOFF_MAX, backoff_after};
use super::*;

fn settings(build_wait_secs: u64, start_timeout_secs: u64) -> LatentSettings {
    LatentSettings {
        provider: ProviderSpec::Command(command::CommandSettings {
            start: "true".into(),
            stop: "true".into(),
            health: None,
        }),
        build_wait_timeout: Duration::from_secs(build_wait_secs),
        start_timeout: Duration::from_secs(start_timeout_secs),
        max_builds: 1,
        master_url: None,
    }
}

struct Clock {
    base: Now,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base: Now {
                mono: Instant::now(),
                wall: "2026-11-23T10:00:00Z".parse().unwrap(),
            },
        }
    }
    fn at(&self, secs: u64) -> Now {
        Now {
            mono: self.base.mono + Duration::from_secs(secs),
            wall: self
                .base
                .wall
                .checked_add(jiff::SignedDuration::from_secs(secs as i64))
                .unwrap(),
        }
    }
}

fn pool(workers: &[&str], max_starting: usize, build_wait: u64, clock: &Clock) -> LatentPool {
    let mut pool = LatentPool::new(
        MasterAccess {
            url: "wss://127.0.0.1:7380".into(),
            ..MasterAccess::default()
        },
        max_starting,
    );
    for worker in workers {
        pool.configure(worker, settings(build_wait, 60), clock.at(0));
    }
    pool
}

fn attempt_of(actions: &[LatentAction]) -> u64 {
    actions
        .iter()
        .find_map(|a| match a {
            LatentAction::Start { attempt, .. } | LatentAction::Stop { attempt, .. } => {
                Some(*attempt)
            }
            _ => None,
        })
        .expect("a start or stop action")
}

fn timer_of(actions: &[LatentAction], want: TimerKind) -> (Instant, u64) {
    actions
        .iter()
        .find_map(|a| match a {
            LatentAction::Timer {
                at,
                kind,
                generation,
                ..
            } if *kind == want => Some((*at, *generation)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {want:?} timer in {actions:?}"))
}

fn has_stop(actions: &[LatentAction]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, LatentAction::Stop { .. }))
}

fn started(pool: &mut LatentPool, worker: &str, attempt: u64, now: Now) -> Vec<LatentAction> {
    pool.handle(
        LatentEvent::StartDone {
            worker: worker.into(),
            attempt,
            outcome: StartOutcome::Started,
        },
        now,
    )
}

/// Issue 8: an instance whose build was taken by another worker before it
/// came up has nothing to do; it is stopped after `build_wait_timeout`,
/// whichever of "agent connected" and "provider start returned" came last.
#[test]
fn an_instance_that_comes_up_without_a_build_is_stopped_after_build_wait_timeout() {
    for agent_first in [false, true] {
        let clock = Clock::new();
        let mut pool = pool(&["vm1"], 2, 2, &clock);
        let attempt = attempt_of(&pool.start("vm1", "build 1", clock.at(0)).unwrap());
        let actions = if agent_first {
            // The agent's hello makes it running before the provider returns.
            let connected = pool.agent_connected("vm1", clock.at(2)).unwrap();
            assert!(started(&mut pool, "vm1", attempt, clock.at(3)).is_empty());
            connected
        } else {
            assert!(started(&mut pool, "vm1", attempt, clock.at(1)).is_empty());
            pool.agent_connected("vm1", clock.at(2)).unwrap()
        };
        assert_eq!(pool.state("vm1"), Some(LatentState::Running));
        let (at, generation) = timer_of(&actions, TimerKind::Linger);
        assert_eq!(at, clock.at(4).mono, "agent_first={agent_first}");
        let actions = pool.handle(
            LatentEvent::Timer {
                worker: "vm1".into(),
                kind: TimerKind::Linger,
                generation,
                health: None,
            },
            clock.at(4),
        );
        assert!(has_stop(&actions), "agent_first={agent_first}: {actions:?}");
        assert_eq!(pool.state("vm1"), Some(LatentState::Stopping));
    }
}

/// The same timer does nothing to an instance that got its build.
#[test]
fn the_connect_timer_spares_an_instance_that_got_its_build() {
    let clock = Clock::new();
    let mut pool = pool(&["vm1"], 2, 2, &clock);
    let attempt = attempt_of(&pool.start("vm1", "build 1", clock.at(0)).unwrap());
    started(&mut pool, "vm1", attempt, clock.at(1));
    let actions = pool.agent_connected("vm1", clock.at(1)).unwrap();
    let (_, generation) = timer_of(&actions, TimerKind::Linger);
    pool.build_started("vm1", clock.at(1));
    let actions = pool.handle(
        LatentEvent::Timer {
            worker: "vm1".into(),
            kind: TimerKind::Linger,
            generation,
            health: None,
        },
        clock.at(3),
    );
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(pool.state("vm1"), Some(LatentState::Running));
}

#[test]
fn full_cycle_stopped_starting_running_lingering_stopping_stopped() {
    let clock = Clock::new();
    let mut pool = pool(&["vm1"], 2, 300, &clock);
    assert_eq!(pool.state("vm1"), Some(LatentState::Stopped));
    let actions = pool
        .start("vm1", "build 1 of compile", clock.at(0))
        .unwrap();
    let attempt = attempt_of(&actions);
    let token = match &actions[0] {
        LatentAction::Start {
            instance, timeout, ..
        } => {
            assert_eq!(instance.worker, "vm1");
            assert_eq!(instance.master.url, "wss://127.0.0.1:7380");
            assert_eq!(*timeout, Duration::from_secs(60));
            assert_eq!(instance.token.len(), 64);
            instance.token.clone()
        }
        other => panic!("expected a start, got {other:?}"),
    };
    let (at, _) = timer_of(&actions, TimerKind::StartTimeout);
    assert_eq!(at, clock.at(60).mono);
    let status = pool.status("vm1").unwrap();
    assert_eq!(status.state, LatentState::Starting);
    assert_eq!(status.reason, "starting for build 1 of compile");
    assert_eq!(status.since, clock.at(0).wall);
    assert_eq!(pool.token("vm1"), Some(token.as_str()));

    assert!(started(&mut pool, "vm1", attempt, clock.at(5)).is_empty());
    assert_eq!(pool.state("vm1"), Some(LatentState::Starting));
    assert!(
        pool.status("vm1")
            .unwrap()
            .reason
            .contains("waiting for its agent")
    );
    pool.agent_connected("vm1", clock.at(8)).unwrap();
    assert_eq!(pool.state("vm1"), Some(LatentState::Running));

    pool.build_started("vm1", clock.at(8));
    let actions = pool.build_finished("vm1", clock.at(20));
    assert_eq!(pool.state("vm1"), Some(LatentState::Lingering));
    let (at, generation) = timer_of(&actions, TimerKind::Linger);
    assert_eq!(at, clock.at(320).mono);

    let actions = pool.handle(
        LatentEvent::Timer {
            worker: "vm1".into(),
            kind: TimerKind::Linger,
            generation,
            health: None,
        },
        clock.at(320),
    );
    assert!(has_stop(&actions));
    let status = pool.status("vm1").unwrap();
    assert_eq!(status.state, LatentState::Stopping);
    assert_eq!(status.reason, "idle for build_wait_timeout (300s)");
    assert!(pool.token("vm1").is_none(), "no token while stopping");

    let actions = pool.handle(
        LatentEvent::StopDone {
            worker: "vm1".into(),
            attempt,
            result: Ok(()),
        },
        clock.at(322),
    );
    assert!(actions.is_empty());
    let status = pool.status("vm1").unwrap();
    assert_eq!(status.state, LatentState::Stopped);
    assert_eq!(status.reason, "stopped: idle for build_wait_timeout (300s)");
    assert!(pool.startable("vm1", clock.at(322)).is_ok());
}

#[test]
fn a_worker_master_url_overrides_the_listen_address_for_its_instances() {
    let clock = Clock::new();
    let mut pool = pool(&["vm1"], 1, 60, &clock);
    let mut with_url = settings(60, 60);
    with_url.master_url = Some("wss://ci.example.org:7380".into());
    pool.configure("vm1", with_url, clock.at(0));
    let actions = pool.start("vm1", "b1", clock.at(0)).unwrap();
    match &actions[0] {
        LatentAction::Start { instance, .. } => {
            assert_eq!(instance.master.url, "wss://ci.example.org:7380");
        }
        other => panic!("expected a start, got {other:?}"),
    }
}

#[test]
fn stop_all_stops_every_existing_instance_for_shutdown() {
    let clock = Clock::new();
    let mut pool = pool(&["a", "b", "c"], 2, 60, &clock);
    let a = attempt_of(&pool.start("a", "r1", clock.at(0)).unwrap());
    pool.start("b", "r2", clock.at(0)).unwrap();
    pool.agent_connected("b", clock.at(1)).unwrap();
    assert!(!pool.all_stopped());
    let stops = pool.stop_all("the master is shutting down", clock.at(2));
    let names: Vec<&str> = stops.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(names, vec!["a", "b"], "c was never started");
    assert!(stops.iter().all(|(_, actions)| has_stop(actions)));
    assert_eq!(
        pool.status("a").unwrap().reason,
        "the master is shutting down"
    );
    pool.handle(
        LatentEvent::StopDone {
            worker: "a".into(),
            attempt: a,
            result: Ok(()),
        },
        clock.at(3),
    );
    assert!(!pool.all_stopped(), "b is still stopping");
}

#[test]
fn a_new_build_while_lingering_disarms_the_linger_timer() {
    let clock = Clock::new();
    let mut pool = pool(&["vm1"], 2, 300, &clock);
    pool.start("vm1", "b1", clock.at(0)).unwrap();
    pool.agent_connected("vm1", clock.at(1)).unwrap();
    pool.build_started("vm1", clock.at(1));
    let (_, generation) = timer_of(&pool.build_finished("vm1", clock.at(2)), TimerKind::Linger);
    pool.build_started("vm1", clock.at(100));
    assert_eq!(pool.state("vm1"), Some(LatentState::Running));
    let stale = LatentEvent::Timer {
        worker: "vm1".into(),
        kind: TimerKind::Linger,
        generation,
        health: None,
    };
    assert!(pool.handle(stale, clock.at(302)).is_empty());
    assert_eq!(pool.state("vm1"), Some(LatentState::Running));
}

#[test]
fn build_wait_timeout_zero_stops_right_after_the_build() {
    let clock = Clock::new();
    let mut pool = pool(&["vm1"], 1, 0, &clock);
    pool.start("vm1", "b1", clock.at(0)).unwrap();
    pool.agent_connected("vm1", clock.at(1)).unwrap();
    pool.build_started("vm1", clock.at(1));
    let actions = pool.build_finished("vm1", clock.at(9));
    assert!(has_stop(&actions));
    assert_eq!(pool.state("vm1"), Some(LatentState::Stopping));
}

#[test]
fn max_starting_caps_concurrent_starts_master_wide() {
    let clock = Clock::new();
    let mut pool = pool(&["a", "b", "c"], 2, 60, &clock);
    pool.start("a", "r1", clock.at(0)).unwrap();
    pool.start("b", "r2", clock.at(0)).unwrap();
    assert_eq!(pool.starting_count(), 2);
    assert_eq!(
        pool.start("c", "r3", clock.at(0)).unwrap_err(),
        NotStartable::TooManyStarting {
            starting: 2,
            max: 2
        }
    );
    assert_eq!(
        pool.state("c"),
        Some(LatentState::Stopped),
        "a refused start changes nothing"
    );
    assert_eq!(pool.starting().collect::<Vec<_>>(), vec!["a", "b"]);
    pool.agent_connected("a", clock.at(3)).unwrap();
    assert!(pool.start("c", "r3", clock.at(3)).is_ok());
    assert_eq!(
        pool.start("a", "r4", clock.at(3)).unwrap_err(),
        NotStartable::Busy {
            worker: "a".into(),
            state: LatentState::Running
        }
    );
}

#[test]
fn not_now_frees_the_start_slot_and_pauses_only_that_worker() {
    let clock = Clock::new();
    let mut pool = pool(&["a", "b"], 1, 60, &clock);
    let attempt = attempt_of(&pool.start("a", "r1", clock.at(0)).unwrap());
    let actions = pool.handle(
        LatentEvent::StartDone {
            worker: "a".into(),
            attempt,
            outcome: StartOutcome::NotNow("quota reached".into()),
        },
        clock.at(2),
    );
    assert!(!has_stop(&actions), "nothing was started, nothing to stop");
    let (retry_at, generation) = timer_of(&actions, TimerKind::Retry);
    assert_eq!(retry_at, clock.at(2).mono + NOT_NOW_RETRY);
    let status = pool.status("a").unwrap();
    assert_eq!(status.state, LatentState::Stopped);
    assert_eq!(status.reason, "provider said not now: quota reached");
    assert_eq!(status.retry_after, Some(clock.at(32).wall));
    assert!(matches!(
        pool.startable("a", clock.at(3)),
        Err(NotStartable::BackedOff { .. })
    ));
    assert!(
        pool.startable("b", clock.at(3)).is_ok(),
        "another worker is tried instead"
    );
    pool.handle(
        LatentEvent::Timer {
            worker: "a".into(),
            kind: TimerKind::Retry,
            generation,
            health: None,
        },
        clock.at(32),
    );
    assert!(pool.startable("a", clock.at(32)).is_ok());
    assert_eq!(pool.status("a").unwrap().retry_after, None);
}

#[test]
fn a_failed_start_stops_the_instance_and_backs_off_doubling() {
    let clock = Clock::new();
    let mut pool = pool(&["a"], 1, 60, &clock);
    let mut now = 0;
    for (failure, backoff) in [(1, 5), (2, 10), (3, 20)] {
        let attempt = attempt_of(&pool.start("a", "r1", clock.at(now)).unwrap());
        let actions = pool.handle(
            LatentEvent::StartDone {
                worker: "a".into(),
                attempt,
                outcome: StartOutcome::Failed("image not found".into()),
            },
            clock.at(now + 1),
        );
        assert!(has_stop(&actions), "failure {failure}: stop what may exist");
        assert_eq!(pool.state("a"), Some(LatentState::Stopping));
        assert_eq!(
            pool.status("a").unwrap().reason,
            "start failed: image not found"
        );
        assert_eq!(pool.starting_count(), 0);
        let actions = pool.handle(
            LatentEvent::StopDone {
                worker: "a".into(),
                attempt,
                result: Ok(()),
            },
            clock.at(now + 2),
        );
        let (at, _) = timer_of(&actions, TimerKind::Retry);
        assert_eq!(at, clock.at(now + 1 + backoff).mono, "failure {failure}");
        assert!(pool.startable("a", clock.at(now + backoff)).is_err());
        now += 1 + backoff;
        assert!(pool.startable("a", clock.at(now)).is_ok());
    }
    // A successful connection resets the back-off.
    pool.start("a", "r1", clock.at(now)).unwrap();
    pool.agent_connected("a", clock.at(now + 1)).unwrap();
    assert_eq!(backoff_after(1), BACKOFF_FIRST);
    assert_eq!(backoff_after(40), BACKOFF_MAX);
}

#[test]
fn a_start_that_does_not_connect_in_time_is_stopped_and_late_answers_ignored() {
    let clock = Clock::new();
    let mut pool = pool(&["a"], 1, 60, &clock);
    let actions = pool.start("a", "r1", clock.at(0)).unwrap();
    let attempt = attempt_of(&actions);
    let (_, generation) = timer_of(&actions, TimerKind::StartTimeout);
    started(&mut pool, "a", attempt, clock.at(5));
    let actions = pool.handle(
        LatentEvent::Timer {
            worker: "a".into(),
            kind: TimerKind::StartTimeout,
            generation,
            health: None,
        },
        clock.at(60),
    );
    assert!(has_stop(&actions));
    assert_eq!(
        pool.status("a").unwrap().reason,
        "start timed out: its agent did not connect within start_timeout (60s)"
    );
    // The agent shows up late: refused, the instance is being stopped.
    assert!(pool.agent_connected("a", clock.at(61)).is_err());
    // A late StartDone for the old attempt changes nothing.
    assert!(started(&mut pool, "a", attempt, clock.at(62)).is_empty());
    assert_eq!(pool.state("a"), Some(LatentState::Stopping));
}

#[test]
fn a_worker_that_turns_away_is_stopped_after_its_current_build() {
    let clock = Clock::new();
    let mut pool = pool(&["a"], 1, 600, &clock);
    pool.start("a", "r1", clock.at(0)).unwrap();
    pool.agent_connected("a", clock.at(1)).unwrap();
    pool.build_started("a", clock.at(1));
    assert!(
        pool.presence_changed("a", false, "manual", clock.at(5))
            .is_empty()
    );
    assert_eq!(
        pool.state("a"),
        Some(LatentState::Running),
        "the build runs on"
    );
    let actions = pool.build_finished("a", clock.at(50));
    assert!(has_stop(&actions), "no lingering for an away worker");
    assert_eq!(
        pool.status("a").unwrap().reason,
        "worker turned away (manual)"
    );

    // Idle and lingering, then away: stopped at once.
    let mut pool2 = self::pool(&["b"], 1, 600, &clock);
    pool2.start("b", "r", clock.at(0)).unwrap();
    pool2.agent_connected("b", clock.at(1)).unwrap();
    pool2.build_started("b", clock.at(1));
    pool2.build_finished("b", clock.at(2));
    assert_eq!(pool2.state("b"), Some(LatentState::Lingering));
    assert!(has_stop(&pool2.presence_changed(
        "b",
        false,
        "schedule:nights",
        clock.at(3)
    )));

    // Away, then back before the build ends: it lingers as usual.
    let mut pool3 = self::pool(&["c"], 1, 600, &clock);
    pool3.start("c", "r", clock.at(0)).unwrap();
    pool3.agent_connected("c", clock.at(1)).unwrap();
    pool3.build_started("c", clock.at(1));
    pool3.presence_changed("c", false, "manual", clock.at(2));
    pool3.presence_changed("c", true, "manual", clock.at(3));
    pool3.build_finished("c", clock.at(4));
    assert_eq!(pool3.state("c"), Some(LatentState::Lingering));
}

#[test]
fn a_removed_worker_is_drained_then_forgotten() {
    let clock = Clock::new();
    let mut pool = pool(&["a", "b"], 2, 600, &clock);
    let attempt = attempt_of(&pool.start("a", "r1", clock.at(0)).unwrap());
    pool.agent_connected("a", clock.at(1)).unwrap();
    pool.build_started("a", clock.at(1));
    assert!(
        pool.remove("a", clock.at(2)).is_empty(),
        "its build runs on"
    );
    assert!(matches!(
        pool.startable("a", clock.at(2)),
        Err(NotStartable::Removed(_))
    ));
    assert!(pool.remove("b", clock.at(2)).is_empty());
    assert!(!pool.is_latent("b"), "a stopped worker goes at once");
    assert!(has_stop(&pool.build_finished("a", clock.at(9))));
    assert_eq!(pool.status("a").unwrap().reason, "removed from master.toml");
    pool.handle(
        LatentEvent::StopDone {
            worker: "a".into(),
            attempt,
            result: Err("vm already gone".into()),
        },
        clock.at(10),
    );
    assert!(!pool.is_latent("a"));
}

#[test]
fn connections_while_stopping_are_refused_and_others_adopted() {
    let clock = Clock::new();
    let mut pool = pool(&["a"], 1, 600, &clock);
    // Booted by hand (with the worker's own token): adopted, then it
    // lingers like any idle instance.
    let actions = pool.agent_connected("a", clock.at(0)).unwrap();
    assert_eq!(pool.state("a"), Some(LatentState::Lingering));
    let (_, generation) = timer_of(&actions, TimerKind::Linger);
    let stop = pool.handle(
        LatentEvent::Timer {
            worker: "a".into(),
            kind: TimerKind::Linger,
            generation,
            health: None,
        },
        clock.at(600),
    );
    assert!(has_stop(&stop));
    // While it is being stopped, a connection is refused.
    assert!(pool.agent_connected("a", clock.at(601)).is_err());
    let attempt = attempt_of(&stop);
    pool.handle(
        LatentEvent::StopDone {
            worker: "a".into(),
            attempt,
            result: Ok(()),
        },
        clock.at(602),
    );
    assert!(pool.agent_connected("not-latent", clock.at(0)).is_ok());
    pool.start("a", "r", clock.at(0)).unwrap();
    pool.agent_connected("a", clock.at(1)).unwrap();
    // Losing the agent stops the instance.
    let actions = pool.agent_disconnected("a", "missing for 60s", clock.at(5));
    assert!(has_stop(&actions));
    assert_eq!(
        pool.status("a").unwrap().reason,
        "agent disconnected: missing for 60s"
    );
}

#[test]
fn serve_counts_on_starting_instances_once_and_respects_max_starting() {
    let clock = Clock::new();
    let mut pool = pool(&["a", "b", "c"], 2, 60, &clock);
    let now = clock.at(0);
    let all = ["plain", "a", "b", "c"];
    // First dispatch pass: three queued requests.
    let mut claimed = BTreeSet::new();
    assert!(
        matches!(pool.serve(&all, &mut claimed, "r1", now), LatentChoice::Start { worker, .. } if worker == "a")
    );
    assert!(
        matches!(pool.serve(&all, &mut claimed, "r2", now), LatentChoice::Start { worker, .. } if worker == "b")
    );
    assert_eq!(
        pool.serve(&all, &mut claimed, "r3", now),
        LatentChoice::Wait("2 latent workers starting (max_starting = 2)".into())
    );
    // Next pass: the two starting instances serve the first two requests,
    // the third still waits; nothing new starts.
    let mut claimed = BTreeSet::new();
    assert_eq!(
        pool.serve(&all, &mut claimed, "r1", now),
        LatentChoice::AlreadyStarting("a".into())
    );
    assert_eq!(
        pool.serve(&all, &mut claimed, "r2", now),
        LatentChoice::AlreadyStarting("b".into())
    );
    assert!(matches!(
        pool.serve(&all, &mut claimed, "r3", now),
        LatentChoice::Wait(_)
    ));
    assert_eq!(pool.starting_count(), 2);
    // Only non-latent candidates: nothing to start.
    assert_eq!(
        pool.serve(&["plain"], &mut BTreeSet::new(), "r4", now),
        LatentChoice::Wait("no latent worker can start".into())
    );
}

/// A provider that records calls; `start` answers from a script of
/// outcomes, or never when the script says `None`.
struct FakeProvider {
    outcomes: Mutex<Vec<Option<StartOutcome>>>,
    calls: Mutex<Vec<String>>,
}

impl LatentProvider for FakeProvider {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn start<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, StartOutcome> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("start {}", instance.worker));
        let next = self.outcomes.lock().unwrap().remove(0);
        Box::pin(async move {
            match next {
                Some(outcome) => outcome,
                None => std::future::pending().await,
            }
        })
    }
    fn stop<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Result<(), String>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("stop {}", instance.worker));
        Box::pin(async { Ok(()) })
    }
    fn health<'a>(&'a self, _instance: &'a InstanceInfo) -> BoxFuture<'a, Health> {
        Box::pin(async { Health::Alive })
    }
}

/// Drives a pool like the scheduler does: actions spawned, events fed
/// back, under paused time (timers fire as the runtime idles).
struct Harness {
    pool: LatentPool,
    provider: Arc<FakeProvider>,
    providers: BTreeMap<String, Arc<dyn LatentProvider>>,
    report: Arc<dyn Fn(LatentEvent) + Send + Sync>,
    events: tokio::sync::mpsc::UnboundedReceiver<LatentEvent>,
}

impl Harness {
    fn new(
        workers: &[&str],
        settings: LatentSettings,
        outcomes: Vec<Option<StartOutcome>>,
    ) -> Harness {
        let mut pool = LatentPool::new(MasterAccess::default(), 1);
        let provider = Arc::new(FakeProvider {
            outcomes: Mutex::new(outcomes),
            calls: Mutex::new(vec![]),
        });
        let mut providers: BTreeMap<String, Arc<dyn LatentProvider>> = BTreeMap::new();
        for worker in workers {
            pool.configure(worker, settings.clone(), Now::system());
            providers.insert((*worker).to_owned(), provider.clone());
        }
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        Harness {
            pool,
            provider,
            providers,
            report: Arc::new(move |event| {
                let _ = tx.send(event);
            }),
            events,
        }
    }

    fn run(&self, actions: Vec<LatentAction>) {
        for action in actions {
            spawn_action(action, &self.providers, self.report.clone());
        }
    }

    async fn until(&mut self, done: impl Fn(&LatentPool) -> bool) {
        while !done(&self.pool) {
            let event = self.events.recv().await.expect("events keep coming");
            let actions = self.pool.handle(event, Now::system());
            self.run(actions);
        }
    }

    fn calls(&self) -> Vec<String> {
        self.provider.calls.lock().unwrap().clone()
    }
}

fn is_stopped(pool: &LatentPool) -> bool {
    pool.state("vm1") == Some(LatentState::Stopped)
}

#[tokio::test(start_paused = true)]
async fn driver_stops_and_backs_off_a_start_whose_agent_never_connects() {
    let mut h = Harness::new(
        &["vm1"],
        settings(60, 120),
        vec![Some(StartOutcome::Started)],
    );
    let begun = Instant::now();
    let actions = h.pool.start("vm1", "build 7", Now::system()).unwrap();
    h.run(actions);
    h.until(is_stopped).await;
    assert_eq!(
        Instant::now() - begun,
        Duration::from_secs(120),
        "stopped at start_timeout"
    );
    assert_eq!(h.calls(), vec!["start vm1", "stop vm1"]);
    let status = h.pool.status("vm1").unwrap();
    assert!(
        status
            .reason
            .contains("did not connect within start_timeout (120s); the instance is up"),
        "{}",
        status.reason
    );
    assert!(status.retry_after.is_some());
    assert!(
        h.pool.startable("vm1", Now::system()).is_err(),
        "backed off"
    );
}

#[tokio::test(start_paused = true)]
async fn driver_cuts_a_provider_start_that_hangs_and_retries_after_the_backoff() {
    let mut h = Harness::new(&["vm1"], settings(60, 30), vec![None]);
    let begun = Instant::now();
    let actions = h.pool.start("vm1", "build 8", Now::system()).unwrap();
    h.run(actions);
    h.until(is_stopped).await;
    assert_eq!(Instant::now() - begun, Duration::from_secs(30));
    assert_eq!(h.calls(), vec!["start vm1", "stop vm1"]);
    // The back-off ends by a timer, not by anyone asking again.
    h.until(|p| p.startable("vm1", Now::system()).is_ok()).await;
    assert_eq!(
        Instant::now() - begun,
        Duration::from_secs(30) + BACKOFF_FIRST
    );
}

#[tokio::test(start_paused = true)]
async fn driver_lingers_then_stops_an_idle_instance() {
    let mut h = Harness::new(
        &["vm1"],
        settings(600, 30),
        vec![Some(StartOutcome::Started)],
    );
    let actions = h.pool.start("vm1", "build 9", Now::system()).unwrap();
    h.run(actions);
    h.pool.agent_connected("vm1", Now::system()).unwrap();
    h.pool.build_started("vm1", Now::system());
    let actions = h.pool.build_finished("vm1", Now::system());
    h.run(actions);
    let begun = Instant::now();
    h.until(is_stopped).await;
    assert_eq!(Instant::now() - begun, Duration::from_secs(600));
    assert_eq!(h.calls(), vec!["start vm1", "stop vm1"]);
    assert!(
        h.pool
            .status("vm1")
            .unwrap()
            .reason
            .contains("idle for build_wait_timeout")
    );
}
