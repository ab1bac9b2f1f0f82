//! The supervisor task: reconciles what the presence wants (run, or stop
//! gracefully by a deadline) with the CI agent process — starts it, sends
//! the graceful signal, the hard signal when it outstays `stop_timeout` or
//! a stop deadline, SIGKILL to its process group after that, restarts it
//! with backoff when it exits by itself — and publishes a
//! [`SupervisedStatus`] on every change. Exits, deadlines and restarts are
//! awaited, never polled; only the "is a job running" look at the process
//! tree is a periodic sample.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{Presence, PresenceState};
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

use super::process::{self, Leftover};
use super::settings::{HARD_STOP_GRACE, ReluctantAction, SuperviseSettings};
use crate::build_processes::load::BuildTrees;
use crate::handle::{SupervisedExit, SupervisedState, SupervisedStatus};
use nightshift_proto::clock::Clock;

/// First pause before restarting an agent that exited by itself.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest pause between restarts.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// An agent that ran this long before exiting starts over at [`BACKOFF_MIN`].
const STABLE_RUN: Duration = Duration::from_secs(60);

/// Whether the worker itself is stopping (`worker stop`, SIGTERM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    None,
    /// Stop the agent gracefully; hard at `hard_at` when given (a
    /// `--deadline`, or now for a stop that is not graceful).
    Graceful {
        hard_at: Option<Instant>,
    },
}

/// What the supervisor should make true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub run: bool,
    /// Hard-stop no later than this (besides `stop_timeout`).
    pub hard_at: Option<Instant>,
    /// Why, for people: the presence that decided it.
    pub why: String,
}

impl Want {
    /// `available` runs the agent, `away`/`offline` stop it, `reluctant`
    /// does what `reluctant` in `[supervise]` says; a stopping worker stops it.
    pub fn from_presence(
        presence: &Presence,
        stop: StopRequest,
        reluctant: ReluctantAction,
    ) -> Want {
        let why = format!(
            "{} ({}): {}",
            presence.state, presence.source, presence.reason
        );
        match stop {
            StopRequest::Graceful { hard_at } => Want {
                run: false,
                hard_at,
                why,
            },
            StopRequest::None => {
                let (run, why) = match presence.state {
                    PresenceState::Available => (true, why),
                    PresenceState::Reluctant => match reluctant {
                        ReluctantAction::Run => (true, format!("{why}; reluctant = \"run\"")),
                        ReluctantAction::Stop => (false, format!("{why}; reluctant = \"stop\"")),
                    },
                    PresenceState::Away | PresenceState::Offline => (false, why),
                };
                Want {
                    run,
                    hard_at: None,
                    why,
                }
            }
        }
    }
}

/// The daemon's end of the supervisor.
pub struct SupervisorLink {
    want: watch::Sender<Want>,
    status: watch::Receiver<SupervisedStatus>,
    reluctant: ReluctantAction,
}

impl SupervisorLink {
    /// Tells the supervisor what the presence (and a stop) now want.
    pub fn steer(&self, presence: &Presence, stop: StopRequest) {
        let want = Want::from_presence(presence, stop, self.reluctant);
        self.want.send_if_modified(|current| {
            if *current == want {
                false
            } else {
                *current = want;
                true
            }
        });
    }

    pub fn status(&self) -> SupervisedStatus {
        self.status.borrow().clone()
    }

    /// No process runs (a stopping worker may exit).
    pub fn is_idle(&self) -> bool {
        self.status.borrow().pid.is_none()
    }

