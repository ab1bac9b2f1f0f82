//! Latent (on-demand) workers: the provider trait that starts and stops an
//! instance, and [`LatentPool`], the per-worker state machine
//! `stopped → starting → running → lingering → stopping → stopped` that the
//! scheduler drives.
//!
//! The pool is synchronous and reads no clock: every method takes a [`Now`]
//! and answers with [`LatentAction`]s (start or stop an instance, arm a
//! timer) for the caller to carry out. [`spawn_action`] carries one out on
//! tokio and reports its end as a [`LatentEvent`] through a callback, which
//! the scheduler turns into an event of its own loop (push, no polling).
//!
//! Adding a provider (a container runtime, a cloud API) is one new file that
//! implements [`LatentProvider`], plus its arm in [`ProviderSpec`] and
//! [`build_provider`].

pub mod command;
pub mod process;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

/// A boxed future, so providers stay object safe (`Arc<dyn LatentProvider>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a new instance reaches and trusts the master.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasterAccess {
    /// The URL the agent connects to, e.g. `wss://127.0.0.1:7380`.
    pub url: String,
    /// PEM file of the certificate (or CA) the agent should trust.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 pin of the master's certificate (hex).
    pub cert_sha256: Option<String>,
    /// Plain TCP (only with `insecure = true` on the master).
    pub insecure: bool,
}

/// Everything a provider needs to start or stop one worker's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub worker: String,
    /// A token made for this start only; the master accepts it for this
    /// worker until the instance is stopped.
    pub token: String,
    pub master: MasterAccess,
    pub max_builds: u32,
}

/// The answer of [`LatentProvider::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The instance is booting; its agent will connect.
    Started,
    /// No capacity right now (nothing was started): try another worker.
    NotNow(String),
    /// The start failed; the master stops what may exist and backs off.
    Failed(String),
}

/// The answer of [`LatentProvider::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The instance exists (its agent may not have connected yet).
    Alive,
    /// The instance is gone, with what is known of why.
    Gone(String),
    /// The provider cannot tell.
    Unknown,
}

/// Starts and stops the machine (process, container, VM) behind one latent
/// worker. Implementations must be idempotent on `stop` (it is also called
/// after a failed or timed-out start, when nothing may exist).
pub trait LatentProvider: Send + Sync + 'static {
    /// Short name for messages: `command`, `process`, …
    fn kind(&self) -> &'static str;
    /// Starts the instance. The master bounds this with `start_timeout` and
    /// drops the future when it runs over.
    fn start<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, StartOutcome>;
    /// Stops the instance and frees what it holds.
    fn stop<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Result<(), String>>;
    /// Whether the instance still exists; used to explain a start that did
    /// not connect in time.
    fn health<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Health>;
}

/// Which provider a latent worker uses, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderSpec {
    Command(command::CommandSettings),
    Process(process::ProcessSettings),
}

/// Builds the provider for one latent worker.
pub fn build_provider(spec: &ProviderSpec) -> Arc<dyn LatentProvider> {
    match spec {
        ProviderSpec::Command(settings) => {
            Arc::new(command::CommandProvider::new(settings.clone()))
        }
        ProviderSpec::Process(settings) => {
            Arc::new(process::ProcessProvider::new(settings.clone()))
        }
    }
}

/// The settings of a `[[worker]]` with `latent = { … }` in `master.toml`,
/// or `None` for an ordinary worker. Relative paths were resolved by the
/// config loader; process instances live under `data_dir`.
pub fn settings_from_config(
    worker: &crate::config::WorkerDef,
    data_dir: &Path,
    config_dir: &Path,
) -> Option<LatentSettings> {
    let resolve = |path: &String| config_dir.join(path);
    let latent = worker.latent.as_ref()?;
    let provider = match latent.provider {
        crate::config::LatentProvider::Command => ProviderSpec::Command(command::CommandSettings {
            start: latent.start.clone().unwrap_or_default(),
            stop: latent.stop.clone().unwrap_or_default(),
            health: None,
        }),
        crate::config::LatentProvider::Process => ProviderSpec::Process(process::ProcessSettings {
            worker_binary: latent.worker_bin.as_ref().map(resolve),
            data_dir: data_dir.to_path_buf(),
            workdir: latent.workdir.as_ref().map(resolve),
            stop_grace: Duration::from_secs(30),
        }),
    };
    Some(LatentSettings {
        provider,
        build_wait_timeout: latent.build_wait_timeout.0,
        start_timeout: latent.start_timeout.0,
        max_builds: worker.max_builds,
        master_url: latent.master_url.clone(),
    })
}

