//! [`LatentPool`]: the per-worker latent state machine the scheduler
//! drives, synchronous and clock-free.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use tokio::time::Instant;

use super::provider::build_kind;
use super::settings::backoff_after;
use super::tokens::new_token;
use super::{
    Health, InstanceInfo, LatentAction, LatentChoice, LatentEvent, LatentSettings, LatentState,
    LatentStatus, MasterAccess, NOT_NOW_RETRY, NotStartable, Now, StartOutcome, TimerKind,
};

#[derive(Debug)]
struct Slot {
    settings: LatentSettings,
    provider_kind: &'static str,
    state: LatentState,
    reason: String,
    since: Timestamp,
    /// Bumped whenever a state change makes armed timers meaningless.
    generation: u64,
    /// Identifies one start/stop pair; late answers for older ones are
    /// ignored.
    attempt: u64,
    token: Option<String>,
    /// The agent of the current instance is connected.
    connected: bool,
    /// The provider has answered `Started` for the current attempt.
    start_confirmed: bool,
    running_builds: u32,
    consecutive_failures: u32,
    retry_at: Option<(Instant, Timestamp, String)>,
    /// Stop once idle: the worker turned away, or was removed by reconfig.
    stop_when_idle: Option<String>,
    removed: bool,
}

/// Every latent worker of the master and the master-wide `max_starting`.
#[derive(Debug)]
pub struct LatentPool {
    slots: BTreeMap<String, Slot>,
    max_starting: usize,
    master: MasterAccess,
}

impl LatentPool {
    pub fn new(master: MasterAccess, max_starting: usize) -> LatentPool {
        LatentPool {
            slots: BTreeMap::new(),
            max_starting,
            master,
        }
    }

    /// Adds a latent worker, or updates its settings (reconfig: the new ones
    /// apply to the next start; a running instance keeps going).
    pub fn configure(&mut self, worker: &str, settings: LatentSettings, now: Now) {
        let provider_kind = build_kind(&settings.provider);
        match self.slots.get_mut(worker) {
            Some(slot) => {
                slot.settings = settings;
                slot.provider_kind = provider_kind;
                slot.removed = false;
                if slot.stop_when_idle.as_deref() == Some(REMOVED_REASON) {
                    slot.stop_when_idle = None;
                }
            }
            None => {
                self.slots.insert(
                    worker.to_owned(),
                    Slot {
                        settings,
                        provider_kind,
                        state: LatentState::Stopped,
                        reason: "no build needs it".into(),
                        since: now.wall,
                        generation: 0,
                        attempt: 0,
                        token: None,
                        connected: false,
                        start_confirmed: false,
                        running_builds: 0,
                        consecutive_failures: 0,
                        retry_at: None,
                        stop_when_idle: None,
                        removed: false,
                    },
                );
            }
        }
    }

    /// Updates the master-wide settings (reconfig).
    pub fn set_master(&mut self, master: MasterAccess, max_starting: usize) {
        self.master = master;
        self.max_starting = max_starting;
    }

