//! The daemon's one event loop: every input (policy boundaries, load samples,
//! control commands, master frames, link changes, build progress, signals)
//! arrives as an [`Event`], is handled in order, and the resulting presence
//! and status are pushed — to the master when the presence changes, to the
//! control plane on a `watch` channel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{
    ForeignLoadSample, Inputs, LoadMonitor, LoadVerdict, ManualOverride, MasterOverride, Policy,
    Presence, PresenceChange, PresenceTracker, Source,
};
use nightshift_proto::wire::{AgentMessage, BuildId, BuildResult, MasterMessage, Outlook};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::alarm::WallAlarm;
use super::clock::Clock;
use super::link::{HelloState, LinkEvent};
use super::load::{BuildTrees, LoadMeasurement};
use super::manual;
use super::outgoing::{LINK_QUEUE, LinkReceiver, LinkSender, Outgoing, link_queue};
use super::runner::{self, BuildControl, BuildRequest, RunnerEvent, RunnerSettings};
use super::spool::Spool;
use crate::handle::{
    AgentHandle, AgentStatus, ControlCommand, Counters, LoadSnapshot, ManualRequest, MasterLink,
    RunningBuild,
};
use crate::outlook;
use crate::supervise::{StopRequest, SupervisorLink};

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
    /// Cancelled because this worker is stopping: hand it back (re-queue).
    GiveBack,
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
            Event::Supervised => self.maybe_finish_stop(),
        }
        self.publish_status();
    }

    // ---- presence ----------------------------------------------------

    fn on_policy_timer(&mut self) {
        let now = self.clock.now();
        if let Some(manual) = &self.inputs.manual
            && !manual.is_active(now)
        {
            tracing::info!(
                "the manual state `{}` ran out; back to the policies",
                manual.state
            );
            self.inputs.manual = None;
            if let Err(error) = manual::save(&self.settings.state_dir, None) {
                tracing::warn!("cannot remove the expired manual state: {error}");
            }
        }
        if let Some(monitor) = &mut self.load_monitor
            && self.inputs.load.is_some()
        {
            self.inputs.load = Some(monitor.verdict_at(now));
        }
        self.reevaluate();
    }

    fn on_load(&mut self, sample: LoadMeasurement) {
        self.load_snapshot = Some(LoadSnapshot {
            at: sample.at,
            load1: sample.load1,
            cpu_percent: sample.cpu_percent,
            build_cpu_percent: sample.build_cpu_percent,
        });
        let Some(monitor) = &mut self.load_monitor else {
            return;
        };
        let verdict: LoadVerdict = monitor.observe(ForeignLoadSample {
            at: sample.at,
            load1: sample.load1,
            cpu_percent: sample.cpu_percent,
        });
        tracing::debug!(
            load1 = sample.load1,
            cpu = sample.cpu_percent,
            raw_load1 = sample.raw_load1,
            raw_cpu = sample.raw_cpu_percent,
            builds_cpu = sample.build_cpu_percent,
            high = verdict.high,
            "load sample"
        );
        self.inputs.load = Some(verdict);
        self.reevaluate();
    }

    /// Evaluates the policy now; pushes the presence to the master when its
    /// state, source or known end changed.
    fn reevaluate(&mut self) {
        let now = self.clock.now();
        let fresh = self.policy.evaluate(now, &self.inputs);
        let change = self.tracker.update(fresh);
        let Some(presence) = self.tracker.current().cloned() else {
            return;
        };
        if change == PresenceChange::State {
            self.counters.presence_changes += 1;
            tracing::info!(
                "presence: {} ({}) — {}",
                presence.state,
                presence.source,
                presence.reason
            );
            notify_systemd(&[sd_notify::NotifyState::Status(&format!(
                "{} ({}): {}",
                presence.state, presence.source, presence.reason
            ))]);
        }
        if self.hello.borrow().presence != presence {
            self.outlook = outlook::outlook(&self.policy, now, &self.inputs, self.settings.overrun);
        }
        let outlook = self.outlook.clone();
        self.hello.send_if_modified(|hello| {
            if hello.presence == presence && hello.outlook == outlook {
                false
            } else {
                hello.presence = presence.clone();
                hello.outlook = outlook.clone();
                true
            }
        });
        if self.link.connected && self.master_should_hear(&presence) {
            self.told_master = Some(presence.clone());
            self.send(AgentMessage::Presence {
                presence,
                outlook: Some(outlook),
            });
        }
        self.steer_supervisor();
    }

    /// Whether `presence` differs from what the master knows in a way it
    /// cares about: state, source, or the known end. A reason that only
    /// re-words a load figure is not worth a frame.
    fn master_should_hear(&self, presence: &Presence) -> bool {
        match &self.told_master {
            None => true,
            Some(told) => {
                told.state != presence.state
                    || told.source != presence.source
                    || told.until != presence.until
                    || (told.reason != presence.reason && presence.source != Source::Load)
            }
        }
    }

    // ---- control -----------------------------------------------------

    fn on_control(&mut self, command: ControlCommand) {
        match command {
            ControlCommand::SetManual { manual, reply } => {
                let result = self.set_manual(manual);
                let _ = reply.send(result);
            }
            ControlCommand::Stop {
                graceful,
                deadline,
                reply,
            } => {
                let result = if graceful {
                    match deadline.map(Duration::try_from) {
                        Some(Err(_)) => Err(format!(
                            "the deadline must not be negative (got {deadline:?})"
                        )),
                        Some(Ok(deadline)) => {
                            self.begin_stop(Some(deadline), "`worker stop --graceful`");
                            Ok(())
                        }
                        None => {
                            self.begin_stop(None, "`worker stop --graceful`");
                            Ok(())
                        }
                    }
                } else {
                    self.stop_now("`worker stop`");
                    Ok(())
                };
                let _ = reply.send(result);
            }
        }
    }

    fn set_manual(&mut self, request: Option<ManualRequest>) -> Result<Presence, String> {
        let now = self.clock.now();
        let manual = match request {
            None => None,
            Some(request) => {
                if request.until.is_some_and(|until| until <= now) {
                    return Err(format!(
                        "`until` ({}) is not in the future",
                        request.until.map(|t| t.to_string()).unwrap_or_default()
                    ));
                }
                if request.state == nightshift_policy::PresenceState::Offline {
                    return Err(
                        "a worker cannot set itself `offline`; use `away` (or `worker stop`)"
                            .to_owned(),
                    );
                }
                Some(ManualOverride {
                    state: request.state,
                    reason: request.reason.filter(|reason| !reason.trim().is_empty()),
                    set_at: now,
                    until: request.until,
                })
            }
        };
        manual::save(&self.settings.state_dir, manual.as_ref())
            .map_err(|error| format!("cannot save the manual state, nothing changed: {error}"))?;
        match &manual {
            Some(manual) => tracing::info!(
                "manual state set: {}{}",
                manual.state,
                manual
                    .until
                    .map(|until| format!(" until {until}"))
                    .unwrap_or_default()
            ),
            None => tracing::info!("manual state cleared: back to the policies"),
        }
        self.inputs.manual = manual;
        self.reevaluate();
        Ok(self
            .tracker
            .current()
            .cloned()
            .unwrap_or_else(|| self.presence()))
    }

    // ---- stopping ----------------------------------------------------

    fn on_signal(&mut self, signal: SignalKind) {
        let name = match signal {
            SignalKind::Terminate => "SIGTERM",
            SignalKind::Interrupt => "SIGINT",
        };
        if self.stop.is_some() {
            self.stop_now(&format!("a second {name}"));
        } else {
            self.begin_stop(None, name);
        }
    }

    fn begin_stop(&mut self, deadline: Option<Duration>, why: &str) {
        self.stop_requests += 1;
        if let Some(StopMode::Now) = self.stop {
            return;
        }
        let now = Instant::now();
        self.stop_began.get_or_insert(now);
        let deadline = deadline.map(|deadline| now + deadline);
        let deadline = match (self.stop, deadline) {
            // A later request can only bring the deadline closer.
            (
                Some(StopMode::Graceful {
                    deadline: Some(old),
                }),
                Some(new),
            ) => Some(old.min(new)),
            (
                Some(StopMode::Graceful {
                    deadline: Some(old),
                }),
                None,
            ) => Some(old),
            (_, new) => new,
        };
        tracing::info!(
            "stopping gracefully ({why}): away, finishing {} running build(s){}",
            self.builds.len(),
            match deadline {
                Some(deadline) => format!(
                    ", cancelling them in {} s",
                    seconds_text(deadline.saturating_duration_since(now))
                ),
                None => String::new(),
            }
        );
        self.stop = Some(StopMode::Graceful { deadline });
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        self.inputs.stopping = true;
        self.reevaluate();
        self.maybe_finish_stop();
    }

    fn stop_now(&mut self, why: &str) {
        tracing::info!(
            "stopping now ({why}): cancelling {} running build(s)",
            self.builds.len()
        );
        self.stop = Some(StopMode::Now);
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        self.inputs.stopping = true;
        self.reevaluate();
        for build in self.builds.values_mut() {
            build.disposition = Disposition::GiveBack;
            build
                .control
                .cancel("the worker is stopping; the master re-queues the build");
        }
        self.maybe_finish_stop();
    }

    fn on_stop_timer(&mut self) {
        if let Some(StopMode::Graceful {
            deadline: Some(deadline),
        }) = self.stop
            && deadline <= Instant::now()
            && !self.builds.is_empty()
        {
            tracing::info!(
                "stop deadline reached: cancelling {} build(s) for the master to re-queue",
                self.builds.len()
            );
            self.stop = Some(StopMode::Now);
            let given = self.stop_began.map_or(Duration::ZERO, |began| {
                deadline.saturating_duration_since(began)
            });
            let reason = format!("its stop deadline of {} s ran out", seconds_text(given));
            for build in self.builds.values_mut() {
                // It ran: its result says so (cancelled, with the reason),
                // and the master re-queues it as a retry.
                build.disposition = Disposition::Report;
                build.control.cancel(&reason);
            }
        }
        if self
            .ack_wait_until
            .is_some_and(|until| until <= Instant::now())
        {
            tracing::warn!(
                "the master did not acknowledge {} result(s); they stay spooled for the next start",
                self.unacked.len()
            );
            self.finish_stop();
        }
    }

    /// Exits when stopping, no build runs, and every result is acknowledged
    /// (or the master is unreachable, or the wait for acks ran out).
    fn maybe_finish_stop(&mut self) {
        if self.stop.is_none() || !self.builds.is_empty() || self.exit.is_some() {
            return;
        }
        if let Some(supervisor) = &self.supervisor {
            // The deadline, if any, travelled with the stop request: the
            // supervisor sends the hard signal itself.
            self.steer_supervisor();
            if !supervisor.is_idle() {
                return;
            }
        }
        if self.unacked.is_empty() || !self.link.connected {
            self.finish_stop();
        } else if self.ack_wait_until.is_none() {
            self.ack_wait_until = Some(Instant::now() + ACK_WAIT);
        }
    }

    fn finish_stop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        let reason = if self.stop_requests > 0 || self.stop.is_some() {
            "the worker stopped".to_owned()
        } else {
            "the worker is shutting down".to_owned()
        };
        // Sent even while disconnected: the link task ends on a goodbye.
        let _ = self.to_master.send(AgentMessage::Goodbye {
            reason: reason.clone(),
        });
        tracing::info!("all builds done; exiting");
        self.exit = Some(Exit::Stopped(reason));
    }

    // ---- master link -------------------------------------------------

    fn on_link(&mut self, event: LinkEvent) {
        let now = self.clock.now();
        match event {
            LinkEvent::Up { presence, cancel } => {
                tracing::info!("connected to the master at {}", self.settings.master_url);
                self.link = MasterLink {
                    url: self.settings.master_url.clone(),
                    connected: true,
                    since: Some(now),
                    error: None,
                };
                self.told_master = Some(presence);
                let current = self.tracker.current().cloned();
                if let Some(current) = current
                    && self.master_should_hear(&current)
                {
                    self.told_master = Some(current.clone());
                    self.send(AgentMessage::Presence {
                        presence: current,
                        outlook: Some(self.outlook.clone()),
                    });
                }
                for build_id in cancel {
                    if let Some(build) = self.builds.get_mut(&build_id) {
                        build.disposition = Disposition::Drop;
                        tracing::info!(
                            "the master no longer expects build {build_id}; cancelling it"
                        );
                        build
                            .control
                            .cancel("the master re-queued this build while the worker was away");
                    }
                }
                // Steps still waiting for their locks ask again: the master
                // answers at once when it granted them meanwhile.
                let waiting: Vec<(BuildId, u32)> = self
                    .builds
                    .iter()
                    .filter(|(_, build)| !matches!(build.disposition, Disposition::Drop))
                    .filter_map(|(id, build)| build.awaiting_grant.map(|step| (*id, step)))
                    .collect();
                for (build_id, step) in waiting {
                    self.send(AgentMessage::StepWaiting { build_id, step });
                }
                self.resend_spooled();
            }
            LinkEvent::Down { error } => {
                if self.link.connected {
                    tracing::warn!("lost the master: {error}; reconnecting");
                } else {
                    tracing::debug!("cannot reach the master: {error}");
                }
                self.link_down(now, error);
            }
            LinkEvent::Refused { reason } => {
                tracing::error!(
                    "the master refused this worker: {reason} (check `name` and the token in worker.toml); retrying"
                );
                self.link_down(now, format!("refused by the master: {reason}"));
            }
            LinkEvent::Frame(message) => self.on_master(message),
        }
    }

    fn link_down(&mut self, now: Timestamp, error: String) {
        let changed = self.link.connected;
        self.link.connected = false;
        if changed {
            self.link.since = Some(now);
        }
        self.link.error = Some(error);
        // Nobody to wait for acks from.
        self.maybe_finish_stop();
    }

    fn resend_spooled(&mut self) {
        let (results, problems) = self.spool.load_all();
        for problem in problems {
            tracing::error!("a spooled result is unreadable and was set aside: {problem}");
        }
        for result in results {
            if self.builds.contains_key(&result.build_id) {
                continue;
            }
            self.unacked.insert(result.build_id);
            self.send(AgentMessage::BuildFinished { result });
        }
    }

    fn on_master(&mut self, message: MasterMessage) {
        match message {
            MasterMessage::StartBuild {
                build_id,
                builder,
                steps,
                properties,
                source,
            } => self.start_build(BuildRequest {
                build_id,
                builder,
                steps,
                properties,
                source,
            }),
            MasterMessage::StepGranted { build_id, step } => match self.builds.get_mut(&build_id) {
                Some(build) => {
                    if build.awaiting_grant == Some(step) {
                        build.awaiting_grant = None;
                    }
                    build.control.grant(step);
                }
                None => tracing::debug!("grant for build {build_id}, which is not running here"),
            },
            MasterMessage::CancelBuild { build_id, reason } => match self.builds.get(&build_id) {
                Some(build) => {
                    tracing::info!("the master cancels build {build_id}: {reason}");
                    build.control.cancel(reason);
                }
                None => tracing::debug!("cancel for build {build_id}, which is not running here"),
            },
            MasterMessage::ResultStored { build_id } => {
                self.unacked.remove(&build_id);
                if let Err(error) = self.spool.remove(build_id) {
                    tracing::warn!("cannot remove the spooled result of build {build_id}: {error}");
                }
                self.maybe_finish_stop();
            }
            MasterMessage::ResultRefused { build_id, reason } => {
                // Re-sending it on every reconnect would only be refused again.
                tracing::warn!(
                    "the master refused the result of build {build_id} ({reason}); \
                     dropped from the spool"
                );
                self.unacked.remove(&build_id);
                if let Err(error) = self.spool.remove(build_id) {
                    tracing::warn!("cannot remove the spooled result of build {build_id}: {error}");
                }
                self.maybe_finish_stop();
            }
            MasterMessage::Released { reason } => {
                if self.stop.is_some() && self.builds.is_empty() {
                    tracing::info!("the master released this worker: {reason}");
                    self.finish_stop();
                } else {
                    tracing::debug!("the master released this worker: {reason}");
                }
            }
            MasterMessage::MasterOverride { presence } => {
                self.inputs.master = presence.map(|presence| MasterOverride {
                    state: presence.state,
                    reason: presence.reason,
                    until: presence.until,
                });
                self.reevaluate();
            }
            MasterMessage::Welcome { .. }
            | MasterMessage::Refused { .. }
            | MasterMessage::Ping { .. }
            | MasterMessage::Pong { .. } => {}
        }
    }

    // ---- builds ------------------------------------------------------

    fn start_build(&mut self, request: BuildRequest) {
        let build_id = request.build_id;
        if self.builds.contains_key(&build_id) {
            // The master re-sent a build we run: it is ours already.
            self.send(AgentMessage::BuildAccepted { build_id });
            return;
        }
        let presence = self
            .tracker
            .current()
            .cloned()
            .unwrap_or_else(|| self.presence());
        let refusal = if self.stop.is_some() {
            Some("the worker is stopping".to_owned())
        } else if !presence.state.takes_builds() {
            Some(format!(
                "the worker is {}: {}",
                presence.state, presence.reason
            ))
        } else if self.builds.len() >= self.settings.max_builds as usize {
            Some(format!(
                "the worker is full ({} of {} builds running)",
                self.builds.len(),
                self.settings.max_builds
            ))
        } else if self.unacked.contains(&build_id) {
            Some(format!(
                "build {build_id} already ran here; its result is being delivered"
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::info!("refusing build {build_id}: {reason}");
            self.send(AgentMessage::BuildRefused { build_id, reason });
            return;
        }
        tracing::info!(
            "starting build {build_id} of `{}` ({} steps)",
            request.builder,
            request.steps.len()
        );
        self.send(AgentMessage::BuildAccepted { build_id });
        let status = RunningBuild {
            build_id,
            builder: request.builder.clone(),
            started_at: self.clock.now(),
            step: 0,
            step_name: request
                .steps
                .first()
                .map(|step| step.name.clone())
                .unwrap_or_default(),
            tail: String::new(),
        };
        let step_names = request.steps.iter().map(|step| step.name.clone()).collect();
        let control = runner::spawn(
            request,
            self.runner_settings.clone(),
            self.trees.clone(),
            self.clock.clone(),
            self.runner_events.clone(),
        );
        self.builds.insert(
            build_id,
            Build {
                control,
                disposition: Disposition::Report,
                status,
                tail: Vec::new(),
                step_names,
                awaiting_grant: None,
            },
        );
        self.update_hello_running();
    }

    fn update_hello_running(&mut self) {
        let running: Vec<BuildId> = self.builds.keys().copied().collect();
        self.hello.send_if_modified(|hello| {
            if hello.running == running {
                false
            } else {
                hello.running = running;
                true
            }
        });
    }

    fn on_runner(&mut self, event: RunnerEvent) {
        match event {
            RunnerEvent::StepWaiting {
                build_id,
                step,
                credit,
            } => {
                self.set_step(build_id, step);
                if let Some(build) = self.builds.get_mut(&build_id) {
                    build.awaiting_grant = Some(step);
                }
                self.send(Outgoing {
                    message: AgentMessage::StepWaiting { build_id, step },
                    credit,
                });
            }
            RunnerEvent::StepStarted {
                build_id,
                step,
                at,
                credit,
            } => {
                self.set_step(build_id, step);
                if let Some(build) = self.builds.get_mut(&build_id) {
                    build.awaiting_grant = None;
                }
                self.send(Outgoing {
                    message: AgentMessage::StepStarted { build_id, step, at },
                    credit,
                });
            }
            RunnerEvent::Output {
                build_id,
                step,
                data,
                credit,
            } => {
                if let Some(build) = self.builds.get_mut(&build_id) {
                    push_tail(&mut build.tail, &data);
                    build.status.tail = build.tail.join("");
                }
                self.send(Outgoing {
                    message: AgentMessage::Output {
                        build_id,
                        step,
                        data,
                    },
                    credit,
                });
            }
            RunnerEvent::StepFinished {
                build_id,
                result,
                credit,
            } => {
                self.send(Outgoing {
                    message: AgentMessage::StepFinished { build_id, result },
                    credit,
                });
            }
            RunnerEvent::Finished { result } => self.build_finished(result),
        }
    }

    fn set_step(&mut self, build_id: BuildId, step: u32) {
        if let Some(build) = self.builds.get_mut(&build_id) {
            build.status.step = step;
            build.status.step_name = build
                .step_names
                .get(step as usize)
                .cloned()
                .unwrap_or_default();
        }
    }

    fn build_finished(&mut self, result: BuildResult) {
        let build_id = result.build_id;
        let disposition = self
            .builds
            .remove(&build_id)
            .map_or(Disposition::Report, |build| build.disposition);
        self.update_hello_running();
        self.counters.builds_run += 1;
        if result.outcome != nightshift_proto::wire::Outcome::Success {
            self.counters.builds_failed += 1;
        }
        let how = result
            .reason
            .as_deref()
            .map(|reason| format!(" ({reason})"))
            .unwrap_or_default();
        let cancelled = result.outcome == nightshift_proto::wire::Outcome::Cancelled;
        match disposition {
            Disposition::GiveBack if cancelled => {
                // The build did not run to its end because this worker is
                // leaving: hand it back for the master to re-queue rather
                // than report it as a finished (cancelled) build.
                tracing::info!(
                    "build {build_id} finished: {}{how}; handed back to the master",
                    result.outcome
                );
                self.send(AgentMessage::BuildRefused {
                    build_id,
                    reason: result
                        .reason
                        .unwrap_or_else(|| "the worker is stopping".to_owned()),
                });
            }
            Disposition::Drop if cancelled => {
                tracing::info!(
                    "build {build_id} finished: {}{how}; the master had moved it elsewhere",
                    result.outcome
                );
            }
            _ => {
                // On disk before anyone hears of it, so a crash cannot lose it.
                if let Err(error) = self.spool.store(&result) {
                    tracing::error!(
                        "cannot spool the result of build {build_id}: {error}; sending it without a copy on disk"
                    );
                }
                tracing::info!("build {build_id} finished: {}{how}", result.outcome);
                self.unacked.insert(build_id);
                self.send(AgentMessage::BuildFinished { result });
            }
        }
        self.maybe_finish_stop();
    }

    /// Sends a frame when the link is up. While it is down nothing is
    /// queued: the hello and the spool resend cover what matters.
    /// Queues a frame for the master; dropped while the link is down (the
    /// next hello and the results re-sent after it bring the master up to
    /// date), which also gives back a build frame's credit.
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

fn manual_request(manual: &ManualOverride) -> ManualRequest {
    ManualRequest {
        state: manual.state,
        until: manual.until,
        reason: manual.reason.clone(),
    }
}

/// Keeps the last [`TAIL_LINES`] lines of a build's output.
fn push_tail(tail: &mut Vec<String>, data: &str) {
    for piece in data.split_inclusive('\n') {
        match tail.last_mut() {
            Some(last) if !last.ends_with('\n') => last.push_str(piece),
            _ => tail.push(piece.to_owned()),
        }
    }
    if tail.len() > TAIL_LINES {
        let extra = tail.len() - TAIL_LINES;
        tail.drain(..extra);
    }
    // A runaway line without newlines must not grow without bound.
    if let Some(last) = tail.last_mut()
        && last.len() > 4096
    {
        let mut cut = last.len() - 4096;
        while !last.is_char_boundary(cut) {
            cut += 1;
        }
        last.drain(..cut);
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
mod tests {
    use super::*;
    use crate::daemon::clock::{FakeClock, SystemClock};
    use nightshift_policy::{AvailabilityConfig, PresenceState};
    use nightshift_proto::wire::{Outcome, StepSpec};
    use tokio::sync::oneshot;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
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
            let presence = self.wiring.hello.borrow().presence.clone();
            self.wiring
                .link_events
                .send(LinkEvent::Up {
                    presence,
                    cancel: Vec::new(),
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

        fn start_build(&self, build_id: BuildId, command: &str) {
            self.master_sends(MasterMessage::StartBuild {
                build_id,
                builder: "demo".into(),
                steps: vec![StepSpec {
                    name: "only".into(),
                    command: command.into(),
                    timeout_secs: None,
                    env: BTreeMap::new(),
                    workdir: None,
                    needs_grant: false,
                    checkout: false,
                }],
                properties: BTreeMap::new(),
                source: None,
            });
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
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T18:30:00Z")));
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
    async fn a_wall_clock_jump_is_noticed_within_a_minute() {
        // A suspended laptop: tokio's clock stood still while the wall
        // clock moved past the boundary.
        #[derive(Debug)]
        struct Jumping(FakeClock, std::sync::atomic::AtomicBool);
        impl Clock for Jumping {
            fn now(&self) -> Timestamp {
                let now = self.0.now();
                if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                    now + SignedDuration::from_hours(3)
                } else {
                    now
                }
            }
        }
        let jumping = Arc::new(Jumping(
            FakeClock::starting_at(at("2026-11-23T17:00:00Z")),
            false.into(),
        ));
        let mut fixture = start(NIGHTS, jumping.clone(), 1);
        fixture.link_up().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        jumping.1.store(true, std::sync::atomic::Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let presence = fixture.next_presence().await;
        assert_eq!(presence.state, PresenceState::Available);
        assert!(started.elapsed() <= MAX_SLEEP, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_manual_state_is_pushed_persisted_and_runs_out_by_itself() {
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T12:00:00Z")));
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
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T12:00:00Z")));
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
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T12:00:00Z")));
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
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T12:00:00Z")));
        let mut fixture = start(NIGHTS, clock, 1);
        fixture.link_up().await;
        fixture.start_build(5, "true");
        match fixture.next_to_master().await {
            AgentMessage::BuildRefused { build_id, reason } => {
                assert_eq!(build_id, 5);
                assert!(reason.contains("away"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
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
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T18:59:00Z")));
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
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::starting_at(at("2026-11-23T12:00:00Z")));
        let mut fixture = start(ALWAYS, clock, 1);
        fixture.link_up().await;
        fixture.wiring.signals.send(SignalKind::Terminate).unwrap();
        let presence = fixture.next_presence().await;
        assert_eq!(presence.state, PresenceState::Away);
        assert_eq!(presence.source, Source::Stopping);
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::Goodbye { .. }
        ));
        assert!(matches!(fixture.exit().await.0, Exit::Stopped(_)));
    }

    // Builds run real processes, so these use the real clock.

    #[tokio::test]
    async fn a_graceful_stop_finishes_the_running_build_refuses_new_ones_then_exits() {
        let mut fixture = start(ALWAYS, Arc::new(SystemClock), 2);
        fixture.link_up().await;
        fixture.start_build(1, "sleep 1; echo done");
        assert_eq!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { build_id: 1 }
        );
        assert_eq!(fixture.wiring.hello.borrow().running, vec![1]);
        fixture.stop(true, None).await;
        assert_eq!(fixture.next_presence().await.source, Source::Stopping);
        fixture.start_build(2, "true");
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildRefused { build_id: 2, .. }
        ));
        let result = match fixture.next_to_master().await {
            AgentMessage::BuildFinished { result } => result,
            other => panic!("expected the result, got {other:?}"),
        };
        assert_eq!((result.build_id, result.outcome), (1, Outcome::Success));
        assert_eq!(result.log, "done\n");
        assert!(fixture.state.path().join("results/1.json").exists());
        // Waits for the master to store the result before leaving.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!fixture.task.is_finished());
        fixture.master_sends(MasterMessage::ResultStored { build_id: 1 });
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::Goodbye { .. }
        ));
        let (exit, state) = fixture.exit().await;
        assert!(matches!(exit, Exit::Stopped(_)));
        assert!(!state.path().join("results/1.json").exists());
    }

    #[tokio::test]
    async fn a_second_sigterm_cancels_the_build_at_once_and_hands_it_back() {
        let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
        fixture.link_up().await;
        fixture.start_build(1, "sleep 300");
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { .. }
        ));
        fixture.wiring.signals.send(SignalKind::Terminate).unwrap();
        assert_eq!(fixture.next_presence().await.source, Source::Stopping);
        fixture.wiring.signals.send(SignalKind::Terminate).unwrap();
        match fixture.next_to_master().await {
            AgentMessage::BuildRefused { build_id, reason } => {
                assert_eq!(build_id, 1);
                assert!(reason.contains("re-queues"), "{reason}");
            }
            other => panic!("expected the build handed back, got {other:?}"),
        }
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::Goodbye { .. }
        ));
        let (_, state) = fixture.exit().await;
        assert!(!state.path().join("results/1.json").exists());
    }

    #[tokio::test]
    async fn at_the_stop_deadline_the_build_is_reported_cancelled_with_the_deadline() {
        // Issue 8: the build ran, so it is not "refused": its result says it
        // was cancelled and why, and the master counts a retry.
        let mut fixture = start(ALWAYS, Arc::new(SystemClock), 1);
        fixture.link_up().await;
        fixture.start_build(1, "sleep 300");
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { .. }
        ));
        fixture
            .stop(true, Some(SignedDuration::from_millis(300)))
            .await;
        assert_eq!(fixture.next_presence().await.source, Source::Stopping);
        match fixture.next_to_master().await {
            AgentMessage::BuildFinished { result } => {
                assert_eq!(result.build_id, 1);
                assert_eq!(result.outcome, nightshift_proto::wire::Outcome::Cancelled);
                assert_eq!(
                    result.reason.as_deref(),
                    Some("its stop deadline of 0.3 s ran out")
                );
            }
            other => panic!("expected the cancelled result, got {other:?}"),
        }
        fixture.master_sends(MasterMessage::ResultStored { build_id: 1 });
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::Goodbye { .. }
        ));
        let (_, state) = fixture.exit().await;
        assert!(!state.path().join("results/1.json").exists());
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
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { .. }
        ));
        fixture
            .wiring
            .link_events
            .send(LinkEvent::Down {
                error: "connection reset".into(),
            })
            .unwrap();
        let mut status = fixture.wiring.handle.status.clone();
        tokio::time::timeout(
            Duration::from_secs(60),
            status.wait_for(|status| status.counters.builds_run == 1),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(fixture.state.path().join("results/9.json").exists());
        while let Ok(Outgoing { message, .. }) = fixture.wiring.to_master.try_recv() {
            assert!(
                !matches!(message, AgentMessage::BuildFinished { .. }),
                "sent while down"
            );
        }
        fixture.link_up().await;
        match fixture.next_to_master().await {
            AgentMessage::BuildFinished { result } => {
                assert_eq!(result.build_id, 9);
                assert_eq!(result.log, "finished offline\n");
            }
            other => panic!("expected the spooled result, got {other:?}"),
        }
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
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { build_id: 9 }
        ));
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
        fixture
            .wiring
            .link_events
            .send(LinkEvent::Down {
                error: "connection reset".into(),
            })
            .unwrap();
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
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { build_id: 1 }
        ));
        fixture.start_build(2, "true");
        match fixture.next_to_master().await {
            AgentMessage::BuildRefused { build_id, reason } => {
                assert_eq!(build_id, 2);
                assert!(reason.contains("full"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let presence = fixture.wiring.hello.borrow().presence.clone();
        fixture
            .wiring
            .link_events
            .send(LinkEvent::Up {
                presence,
                cancel: vec![1],
            })
            .unwrap();
        let mut status = fixture.wiring.handle.status.clone();
        tokio::time::timeout(
            Duration::from_secs(60),
            status.wait_for(|status| status.builds.is_empty() && status.counters.builds_run == 1),
        )
        .await
        .unwrap()
        .unwrap();
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
        fixture.master_sends(MasterMessage::StartBuild {
            build_id: 4,
            builder: "demo".into(),
            steps: vec![StepSpec {
                name: "locked".into(),
                command: "echo compiled".into(),
                timeout_secs: None,
                env: BTreeMap::new(),
                workdir: None,
                needs_grant: true,
                checkout: false,
            }],
            properties: BTreeMap::new(),
            source: None,
        });
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::BuildAccepted { build_id: 4 }
        ));
        assert!(matches!(
            fixture.next_to_master().await,
            AgentMessage::StepWaiting {
                build_id: 4,
                step: 0
            }
        ));
        // The link drops; the master's grant (sent meanwhile) is lost.
        fixture
            .wiring
            .link_events
            .send(LinkEvent::Down {
                error: "connection reset".into(),
            })
            .unwrap();
        fixture.link_up().await;
        assert!(
            matches!(
                fixture.next_to_master().await,
                AgentMessage::StepWaiting {
                    build_id: 4,
                    step: 0
                }
            ),
            "the waiting step asks again after the reconnect"
        );
        fixture.master_sends(MasterMessage::StepGranted {
            build_id: 4,
            step: 0,
        });
        match fixture.next_to_master().await {
            AgentMessage::BuildFinished { result } => {
                assert_eq!(result.build_id, 4);
                assert_eq!(result.outcome, nightshift_proto::wire::Outcome::Success);
            }
            other => panic!("expected the result, got {other:?}"),
        }
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
}