/// The tokens of running latent instances (SHA-256, hex), shared between
/// the scheduler (which makes them at each start) and the connection
/// handler (which accepts an agent presenting one).
#[derive(Debug, Clone, Default)]
pub struct LatentTokens(Arc<RwLock<TokenTable>>);

/// Worker → token hash, and the reverse, so that an upgrade presenting a
/// token finds its worker without a scan.
#[derive(Debug, Default)]
struct TokenTable {
    by_worker: HashMap<String, String>,
    by_hash: HashMap<String, String>,
}

impl LatentTokens {
    /// Sets or clears the token `worker`'s instance may present.
    pub fn set(&self, worker: &str, token: Option<&str>) {
        let mut table = self.0.write().unwrap_or_else(|poison| poison.into_inner());
        if let Some(old) = table.by_worker.remove(worker) {
            table.by_hash.remove(&old);
        }
        if let Some(token) = token {
            let hash = sha256_hex(token);
            table.by_worker.insert(worker.to_owned(), hash.clone());
            table.by_hash.insert(hash, worker.to_owned());
        }
    }

    /// Whether `token` is the current instance token of `worker`.
    pub fn matches(&self, worker: &str, token: &str) -> bool {
        let table = self.0.read().unwrap_or_else(|poison| poison.into_inner());
        table
            .by_worker
            .get(worker)
            .is_some_and(|hash| constant_time_eq(hash, &sha256_hex(token)))
    }

    /// The worker whose current instance token hashes to `hash`, if any.
    pub fn worker_with_hash(&self, hash: &str) -> Option<String> {
        let table = self.0.read().unwrap_or_else(|poison| poison.into_inner());
        table.by_hash.get(hash).cloned()
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A latent worker's `latent = { … }` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatentSettings {
    pub provider: ProviderSpec,
    /// Linger this long after the last build before stopping; zero stops
    /// at once.
    pub build_wait_timeout: Duration,
    /// A start whose agent has not connected after this long is stopped and
    /// the worker backed off.
    pub start_timeout: Duration,
    pub max_builds: u32,
    /// Overrides the URL instances reach the master at.
    pub master_url: Option<String>,
}

/// Back-off after a failed or timed-out start: doubles per consecutive
/// failure from the first value up to the second.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// After a provider says "not now", the worker is not asked again for this
/// long (other workers are tried meanwhile).
pub const NOT_NOW_RETRY: Duration = Duration::from_secs(30);

/// The latent life cycle of a worker, as `master workers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentState {
    Stopped,
    Starting,
    Running,
    Lingering,
    Stopping,
}

impl LatentState {
    pub fn as_str(self) -> &'static str {
        match self {
            LatentState::Stopped => "stopped",
            LatentState::Starting => "starting",
            LatentState::Running => "running",
            LatentState::Lingering => "lingering",
            LatentState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for LatentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `master workers` shows for a latent worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LatentStatus {
    pub state: LatentState,
    pub reason: String,
    pub since: Timestamp,
    /// When a back-off ends, if the worker is backed off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Timestamp>,
    pub provider: &'static str,
}

/// An instant on both clocks: monotonic for timers, wall for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall: Timestamp,
}

impl Now {
    pub fn system() -> Now {
        Now {
            mono: Instant::now(),
            wall: Timestamp::now(),
        }
    }

    fn wall_at(&self, at: Instant) -> Timestamp {
        let ahead = at.saturating_duration_since(self.mono);
        self.wall.checked_add(ahead).unwrap_or(self.wall)
    }
}

/// The timers a latent worker arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// `start_timeout` since the start began.
    StartTimeout,
    /// `build_wait_timeout` since the last build ended.
    Linger,
    /// A back-off or "not now" pause ended: the worker may be started again.
    Retry,
}

