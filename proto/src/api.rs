//! The master's HTTP JSON API under [`API_PREFIX`]: request and response
//! shapes shared by the master, its CLI (`--json` prints these) and the tests.
//!
//! Every request carries the admin token as `Authorization: Bearer <token>`.
//! Errors come back as [`ApiError`] with a 4xx/5xx status.

use std::collections::BTreeMap;

use jiff::Timestamp;
use nightshift_policy::{PresenceState, Source};
use serde::{Deserialize, Serialize};

use crate::wire::{BuildId, Outcome, StepResult};

/// Prefix of every API path.
pub const API_PREFIX: &str = "/api/v1";

/// `POST /api/v1/builds`: queue a build of `builder`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub builder: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// The answer to a submit: the request is committed to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub build_id: BuildId,
}

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for a worker (or handed out and not yet accepted).
    Queued,
    /// Handed to a worker.
    Running,
    /// Ended; `outcome` says how.
    Finished,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Finished => "finished",
        }
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BuildState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(BuildState::Queued),
            "running" => Ok(BuildState::Running),
            "finished" => Ok(BuildState::Finished),
            other => Err(format!("unknown build state `{other}`")),
        }
    }
}

/// One build as `master builds` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub id: BuildId,
    pub builder: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub state: BuildState,
    /// The worker it runs or ran on.
    #[serde(default)]
    pub worker: Option<String>,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// How many times it was re-queued after a worker lost it.
    pub retries: u32,
    /// Why it was last re-queued.
    #[serde(default)]
    pub retry_reason: Option<String>,
    /// What a queued build waits for, e.g. `no available worker: b1 away`.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Why it was cancelled, when it was.
    #[serde(default)]
    pub reason: Option<String>,
    pub submitted_at: Timestamp,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub steps: Vec<StepResult>,
}

/// `GET /api/v1/builds`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildList {
    pub builds: Vec<BuildInfo>,
}

/// `GET /api/v1/builds/{id}/log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildLog {
    pub build_id: BuildId,
    pub log: String,
}

/// One worker as `master workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub state: PresenceState,
    pub reason: String,
    #[serde(default)]
    pub source: Option<Source>,
    #[serde(default)]
    pub since: Option<Timestamp>,
    #[serde(default)]
    pub until: Option<Timestamp>,
    pub connected: bool,
    pub max_builds: u32,
    pub running: Vec<BuildId>,
}

/// `GET /api/v1/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub paused: bool,
    pub workers: Vec<WorkerInfo>,
}

/// `POST /api/v1/pause` and `/resume`: the master's state afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseState {
    pub paused: bool,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_request_refuses_unknown_fields() {
        let err = serde_json::from_str::<SubmitRequest>(r#"{"builder":"a","prop":{}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prop"), "{err}");
        let ok: SubmitRequest = serde_json::from_str(r#"{"builder":"a"}"#).unwrap();
        assert!(ok.properties.is_empty());
    }

    #[test]
    fn build_state_words_round_trip() {
        for state in [BuildState::Queued, BuildState::Running, BuildState::Finished] {
            assert_eq!(state.as_str().parse::<BuildState>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        assert!("done".parse::<BuildState>().is_err());
    }
}
