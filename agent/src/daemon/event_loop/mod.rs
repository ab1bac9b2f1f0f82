//! The daemon's one event loop: every input (policy boundaries, load samples,
//! control commands, master frames, link changes, build progress, signals)
//! arrives as an [`Event`], is handled in order, and the resulting presence
//! and status are pushed — to the master when the presence changes, to the
//! control plane on a `watch` channel.

mod builds;
mod control;
mod fence;
mod master_link;
mod presence;
mod stopping;

use control::manual_request;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{Inputs, LoadMonitor, ManualOverride, Policy, Presence, PresenceTracker};
use nightshift_proto::wire::{BuildId, Outlook};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::alarm::WallAlarm;
use super::link::{HelloState, LinkEvent};
use super::outgoing::{LINK_QUEUE, LinkReceiver, LinkSender, Outgoing, link_queue};
use super::runner::{self, BuildControl, RunnerEvent, RunnerSettings};
use super::spool::Spool;
use crate::build_processes::load::{BuildTrees, LoadMeasurement};
use crate::handle::{
    AgentHandle, AgentStatus, ControlCommand, Counters, LoadSnapshot, MasterLink, RunningBuild,
};
use crate::outlook;
use crate::supervise::{StopRequest, SupervisorLink};
use nightshift_proto::clock::Clock;

/// Longest sleep between evaluations without a [`WallAlarm`]: a machine that
/// was suspended (tokio's clock stops) re-checks the wall clock at least this
/// often.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// With a [`WallAlarm`] (which wakes the loop after a suspend and on a clock
/// change) the monotonic sleep is only a safety net.
const MAX_SLEEP_WITH_ALARM: Duration = Duration::from_secs(3600);
/// A stopping agent with no builds left waits this long for the master to
/// acknowledge the last results before it says goodbye anyway (they stay
/// spooled and are delivered by the next start).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Lines of output kept per running build for the status page.
const TAIL_LINES: usize = 12;

/// Signals the daemon reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    /// SIGTERM: graceful stop; the second one stops at once.
    Terminate,
    /// SIGINT (Ctrl-C): graceful stop; the second one stops at once.
    Interrupt,
}

/// Everything that can happen to the daemon.
#[derive(Debug)]
pub enum Event {
    /// A policy boundary (or the periodic wall-clock re-check) is reached.
    PolicyTimer,
    Load(LoadMeasurement),
    Control(ControlCommand),
    Link(LinkEvent),
    Runner(RunnerEvent),
    Signal(SignalKind),
    /// The stop deadline or the wait for acknowledgements ran out.
    StopTimer,
    /// The master has been lost for half its `missing_timeout`: builds
    /// holding locks stop ([`fence`]).
    LockFence,
    /// The supervised CI agent's status changed (`[supervise]`).
    Supervised,
}

/// Fixed facts about this agent.
#[derive(Debug, Clone)]
pub struct Settings {
    pub worker: String,
    pub master_url: String,
    pub max_builds: u32,
    pub state_dir: PathBuf,
    /// The owner's accepted grace past a window's end (`[availability] overrun`).
    pub overrun: SignedDuration,
}

/// The receiving ends the loop waits on.
pub struct Inbox {
    pub commands: mpsc::Receiver<ControlCommand>,
    pub link: mpsc::UnboundedReceiver<LinkEvent>,
    pub runner: mpsc::Receiver<RunnerEvent>,
    pub load: mpsc::UnboundedReceiver<LoadMeasurement>,
    pub signals: mpsc::UnboundedReceiver<SignalKind>,
}

/// The sending ends the daemon's other parts (link, sampler, signal task)
/// and tests use.
pub struct Wiring {
    pub handle: AgentHandle,
    pub link_events: mpsc::UnboundedSender<LinkEvent>,
    pub load_samples: mpsc::UnboundedSender<LoadMeasurement>,
    pub signals: mpsc::UnboundedSender<SignalKind>,
    /// Frames for the master; the link task reads them.
    pub to_master: LinkReceiver,
    pub hello: watch::Receiver<HelloState>,
}

/// Why the daemon ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// A stop completed (graceful or not); exit 0.
    Stopped(String),
}

/// What to tell the master when a build ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// Its result, whatever it is.
    Report,
    /// Cancelled because the master re-queued it already: say nothing.
    Drop,
}