/// What the caller must do for the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatentAction {
    /// Call the provider's `start` (bounded by `timeout`), then report
    /// [`LatentEvent::StartDone`].
    Start {
        instance: InstanceInfo,
        attempt: u64,
        timeout: Duration,
    },
    /// Call the provider's `stop`, then report [`LatentEvent::StopDone`].
    Stop {
        instance: InstanceInfo,
        attempt: u64,
    },
    /// At `at`, report [`LatentEvent::Timer`] (for a start timeout, with
    /// what the provider's `health` says of `instance`).
    Timer {
        worker: String,
        at: Instant,
        kind: TimerKind,
        generation: u64,
        instance: Option<InstanceInfo>,
    },
}

/// What comes back into the scheduler once an action ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatentEvent {
    StartDone {
        worker: String,
        attempt: u64,
        outcome: StartOutcome,
    },
    StopDone {
        worker: String,
        attempt: u64,
        result: Result<(), String>,
    },
    Timer {
        worker: String,
        kind: TimerKind,
        generation: u64,
        /// The provider's word on the instance (start timeouts only).
        health: Option<Health>,
    },
}

/// The answer of [`LatentPool::serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatentChoice {
    /// This instance is starting already and will take the request.
    AlreadyStarting(String),
    /// Started this one: carry out the actions.
    Start {
        worker: String,
        actions: Vec<LatentAction>,
    },
    /// Nothing to start now, with why (shown as what the build waits for).
    Wait(String),
}

/// Why a latent worker cannot be started now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotStartable {
    #[error("`{0}` is not a latent worker")]
    NotLatent(String),
    #[error("latent worker `{worker}` is {state}")]
    Busy { worker: String, state: LatentState },
    #[error("latent worker `{worker}` is backed off: {reason}")]
    BackedOff { worker: String, reason: String },
    #[error("{starting} latent workers are starting already (max_starting = {max})")]
    TooManyStarting { starting: usize, max: usize },
    #[error("latent worker `{0}` is being removed")]
    Removed(String),
}

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

fn build_kind(spec: &ProviderSpec) -> &'static str {
    match spec {
        ProviderSpec::Command(_) => "command",
        ProviderSpec::Process(_) => "process",
    }
}

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

fn backoff_after(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Carries out one action on the current tokio runtime: provider calls and
/// timers run in their own tasks, and their end is reported through
/// `report` (which the scheduler wires to its event channel).
pub fn spawn_action(
    action: LatentAction,
    providers: &BTreeMap<String, Arc<dyn LatentProvider>>,
    report: Arc<dyn Fn(LatentEvent) + Send + Sync>,
) {
    match action {
        LatentAction::Start {
            instance,
            attempt,
            timeout,
        } => {
            let Some(provider) = providers.get(&instance.worker).cloned() else {
                report(LatentEvent::StartDone {
                    worker: instance.worker.clone(),
                    attempt,
                    outcome: StartOutcome::Failed("no provider configured".into()),
                });
                return;
            };
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(timeout, provider.start(&instance)).await {
                    Ok(outcome) => outcome,
                    Err(_) => StartOutcome::Failed(format!(
                        "{} provider did not answer within start_timeout ({}s)",
                        provider.kind(),
                        timeout.as_secs()
                    )),
                };
                report(LatentEvent::StartDone {
                    worker: instance.worker,
                    attempt,
                    outcome,
                });
            });
        }
        LatentAction::Stop { instance, attempt } => {
            let Some(provider) = providers.get(&instance.worker).cloned() else {
                report(LatentEvent::StopDone {
                    worker: instance.worker.clone(),
                    attempt,
                    result: Ok(()),
                });
                return;
            };
            tokio::spawn(async move {
                let result = provider.stop(&instance).await;
                if let Err(error) = &result {
                    tracing::warn!(worker = %instance.worker, %error, "latent stop failed");
                }
                report(LatentEvent::StopDone {
                    worker: instance.worker,
                    attempt,
                    result,
                });
            });
        }
        LatentAction::Timer {
            worker,
            at,
            kind,
            generation,
            instance,
        } => {
            let provider = providers.get(&worker).cloned();
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let health = match (provider, instance) {
                    (Some(provider), Some(instance)) => Some(provider.health(&instance).await),
                    _ => None,
                };
                report(LatentEvent::Timer {
                    worker,
                    kind,
                    generation,
                    health,
                });
            });
        }
    }
}

#[cfg(test)]
mod tests;