    /// Resolves when the status changed; pends forever once the task ended.
    pub async fn changed(&mut self) {
        if self.status.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Starts the supervisor task. A `leftover` of a crashed run is stopped
/// gracefully before a new agent starts: never two at once.
pub fn spawn(
    settings: Arc<SuperviseSettings>,
    state_dir: PathBuf,
    trees: Arc<BuildTrees>,
    clock: Arc<dyn Clock>,
    sample_every: Duration,
    leftover: Option<Leftover>,
) -> SupervisorLink {
    let now = clock.now();
    let (want_tx, want_rx) = watch::channel(Want {
        run: false,
        hard_at: None,
        why: "starting up".to_owned(),
    });
    let status = SupervisedStatus {
        kind: settings.kind.name().to_owned(),
        command: settings.command_line(),
        state: SupervisedState::Stopped,
        since: now,
        pid: None,
        wanted: false,
        why: "starting up".to_owned(),
        job_running: None,
        draining_since: None,
        hard_stop_at: None,
        restart_at: None,
        restarts: 0,
        last_exit: None,
    };
    let (status_tx, status_rx) = watch::channel(status.clone());
    let reluctant = settings.reluctant;
    let running = leftover.map(|leftover| {
        tracing::warn!(
            "a CI agent left by an earlier run (pid {}) is still running; asking it to finish its job and exit before starting a new one",
            leftover.pid
        );
        Running::Leftover(leftover)
    });
    let task = Task {
        settings,
        state_dir,
        trees,
        clock,
        sample_every,
        want: want_rx,
        status_tx,
        running,
        started: None,
        drain: None,
        restart_at: None,
        backoff: Backoff { next: BACKOFF_MIN },
        status,
    };
    tokio::spawn(task.run());
    SupervisorLink {
        want: want_tx,
        status: status_rx,
        reluctant,
    }
}

enum Running {
    Child {
        child: tokio::process::Child,
        pid: i32,
    },
    Leftover(Leftover),
}

impl Running {
    fn pid(&self) -> i32 {
        match self {
            Running::Child { pid, .. } => *pid,
            Running::Leftover(leftover) => leftover.pid,
        }
    }
}

struct Drain {
    since: Timestamp,
    /// When the hard signal goes out (unless sent already).
    hard_at: Instant,
    /// Why the hard signal went out, once it did.
    hard_sent: Option<String>,
    /// When SIGKILL goes to the process group, after the hard signal.
    kill_at: Option<Instant>,
}

struct Task {
    settings: Arc<SuperviseSettings>,
    state_dir: PathBuf,
    trees: Arc<BuildTrees>,
    clock: Arc<dyn Clock>,
    sample_every: Duration,
    want: watch::Receiver<Want>,
    status_tx: watch::Sender<SupervisedStatus>,
    running: Option<Running>,
    started: Option<Instant>,
    drain: Option<Drain>,
    restart_at: Option<Instant>,
    backoff: Backoff,
    status: SupervisedStatus,
}

/// Pauses between restarts: doubling from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`]; a run of [`STABLE_RUN`] starts over.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn next(&mut self, ran: Option<Duration>) -> Duration {
        if ran.is_some_and(|ran| ran >= STABLE_RUN) {
            self.next = BACKOFF_MIN;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

async fn wait_exit(running: &mut Option<Running>) -> Option<std::process::ExitStatus> {
    match running {
        Some(Running::Child { child, .. }) => child.wait().await.ok(),
        Some(Running::Leftover(leftover)) => {
            // Readable once the process has exited; not our child, so its
            // exit status is not ours to read.
            let _ = leftover.exit.readable().await;
            None
        }
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run(mut self) {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            self.reconcile();
            self.publish();
            let drain_wake = self.drain_wake();
            let restart_at = self.restart_at;
            let sampling = matches!(self.running, Some(Running::Child { .. }));
            tokio::select! {
                changed = self.want.changed() => {
                    if changed.is_err() {
                        // The daemon is gone (it waits for us when it can).
                        if let Some(running) = &self.running {
                            let _ = process::signal(running.pid(), Signal::SIGKILL);
                        }
                        return;
                    }
                }
                status = wait_exit(&mut self.running) => self.on_exit(status),
                () = tokio::time::sleep_until(restart_at.unwrap_or(far)), if restart_at.is_some() => {
                    self.restart_at = None;
                }
                () = tokio::time::sleep_until(drain_wake.unwrap_or(far)), if drain_wake.is_some() => {
                    self.on_drain_deadline();
                }
                () = tokio::time::sleep(self.sample_every), if sampling => self.sample_job().await,
            }
        }
    }

    fn reconcile(&mut self) {
        let want = self.want.borrow_and_update().clone();
        match (&self.running, want.run) {
            (None, true) => {
                if self.restart_at.is_none() {
                    self.start(&want);
                }
            }
            (None, false) => {
                if self.restart_at.take().is_some() {
                    tracing::info!("not restarting the CI agent: {}", want.why);
                }
            }
            // Running as wanted. (A draining one is let finish; it starts
            // again once it has exited.)
            (Some(Running::Child { .. }), true) => {}
            (Some(_), _) => match &mut self.drain {
                None => self.begin_drain(&want),
                Some(drain) => {
                    if drain.hard_sent.is_none()
                        && let Some(hard_at) = want.hard_at
                        && hard_at < drain.hard_at
                    {
                        drain.hard_at = hard_at;
                    }
                }
            },
        }
    }

    fn start(&mut self, want: &Want) {
        match process::start(&self.settings, &self.state_dir, &self.trees) {
            Ok(child) => {
                let pid = child.id().map_or(0, |pid| pid as i32);
                tracing::info!(
                    "started the CI agent `{}` (pid {pid}) in {}: {}",
                    self.settings.command_line(),
                    self.settings.workdir.display(),
                    want.why
                );
                self.running = Some(Running::Child { child, pid });
                self.started = Some(Instant::now());
            }
            Err(error) => {
                let delay = self.backoff.next(None);
                let reason = format!(
                    "cannot start `{}` in {}: {error}; trying again in {} s",
                    self.settings.command_line(),
                    self.settings.workdir.display(),
                    delay.as_secs()
                );
                tracing::error!("{reason}");
                self.status.restarts += 1;
                self.restart_at = Some(Instant::now() + delay);
                self.status.last_exit = Some(SupervisedExit {
                    at: self.clock.now(),
                    status: "did not start".to_owned(),
                    requested: false,
                    stopped_hard: false,
                    reason,
                });
            }
        }
    }

    fn begin_drain(&mut self, want: &Want) {
        let Some(running) = &self.running else {
            return;
        };
        let pid = running.pid();
        let graceful = self.settings.graceful_signal;
        let mut hard_at = Instant::now() + self.settings.stop_timeout;
        if let Some(at) = want.hard_at {
            hard_at = hard_at.min(at);
        }
        tracing::info!(
            "asking the CI agent (pid {pid}) to finish its job and exit ({}): {}",
            graceful.as_str(),
            want.why
        );
        if let Err(error) = process::signal(pid, graceful) {
            tracing::warn!("cannot send {} to pid {pid}: {error}", graceful.as_str());
        }
        self.drain = Some(Drain {
            since: self.clock.now(),
            hard_at,
            hard_sent: None,
            kill_at: None,
        });
    }

    fn drain_wake(&self) -> Option<Instant> {
        let drain = self.drain.as_ref()?;
        match &drain.hard_sent {
            None => Some(drain.hard_at),
            Some(_) => drain.kill_at,
        }
    }

    fn on_drain_deadline(&mut self) {
        let Some(pid) = self.running.as_ref().map(Running::pid) else {
            return;
        };
        let stop_timeout = self.settings.stop_timeout;
        let graceful = self.settings.graceful_signal;
        let hard = self.settings.hard_signal;
        let why = self.want.borrow().why.clone();
        let Some(drain) = &mut self.drain else {
            return;
        };
        if drain.hard_sent.is_none() {
            let outstayed = Instant::now() >= drain.hard_at
                && self.clock.now().duration_since(drain.since).unsigned_abs()
                    + Duration::from_millis(500)
                    >= stop_timeout;
            let reason = if outstayed {
                format!(
                    "it ignored {} for stop_timeout ({}); stopped with {}",
                    graceful.as_str(),
                    nightshift_policy::format_duration(
                        SignedDuration::try_from(stop_timeout).unwrap_or(SignedDuration::MAX)
                    ),
                    hard.as_str()
                )
            } else {
                format!(
                    "it was still running at the stop deadline; stopped with {} ({why})",
                    hard.as_str()
                )
            };
            tracing::warn!("CI agent (pid {pid}): {reason}");
            if let Err(error) = process::signal(pid, hard) {
                tracing::warn!("cannot send {} to pid {pid}: {error}", hard.as_str());
            }
            drain.hard_sent = Some(reason);
            drain.kill_at = Some(Instant::now() + HARD_STOP_GRACE);
        } else if drain.kill_at.is_some_and(|at| at <= Instant::now()) {
            tracing::warn!(
                "CI agent (pid {pid}) outlived {} by {} s; killing its process group",
                hard.as_str(),
                HARD_STOP_GRACE.as_secs()
            );
            let _ = process::signal(pid, Signal::SIGKILL);
            drain.kill_at = None;
        }
    }

    fn on_exit(&mut self, exit: Option<std::process::ExitStatus>) {
        let Some(running) = self.running.take() else {
            return;
        };
        let pid = running.pid();
        process::forget(pid, &self.state_dir, &self.trees);
        let ran = self.started.take().map(|started| started.elapsed());
        let drain = self.drain.take();
        let status = exit.map_or_else(|| "unknown".to_owned(), describe_exit);
        let want = self.want.borrow().clone();
        let leftover = matches!(running, Running::Leftover(_));
        let stopped_hard = drain.as_ref().and_then(|drain| drain.hard_sent.clone());
        let requested = drain.is_some();
        let reason = if leftover {
            format!("the CI agent left by an earlier run (pid {pid}) has exited")
        } else if let Some(hard) = &stopped_hard {
            format!("{hard}; it ended with {status}")
        } else if requested {
            format!(
                "finished after {} and ended with {status}",
                self.settings.graceful_signal.as_str()
            )
        } else if want.run {
            let delay = self.backoff.next(ran);
            self.restart_at = Some(Instant::now() + delay);
            self.status.restarts += 1;
            format!(
                "exited by itself with {status} while it should run; restarting in {} s",
                delay.as_secs()
            )
        } else {
            format!("exited by itself with {status}")
        };
        if requested && stopped_hard.is_none() {
            tracing::info!("CI agent (pid {pid}) {reason}");
        } else {
            tracing::warn!("CI agent (pid {pid}) {reason}");
        }
        self.status.last_exit = Some(SupervisedExit {
            at: self.clock.now(),
            status,
            requested,
            stopped_hard: stopped_hard.is_some(),
            reason,
        });
        self.status.job_running = None;
    }

    async fn sample_job(&mut self) {
        let Some(Running::Child { pid, .. }) = &self.running else {
            return;
        };
        let pid = *pid;
        if let Ok(busy) = tokio::task::spawn_blocking(move || process::has_children(pid)).await {
            self.status.job_running = Some(busy);
        }
    }

    /// Publishes the status when something people can see changed.
    fn publish(&mut self) {
        let want = self.want.borrow().clone();
        let state = match (&self.running, &self.drain) {
            (Some(_), Some(_)) => SupervisedState::Draining,
            (Some(_), None) => SupervisedState::Running,
            (None, _) if self.restart_at.is_some() => SupervisedState::Restarting,
            (None, _) => SupervisedState::Stopped,
        };
        if state != self.status.state {
            self.status.state = state;
            self.status.since = self.clock.now();
        }
        self.status.pid = self.running.as_ref().map(|running| running.pid() as u32);
        if self.running.is_none() {
            self.status.job_running = None;
        }
        self.status.wanted = want.run;
        self.status.why = want.why;
        self.status.draining_since = self.drain.as_ref().map(|drain| drain.since);
        self.status.hard_stop_at = self
            .drain
            .as_ref()
            .filter(|drain| drain.hard_sent.is_none())
            .map(|drain| self.wall(drain.hard_at));
        self.status.restart_at = self.restart_at.map(|at| self.wall(at));
        let status = self.status.clone();
        self.status_tx.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    /// The wall-clock time of a monotonic instant.
    fn wall(&self, at: Instant) -> Timestamp {
        let now = self.clock.now();
        let ahead = SignedDuration::try_from(at.saturating_duration_since(Instant::now()))
            .unwrap_or(SignedDuration::ZERO);
        now.checked_add(ahead).unwrap_or(now)
    }
}

/// `exit 0`, `exit 3`, `signal SIGKILL`.
fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("signal {}", signal.as_str()),
            Err(_) => format!("signal {signal}"),
        },
        (None, None) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_policy::Source;

    fn presence(state: PresenceState) -> Presence {
        Presence {
            state,
            source: Source::Manual,
            reason: "owner".into(),
            since: Timestamp::UNIX_EPOCH,
            until: None,
        }
    }

    #[test]
    fn presence_decides_whether_the_agent_runs() {
        let run = |state, reluctant| {
            Want::from_presence(&presence(state), StopRequest::None, reluctant).run
        };
        assert!(run(PresenceState::Available, ReluctantAction::Stop));
        assert!(run(PresenceState::Reluctant, ReluctantAction::Run));
        assert!(!run(PresenceState::Reluctant, ReluctantAction::Stop));
        assert!(!run(PresenceState::Away, ReluctantAction::Run));
        assert!(!run(PresenceState::Offline, ReluctantAction::Run));
        let at = Instant::now();
        let stopping = Want::from_presence(
            &presence(PresenceState::Available),
            StopRequest::Graceful { hard_at: Some(at) },
            ReluctantAction::Run,
        );
        assert!(!stopping.run);
        assert_eq!(stopping.hard_at, Some(at));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run() {
        let mut backoff = Backoff { next: BACKOFF_MIN };
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.next(Some(Duration::from_secs(3))).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff.next(None).as_secs(), 60);
        assert_eq!(backoff.next(Some(STABLE_RUN)).as_secs(), 1);
        assert_eq!(backoff.next(Some(STABLE_RUN)).as_secs(), 1);
    }
}