struct Build {
    control: BuildControl,
    disposition: Disposition,
    status: RunningBuild,
    tail: Vec<String>,
    step_names: Vec<String>,
    /// The step waiting for the master's lock grant, if any: asked for
    /// again after a reconnect (a grant sent while the link was down is lost).
    awaiting_grant: Option<u32>,
    /// It holds master-wide locks for its whole run (builder `locks`).
    holds_locks: bool,
    /// The step running on the master's lock grant, until it ends.
    granted_step: Option<u32>,
    /// The lock fence cancelled it already.
    fenced: bool,
}

impl Build {
    /// Whether the master counts it as holding locks now.
    fn holds_locks(&self) -> bool {
        self.holds_locks || self.granted_step.is_some()
    }
}

#[derive(Debug, Clone, Copy)]
enum StopMode {
    /// Finish the builds; cancel them at the deadline, if any.
    Graceful { deadline: Option<Instant> },
    /// Builds are being cancelled; exit once they are reported.
    Now,
}

pub struct Daemon {
    settings: Settings,
    clock: Arc<dyn Clock>,
    policy: Policy,
    inputs: Inputs,
    load_monitor: Option<LoadMonitor>,
    load_snapshot: Option<LoadSnapshot>,
    tracker: PresenceTracker,
    /// The time ahead as of the last presence change (sent with presences).
    outlook: Outlook,
    /// The presence the master was last told (or the hello carried).
    told_master: Option<Presence>,
    counters: Counters,
    builds: BTreeMap<BuildId, Build>,
    unacked: BTreeSet<BuildId>,
    spool: Spool,
    runner_settings: Arc<RunnerSettings>,
    trees: Arc<BuildTrees>,
    runner_events: mpsc::Sender<RunnerEvent>,
    to_master: LinkSender,
    hello: watch::Sender<HelloState>,
    status: watch::Sender<AgentStatus>,
    link: MasterLink,
    stop: Option<StopMode>,
    stop_requests: u32,
    /// When the first graceful stop began (the stop deadline's reason says
    /// how long the builds were given).
    stop_began: Option<Instant>,
    /// When a stopping agent with no builds gives up waiting for acks.
    ack_wait_until: Option<Instant>,
    exit: Option<Exit>,
    /// Wakes the loop at the policy's next change by the wall clock (across
    /// a suspend, and when the clock is set). `None` in tests with a fake
    /// clock, and where `timerfd` is unavailable.
    alarm: Option<WallAlarm>,
    /// The CI agent the presence drives, in place of a master (`[supervise]`).
    supervisor: Option<SupervisorLink>,
    /// When builds holding locks must stop after losing the master.
    fence: fence::LockFence,
}

