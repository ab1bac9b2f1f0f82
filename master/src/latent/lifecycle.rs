//! The latent life cycle's vocabulary: states, the instants the pool is
//! told, the events it handles and the actions it answers with.

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::time::Instant;

use super::{Health, InstanceInfo, StartOutcome};

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

    pub(super) fn wall_at(&self, at: Instant) -> Timestamp {
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