    /// Removes a latent worker (reconfig): at once when stopped, otherwise it
    /// is drained: stopped after its running builds, then forgotten.
    pub fn remove(&mut self, worker: &str, now: Now) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if slot.state == LatentState::Stopped {
            self.slots.remove(worker);
            return Vec::new();
        }
        slot.removed = true;
        slot.stop_when_idle = Some(REMOVED_REASON.into());
        self.stop_if_idle(worker, now)
    }

    pub fn is_latent(&self, worker: &str) -> bool {
        self.slots.contains_key(worker)
    }

    pub fn status(&self, worker: &str) -> Option<LatentStatus> {
        let slot = self.slots.get(worker)?;
        Some(LatentStatus {
            state: slot.state,
            reason: slot.reason.clone(),
            since: slot.since,
            retry_after: slot.retry_at.as_ref().map(|(_, wall, _)| *wall),
            provider: slot.provider_kind,
        })
    }

    pub fn state(&self, worker: &str) -> Option<LatentState> {
        self.slots.get(worker).map(|slot| slot.state)
    }

    /// How many instances are starting (counted against `max_starting`).
    pub fn starting_count(&self) -> usize {
        self.slots
            .values()
            .filter(|slot| slot.state == LatentState::Starting)
            .count()
    }

    /// The workers whose instances are starting, oldest name order.
    #[cfg(test)]
    pub fn starting(&self) -> impl Iterator<Item = &str> {
        self.slots
            .iter()
            .filter(|(_, slot)| slot.state == LatentState::Starting)
            .map(|(name, _)| name.as_str())
    }

    /// The token made for `worker`'s current instance, while one exists.
    pub fn token(&self, worker: &str) -> Option<&str> {
        let slot = self.slots.get(worker)?;
        match slot.state {
            LatentState::Starting | LatentState::Running | LatentState::Lingering => {
                slot.token.as_deref()
            }
            LatentState::Stopping | LatentState::Stopped => None,
        }
    }

    /// Whether `worker` could be started now, and why not.
    pub fn startable(&self, worker: &str, now: Now) -> Result<(), NotStartable> {
        let slot = self
            .slots
            .get(worker)
            .ok_or_else(|| NotStartable::NotLatent(worker.to_owned()))?;
        if slot.removed {
            return Err(NotStartable::Removed(worker.to_owned()));
        }
        if slot.state != LatentState::Stopped {
            return Err(NotStartable::Busy {
                worker: worker.to_owned(),
                state: slot.state,
            });
        }
        if let Some((at, _, why)) = &slot.retry_at
            && *at > now.mono
        {
            return Err(NotStartable::BackedOff {
                worker: worker.to_owned(),
                reason: why.clone(),
            });
        }
        let starting = self.starting_count();
        if starting >= self.max_starting {
            return Err(NotStartable::TooManyStarting {
                starting,
                max: self.max_starting,
            });
        }
        Ok(())
    }

    /// Starts `worker`'s instance because `why` (e.g. "build 12 of
    /// compile"). Refused without change when [`Self::startable`] says no.
    pub fn start(
        &mut self,
        worker: &str,
        why: &str,
        now: Now,
    ) -> Result<Vec<LatentAction>, NotStartable> {
        self.startable(worker, now)?;
        let master = self.master.clone();
        let Some(slot) = self.slots.get_mut(worker) else {
            return Err(NotStartable::NotLatent(worker.to_owned()));
        };
        slot.attempt += 1;
        slot.generation += 1;
        slot.token = Some(new_token());
        slot.connected = false;
        slot.start_confirmed = false;
        slot.retry_at = None;
        slot.stop_when_idle = None;
        set_state(
            slot,
            LatentState::Starting,
            format!("starting for {why}"),
            now,
        );
        let instance = instance_of(worker, slot, &master);
        Ok(vec![
            LatentAction::Start {
                instance,
                attempt: slot.attempt,
                timeout: slot.settings.start_timeout,
            },
            LatentAction::Timer {
                worker: worker.to_owned(),
                at: now.mono + slot.settings.start_timeout,
                kind: TimerKind::StartTimeout,
                generation: slot.generation,
                instance: Some(instance_of(worker, slot, &master)),
            },
        ])
    }

    /// For a queued request that no connected worker can take: counts on a
    /// latent candidate already starting (one not yet counted on by an
    /// earlier request in this dispatch pass, tracked in `claimed`), or
    /// starts the first startable candidate. Candidates that are not latent
    /// are skipped.
    pub fn serve(
        &mut self,
        candidates: &[&str],
        claimed: &mut BTreeSet<String>,
        why: &str,
        now: Now,
    ) -> LatentChoice {
        for worker in candidates {
            if self.state(worker) == Some(LatentState::Starting) && !claimed.contains(*worker) {
                claimed.insert((*worker).to_owned());
                return LatentChoice::AlreadyStarting((*worker).to_owned());
            }
        }
        let mut reasons = Vec::new();
        for worker in candidates {
            if !self.is_latent(worker) {
                continue;
            }
            match self.start(worker, why, now) {
                Ok(actions) => {
                    claimed.insert((*worker).to_owned());
                    return LatentChoice::Start {
                        worker: (*worker).to_owned(),
                        actions,
                    };
                }
                Err(NotStartable::TooManyStarting { starting, max }) => {
                    return LatentChoice::Wait(format!(
                        "{starting} latent workers starting (max_starting = {max})"
                    ));
                }
                Err(NotStartable::Busy { .. }) => {}
                Err(other) => reasons.push(other.to_string()),
            }
        }
        if reasons.is_empty() {
            LatentChoice::Wait("no latent worker can start".into())
        } else {
            LatentChoice::Wait(reasons.join("; "))
        }
    }

    /// Feeds back the end of an action. Events for an older attempt or a
    /// disarmed timer are ignored.
    pub fn handle(&mut self, event: LatentEvent, now: Now) -> Vec<LatentAction> {
        match event {
            LatentEvent::StartDone {
                worker,
                attempt,
                outcome,
            } => self.start_done(&worker, attempt, outcome, now),
            LatentEvent::StopDone {
                worker,
                attempt,
                result,
            } => self.stop_done(&worker, attempt, result, now),
            LatentEvent::Timer {
                worker,
                kind,
                generation,
                health,
            } => self.timer(&worker, kind, generation, health, now),
        }
    }

    fn start_done(
        &mut self,
        worker: &str,
        attempt: u64,
        outcome: StartOutcome,
        now: Now,
    ) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if slot.attempt != attempt || slot.state != LatentState::Starting {
            return Vec::new();
        }
        crate::metrics::METRICS.latent_start(match &outcome {
            StartOutcome::Started => crate::metrics::LatentStart::Started,
            StartOutcome::NotNow(_) => crate::metrics::LatentStart::NotNow,
            StartOutcome::Failed(_) => crate::metrics::LatentStart::Failed,
        });
        match outcome {
            StartOutcome::Started => {
                slot.start_confirmed = true;
                if slot.connected {
                    slot.consecutive_failures = 0;
                    slot.generation += 1;
                    set_state(slot, LatentState::Running, "agent connected".into(), now);
                    return self.linger_if_idle(worker, now);
                }
                slot.reason = format!("{}; waiting for its agent to connect", slot.reason);
                Vec::new()
            }
            StartOutcome::NotNow(why) => {
                slot.generation += 1;
                slot.token = None;
                let reason = format!("provider said not now: {why}");
                let at = now.mono + NOT_NOW_RETRY;
                slot.retry_at = Some((at, now.wall_at(at), reason.clone()));
                set_state(slot, LatentState::Stopped, reason, now);
                vec![LatentAction::Timer {
                    worker: worker.to_owned(),
                    at,
                    kind: TimerKind::Retry,
                    generation: slot.generation,
                    instance: None,
                }]
            }
            StartOutcome::Failed(why) => {
                self.fail_start(worker, format!("start failed: {why}"), now)
            }
        }
    }

    /// A start failed or timed out: stop what may exist and back off.
    fn fail_start(&mut self, worker: &str, reason: String, now: Now) -> Vec<LatentAction> {
        let master = self.master.clone();
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        slot.consecutive_failures += 1;
        let backoff = backoff_after(slot.consecutive_failures);
        let at = now.mono + backoff;
        slot.retry_at = Some((
            at,
            now.wall_at(at),
            format!("{reason} (retry in {}s)", backoff.as_secs()),
        ));
        begin_stop(worker, slot, &master, reason, now)
    }

    fn stop_done(
        &mut self,
        worker: &str,
        attempt: u64,
        result: Result<(), String>,
        now: Now,
    ) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if slot.attempt != attempt || slot.state != LatentState::Stopping {
            return Vec::new();
        }
        slot.token = None;
        slot.connected = false;
        slot.running_builds = 0;
        slot.generation += 1;
        let reason = match result {
            Ok(()) => format!("stopped: {}", slot.reason),
            Err(error) => format!("stop failed ({error}) after: {}", slot.reason),
        };
        set_state(slot, LatentState::Stopped, reason, now);
        if slot.removed {
            self.slots.remove(worker);
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some((at, _, _)) = slot.retry_at
            && at > now.mono
        {
            actions.push(LatentAction::Timer {
                worker: worker.to_owned(),
                at,
                kind: TimerKind::Retry,
                generation: slot.generation,
                instance: None,
            });
        }
        actions
    }

    fn timer(
        &mut self,
        worker: &str,
        kind: TimerKind,
        generation: u64,
        health: Option<Health>,
        now: Now,
    ) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if slot.generation != generation {
            return Vec::new();
        }
        match (kind, slot.state) {
            (TimerKind::StartTimeout, LatentState::Starting) => {
                crate::metrics::METRICS.latent_start(crate::metrics::LatentStart::TimedOut);
                let timeout = slot.settings.start_timeout;
                let what = if slot.start_confirmed {
                    "its agent did not connect"
                } else {
                    "the provider did not finish starting it"
                };
                let health = match health {
                    Some(Health::Gone(why)) => format!("; the instance is gone: {why}"),
                    Some(Health::Alive) => "; the instance is up".to_owned(),
                    Some(Health::Unknown) | None => String::new(),
                };
                self.fail_start(
                    worker,
                    format!(
                        "start timed out: {what} within start_timeout ({}s){health}",
                        timeout.as_secs()
                    ),
                    now,
                )
            }
            (TimerKind::Linger, LatentState::Lingering)
            | (TimerKind::Linger, LatentState::Running)
                if slot.running_builds == 0 =>
            {
                let master = self.master.clone();
                let wait = slot.settings.build_wait_timeout;
                begin_stop(
                    worker,
                    slot,
                    &master,
                    format!("idle for build_wait_timeout ({}s)", wait.as_secs()),
                    now,
                )
            }
            (TimerKind::Retry, LatentState::Stopped) => {
                // The back-off is over; the caller re-runs its dispatch.
                if slot
                    .retry_at
                    .as_ref()
                    .is_some_and(|(at, _, _)| *at <= now.mono)
                {
                    slot.retry_at = None;
                    slot.reason = "back-off over; may be started again".into();
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Stops every instance that exists (the master is shutting down: an
    /// instance could not reconnect to the next master run, whose tokens
    /// are new). Returns the actions per worker.
    pub fn stop_all(&mut self, reason: &str, now: Now) -> Vec<(String, Vec<LatentAction>)> {
        let master = self.master.clone();
        let mut all = Vec::new();
        for (worker, slot) in &mut self.slots {
            if matches!(
                slot.state,
                LatentState::Starting | LatentState::Running | LatentState::Lingering
            ) {
                let actions = begin_stop(worker, slot, &master, reason.to_owned(), now);
                all.push((worker.clone(), actions));
            }
        }
        all
    }

    /// Whether no instance exists or is being stopped.
    pub fn all_stopped(&self) -> bool {
        self.slots
            .values()
            .all(|slot| slot.state == LatentState::Stopped)
    }

    /// The agent of `worker` connected (token already checked). Returns
    /// `Err` with a reason when the connection should be refused: the
    /// instance is being stopped. An agent that connects while nothing was
    /// started (a machine booted by hand, with the worker's own configured
    /// token: no per-start token exists then) is adopted as running, and
    /// lingers and stops like any instance.
    pub fn agent_connected(&mut self, worker: &str, now: Now) -> Result<Vec<LatentAction>, String> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Ok(Vec::new());
        };
        match slot.state {
            LatentState::Starting => {
                slot.connected = true;
                slot.consecutive_failures = 0;
                slot.generation += 1;
                set_state(slot, LatentState::Running, "agent connected".into(), now);
                Ok(self.linger_if_idle(worker, now))
            }
            LatentState::Running | LatentState::Lingering => {
                slot.connected = true;
                Ok(self.linger_if_idle(worker, now))
            }
            LatentState::Stopping => Err(format!(
                "latent worker `{worker}` is being stopped ({})",
                slot.reason
            )),
            LatentState::Stopped => {
                slot.connected = true;
                slot.attempt += 1;
                slot.generation += 1;
                slot.retry_at = None;
                set_state(
                    slot,
                    LatentState::Running,
                    "agent connected on its own".into(),
                    now,
                );
                Ok(self.stop_if_idle(worker, now))
            }
        }
    }

    /// The agent's connection ended (after the master's missing timeout or a
    /// goodbye). A running instance without its agent is stopped.
    pub fn agent_disconnected(
        &mut self,
        worker: &str,
        reason: &str,
        now: Now,
    ) -> Vec<LatentAction> {
        let master = self.master.clone();
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        slot.connected = false;
        match slot.state {
            LatentState::Running | LatentState::Lingering => {
                slot.running_builds = 0;
                begin_stop(
                    worker,
                    slot,
                    &master,
                    format!("agent disconnected: {reason}"),
                    now,
                )
            }
            _ => Vec::new(),
        }
    }

    /// A build was handed to `worker`.
    pub fn build_started(&mut self, worker: &str, now: Now) {
        let Some(slot) = self.slots.get_mut(worker) else {
            return;
        };
        slot.running_builds += 1;
        if slot.state == LatentState::Lingering {
            slot.generation += 1;
            set_state(slot, LatentState::Running, "running builds".into(), now);
        } else if slot.state == LatentState::Running {
            slot.reason = "running builds".into();
        }
    }

    /// A build of `worker` ended (or was re-queued). When it was the last,
    /// the worker lingers for `build_wait_timeout`, or stops at once when it
    /// is zero, or when the worker turned away or was removed.
    pub fn build_finished(&mut self, worker: &str, now: Now) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        slot.running_builds = slot.running_builds.saturating_sub(1);
        self.stop_if_idle(worker, now)
    }

    /// The worker's presence changed: one that is `away` (or paused) is
    /// stopped after its current builds; one taking builds again is kept.
    pub fn presence_changed(
        &mut self,
        worker: &str,
        takes_builds: bool,
        why: &str,
        now: Now,
    ) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if takes_builds {
            if slot.stop_when_idle.as_deref() != Some(REMOVED_REASON) {
                slot.stop_when_idle = None;
            }
            return Vec::new();
        }
        if slot.stop_when_idle.is_none() {
            slot.stop_when_idle = Some(format!("worker turned away ({why})"));
        }
        self.stop_if_idle(worker, now)
    }

    /// An instance that just came up (or back) with no build gets the linger
    /// timer: it stays `running` (the build it was started for is normally
    /// handed out in the same scheduler turn), but if no build reaches it
    /// within `build_wait_timeout` it is stopped. The timer is armed even
    /// when that is 0, so the hand-out of the same turn still wins. Every
    /// path into `running` thus ends in a stop unless a build arrives.
    fn linger_if_idle(&mut self, worker: &str, now: Now) -> Vec<LatentAction> {
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if slot.running_builds > 0 || slot.state != LatentState::Running {
            return Vec::new();
        }
        let wait = slot.settings.build_wait_timeout;
        slot.generation += 1;
        slot.reason = format!(
            "{}; stops after {}s without a build",
            slot.reason,
            wait.as_secs()
        );
        vec![LatentAction::Timer {
            worker: worker.to_owned(),
            at: now.mono + wait,
            kind: TimerKind::Linger,
            generation: slot.generation,
            instance: None,
        }]
    }

    fn stop_if_idle(&mut self, worker: &str, now: Now) -> Vec<LatentAction> {
        let master = self.master.clone();
        let Some(slot) = self.slots.get_mut(worker) else {
            return Vec::new();
        };
        if slot.running_builds > 0
            || !matches!(slot.state, LatentState::Running | LatentState::Lingering)
        {
            return Vec::new();
        }
        if let Some(why) = slot.stop_when_idle.clone() {
            return begin_stop(worker, slot, &master, why, now);
        }
        let wait = slot.settings.build_wait_timeout;
        if wait.is_zero() {
            return begin_stop(
                worker,
                slot,
                &master,
                "build done, build_wait_timeout is 0".into(),
                now,
            );
        }
        if slot.state == LatentState::Lingering {
            return Vec::new();
        }
        slot.generation += 1;
        set_state(
            slot,
            LatentState::Lingering,
            format!("idle; stops after {}s without a build", wait.as_secs()),
            now,
        );
        vec![LatentAction::Timer {
            worker: worker.to_owned(),
            at: now.mono + wait,
            kind: TimerKind::Linger,
            generation: slot.generation,
            instance: None,
        }]
    }
}

const REMOVED_REASON: &str = "removed from master.toml";

fn set_state(slot: &mut Slot, state: LatentState, reason: String, now: Now) {
    if slot.state != state {
        slot.since = now.wall;
    }
    slot.state = state;
    slot.reason = reason;
}

fn instance_of(worker: &str, slot: &Slot, master: &MasterAccess) -> InstanceInfo {
    InstanceInfo {
        worker: worker.to_owned(),
        token: slot.token.clone().unwrap_or_default(),
        master: match &slot.settings.master_url {
            Some(url) => MasterAccess {
                url: url.clone(),
                ..master.clone()
            },
            None => master.clone(),
        },
        max_builds: slot.settings.max_builds,
    }
}

fn begin_stop(
    worker: &str,
    slot: &mut Slot,
    master: &MasterAccess,
    reason: String,
    now: Now,
) -> Vec<LatentAction> {
    slot.generation += 1;
    slot.stop_when_idle = None;
    set_state(slot, LatentState::Stopping, reason, now);
    vec![LatentAction::Stop {
        instance: instance_of(worker, slot, master),
        attempt: slot.attempt,
    }]
}
