//! The seam between the agent daemon and everything that talks to it (the
//! local control plane, signal handlers): commands in, status out.
//!
//! The daemon owns an [`AgentStatus`] and publishes every change on a
//! `watch` channel, so the status page and `/metrics` are pushed updates
//! rather than polling; control requests travel as [`ControlCommand`]s with
//! a reply channel.

use crate::build_processes::priority::BuildIsolation;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::Presence;
use nightshift_proto::wire::Outlook;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

/// A request to the running daemon.
#[derive(Debug)]
pub enum ControlCommand {
    /// Set the owner's manual state (`None` = `auto`, back to the policies).
    SetManual {
        manual: Option<ManualRequest>,
        reply: oneshot::Sender<Result<Presence, String>>,
    },
    /// Stop the agent. Graceful: turn `away` (source `stopping`), finish the
    /// running builds, exit; at the deadline cancel them (the master
    /// re-queues). Not graceful: cancel at once (re-queued) and exit.
    Stop {
        graceful: bool,
        deadline: Option<SignedDuration>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A manual state as the owner asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManualRequest {
    pub state: nightshift_policy::PresenceState,
    /// When the manual state ends by itself; `None` = until changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Everything the agent shows about itself: the `/api/v1/status` body, the
/// `worker status --json` output and the data behind the status page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub worker: String,
    pub agent_version: String,
    pub presence: Presence,
    /// The owner's manual state, when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<ManualRequest>,
    /// A graceful stop is in progress.
    pub stopping: bool,
    pub builds: Vec<RunningBuild>,
    pub master: MasterLink,
    pub counters: Counters,
    /// The latest load sample the policy saw (foreign load only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadSnapshot>,
    /// The time ahead (when the worker stops taking builds, its next window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlook: Option<Outlook>,
    /// How builds are accounted and made to yield to the owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<BuildIsolation>,
    /// The CI agent run under `[supervise]`, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised: Option<SupervisedStatus>,
}

/// The supervised CI agent, as `[supervise]` runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisedStatus {
    /// `buildbot-worker`, `gitlab-runner`, `buildkite-agent` or `command`.
    pub kind: String,
    /// The command line it runs.
    pub command: String,
    pub state: SupervisedState,
    /// When `state` last changed.
    pub since: Timestamp,
    /// Its process id while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Whether the presence wants it running, and why.
    pub wanted: bool,
    pub why: String,
    /// Whether it runs a job, judged by its process tree (it has child
    /// processes); `None` when it is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_running: Option<bool>,
    /// When the graceful signal was sent (while `draining`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<Timestamp>,
    /// When the hard-stop signal follows if it has not exited (while `draining`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_stop_at: Option<Timestamp>,
    /// When it is started again (while `restarting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<Timestamp>,
    /// Starts after an unexpected exit, since the agent started.
    pub restarts: u64,
    /// How it last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<SupervisedExit>,
}

/// Where the supervised CI agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SupervisedState {
    /// Not running, and not wanted.
    Stopped,
    Running,
    /// Sent the graceful signal: finishing its job, then exiting.
    Draining,
    /// Exited while it should run; started again at `restart_at`.
    Restarting,
}

impl SupervisedState {
    pub fn as_str(self) -> &'static str {
        match self {
            SupervisedState::Stopped => "stopped",
            SupervisedState::Running => "running",
            SupervisedState::Draining => "draining",
            SupervisedState::Restarting => "restarting",
        }
    }
}

/// How the supervised CI agent last ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisedExit {
    pub at: Timestamp,
    /// `exit 0`, `exit 1`, `signal SIGKILL`, or `unknown` (a leftover of an
    /// earlier run, not our child).
    pub status: String,
    /// It was asked to stop (graceful or hard) rather than exiting by itself.
    pub requested: bool,
    /// It ignored the graceful signal and was stopped with the hard signal.
    pub stopped_hard: bool,
    /// In words, for people.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningBuild {
    pub build_id: u64,
    pub builder: String,
    pub started_at: Timestamp,
    /// Index and name of the running step.
    pub step: u32,
    pub step_name: String,
    /// The last few lines of output.
    pub tail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterLink {
    pub url: String,
    pub connected: bool,
    /// When `connected` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// The last connection error, when not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub builds_run: u64,
    pub builds_failed: u64,
    pub presence_changes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSnapshot {
    pub at: Timestamp,
    /// 1-minute load average not caused by the agent's own builds.
    pub load1: f64,
    /// CPU use in percent of the whole machine, not counting own builds.
    pub cpu_percent: f64,
    /// CPU use of the agent's own builds, in percent of the whole machine.
    #[serde(default)]
    pub build_cpu_percent: f64,
}

/// A cheap, cloneable handle on the running daemon.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub commands: mpsc::Sender<ControlCommand>,
    pub status: watch::Receiver<AgentStatus>,
}