impl Daemon {
    /// Builds the daemon and the channels around it. `manual` is the
    /// persisted manual state; the first evaluation happens here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        clock: Arc<dyn Clock>,
        policy: Policy,
        manual: Option<ManualOverride>,
        spool: Spool,
        runner_settings: Arc<RunnerSettings>,
        trees: Arc<BuildTrees>,
    ) -> (Daemon, Inbox, Wiring) {
        let (command_tx, command_rx) = mpsc::channel(64);
        let (link_tx, link_rx) = mpsc::unbounded_channel();
        let (runner_tx, runner_rx) = mpsc::channel(runner::EVENT_QUEUE);
        let (load_tx, load_rx) = mpsc::unbounded_channel();
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let (master_tx, master_rx) = link_queue(LINK_QUEUE);

        let now = clock.now();
        let inputs = Inputs {
            manual,
            ..Inputs::default()
        };
        let mut tracker = PresenceTracker::new();
        tracker.update(policy.evaluate(now, &inputs));
        let presence = tracker
            .current()
            .cloned()
            .unwrap_or_else(|| policy.evaluate(now, &inputs));
        let outlook = outlook::outlook(&policy, now, &inputs, settings.overrun);
        let (hello_tx, hello_rx) = watch::channel(HelloState {
            presence: presence.clone(),
            running: Vec::new(),
            outlook: outlook.clone(),
        });
        let link = MasterLink {
            url: settings.master_url.clone(),
            connected: false,
            since: Some(now),
            error: None,
        };
        let status = AgentStatus {
            worker: settings.worker.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            presence,
            manual: inputs.manual.as_ref().map(manual_request),
            stopping: false,
            builds: Vec::new(),
            master: link.clone(),
            counters: Counters::default(),
            load: None,
            outlook: Some(outlook.clone()),
            isolation: Some(trees.isolation()),
            supervised: None,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let load_monitor = policy.load_monitor();
        let daemon = Daemon {
            settings,
            clock,
            policy,
            inputs,
            load_monitor,
            load_snapshot: None,
            tracker,
            outlook,
            told_master: None,
            counters: Counters::default(),
            builds: BTreeMap::new(),
            unacked: BTreeSet::new(),
            spool,
            runner_settings,
            trees,
            runner_events: runner_tx,
            to_master: master_tx,
            hello: hello_tx,
            status: status_tx,
            link,
            stop: None,
            stop_requests: 0,
            stop_began: None,
            ack_wait_until: None,
            exit: None,
            alarm: None,
            supervisor: None,
            fence: fence::LockFence::default(),
        };
        let inbox = Inbox {
            commands: command_rx,
            link: link_rx,
            runner: runner_rx,
            load: load_rx,
            signals: signal_rx,
        };
        let wiring = Wiring {
            handle: AgentHandle {
                commands: command_tx,
                status: status_rx,
            },
            link_events: link_tx,
            load_samples: load_tx,
            signals: signal_tx,
            to_master: master_rx,
            hello: hello_rx,
        };
        (daemon, inbox, wiring)
    }

    /// Adds the wall-clock alarm (production, with the system clock).
    pub fn with_wall_alarm(mut self, alarm: WallAlarm) -> Daemon {
        self.alarm = Some(alarm);
        self
    }

    /// Drives a supervised CI agent from the presence (`[supervise]`);
    /// the daemon exits only after it has stopped.
    pub fn with_supervisor(mut self, supervisor: SupervisorLink) -> Daemon {
        self.supervisor = Some(supervisor);
        self.steer_supervisor();
        self.publish_status();
        self
    }

    /// Tells the supervised agent what the presence and a stop now want.
    fn steer_supervisor(&self) {
        let Some(supervisor) = &self.supervisor else {
            return;
        };
        let Some(presence) = self.tracker.current() else {
            return;
        };
        let stop = match self.stop {
            None => StopRequest::None,
            Some(StopMode::Graceful { deadline }) => StopRequest::Graceful { hard_at: deadline },
            Some(StopMode::Now) => StopRequest::Graceful {
                hard_at: Some(Instant::now()),
            },
        };
        supervisor.steer(presence, stop);
    }

    pub fn presence(&self) -> Presence {
        self.status.borrow().presence.clone()
    }

    /// Runs until a stop completes.
    pub async fn run(mut self, mut inbox: Inbox) -> Exit {
        loop {
            let event = self.next_event(&mut inbox).await;
            self.handle(event);
            if let Some(exit) = self.exit.take() {
                return exit;
            }
        }
    }

    async fn next_event(&mut self, inbox: &mut Inbox) -> Event {
        let (policy_wake, next_change) = self.policy_wake();
        let stop_wake = self.stop_wake();
        let fence_wake = self.fence_wake();
        let far = Instant::now() + MAX_SLEEP * 10;
        if let Some(alarm) = &mut self.alarm {
            // With no boundary ahead the alarm still catches a clock change.
            let at =
                next_change.unwrap_or_else(|| self.clock.now() + SignedDuration::from_hours(24));
            if let Err(error) = alarm.arm(at) {
                tracing::warn!(
                    "cannot arm the wall-clock alarm: {error}; re-checking every minute"
                );
                self.alarm = None;
            }
        }
        let alarm = self.alarm.as_mut();
        let has_alarm = alarm.is_some();
        let supervisor = self.supervisor.as_mut();
        let has_supervisor = supervisor.is_some();
        tokio::select! {
            biased;
            Some(signal) = inbox.signals.recv() => Event::Signal(signal),
            Some(command) = inbox.commands.recv() => Event::Control(command),
            Some(event) = inbox.runner.recv() => Event::Runner(event),
            Some(event) = inbox.link.recv() => Event::Link(event),
            Some(sample) = inbox.load.recv() => Event::Load(sample),
            () = async { if let Some(supervisor) = supervisor { supervisor.changed().await } }, if has_supervisor => Event::Supervised,
            () = tokio::time::sleep_until(stop_wake.unwrap_or(far)), if stop_wake.is_some() => Event::StopTimer,
            () = tokio::time::sleep_until(fence_wake.unwrap_or(far)), if fence_wake.is_some() => Event::LockFence,
            () = tokio::time::sleep_until(policy_wake) => Event::PolicyTimer,
            fired = async { alarm?.fired().await.err() }, if has_alarm => {
                if let Some(error) = fired {
                    tracing::warn!("the wall-clock alarm failed: {error}; re-checking every minute");
                    self.alarm = None;
                }
                Event::PolicyTimer
            }
        }
    }

    /// When to re-evaluate: the policy's next change (including the load
    /// hysteresis deadline and a manual state running out), capped so the
    /// wall clock is re-read at least every [`MAX_SLEEP`] (an hour with a
    /// wall-clock alarm); also the wall-clock instant of that change.
    fn policy_wake(&self) -> (Instant, Option<Timestamp>) {
        let max_sleep = if self.alarm.is_some() {
            MAX_SLEEP_WITH_ALARM
        } else {
            MAX_SLEEP
        };
        let now = self.clock.now();
        let mut next = self.policy.next_change(now, &self.inputs);
        if let Some(deadline) = self
            .load_monitor
            .as_ref()
            .and_then(LoadMonitor::next_deadline)
        {
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        let delay = match next {
            Some(next) => {
                let delta = next.duration_since(now);
                if delta <= SignedDuration::ZERO {
                    Duration::from_millis(1)
                } else {
                    Duration::try_from(delta)
                        .unwrap_or(max_sleep)
                        .min(max_sleep)
                }
            }
            None => max_sleep,
        };
        (Instant::now() + delay, next)
    }

    fn stop_wake(&self) -> Option<Instant> {
        let deadline = match self.stop {
            Some(StopMode::Graceful { deadline }) if !self.builds.is_empty() => deadline,
            _ => None,
        };
        match (deadline, self.ack_wait_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::PolicyTimer => self.on_policy_timer(),
            Event::Load(sample) => self.on_load(sample),
            Event::Control(command) => self.on_control(command),
            Event::Link(event) => self.on_link(event),
            Event::Runner(event) => self.on_runner(event),
            Event::Signal(signal) => self.on_signal(signal),
            Event::StopTimer => self.on_stop_timer(),
            Event::LockFence => self.on_lock_fence(),
            Event::Supervised => self.maybe_finish_stop(),
        }
        self.publish_status();
    }

    /// Sends a frame when the link is up. While it is down nothing is
    /// queued: the hello and the spool resend cover what matters (and a
    /// dropped build frame gives its credit back).
    fn send(&self, frame: impl Into<Outgoing>) {
        if self.link.connected {
            self.to_master.send(frame);
        }
    }

    fn publish_status(&mut self) {
        let presence = self
            .tracker
            .current()
            .cloned()
            .unwrap_or_else(|| self.presence());
        let status = AgentStatus {
            worker: self.settings.worker.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            presence,
            manual: self.inputs.manual.as_ref().map(manual_request),
            stopping: self.stop.is_some(),
            builds: self
                .builds
                .values()
                .map(|build| build.status.clone())
                .collect(),
            master: self.link.clone(),
            counters: Counters {
                builds_run: self.counters.builds_run,
                builds_failed: self.counters.builds_failed,
                presence_changes: self.counters.presence_changes,
            },
            load: self.load_snapshot.clone(),
            outlook: Some(self.outlook.clone()),
            isolation: Some(self.trees.isolation()),
            supervised: self.supervisor.as_ref().map(SupervisorLink::status),
        };
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }
}

pub fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!("cannot notify systemd: {error}");
    }
}

/// A duration in seconds for people, to the tenth: `2`, `0.3`, `1.5` (a
/// deadline of 2 s measured a moment later still reads `2`).
fn seconds_text(duration: Duration) -> String {
    let tenths = (duration.as_secs_f64() * 10.0).round();
    format!("{}", tenths / 10.0)
}

#[cfg(test)]
mod tests;
