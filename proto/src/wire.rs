//! The agent ↔ master protocol: JSON text frames over one WebSocket.
//!
//! Every frame is one [`AgentMessage`] (agent → master) or one
//! [`MasterMessage`] (master → agent), serialized as a JSON object whose
//! `type` field names the variant. The first frame on a connection is the
//! agent's [`AgentMessage::Hello`]; the master answers with
//! [`MasterMessage::Welcome`] or [`MasterMessage::Refused`] and closes.
//!
//! Architecture Invariant: this module has no I/O and names no transport
//! types (no tungstenite, no axum); both ends wrap these values themselves.

use std::collections::BTreeMap;

use jiff::Timestamp;
use nightshift_policy::Presence;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A hello with another version is
/// refused with a message naming both.
pub const PROTOCOL_VERSION: u32 = 1;

/// Path of the WebSocket endpoint on the master's port.
pub const WS_PATH: &str = "/api/v1/agent";

/// Largest frame either side accepts; larger frames close the connection.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Seconds between heartbeats in each direction.
pub const HEARTBEAT_SECS: u64 = 5;

/// A build's identity, unique on one master, never reused.
pub type BuildId = u64;

/// How the agent brings a builder's work directory to a build's revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckoutMode {
    /// Fetch and reset tracked files to the revision; untracked files and
    /// build outputs stay (fast rebuilds).
    #[default]
    Incremental,
    /// Fetch, reset and remove everything git does not track (`clean -ffdx`).
    Full,
    /// Remove the work directory and clone anew.
    Fresh,
}

impl CheckoutMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutMode::Incremental => "incremental",
            CheckoutMode::Full => "full",
            CheckoutMode::Fresh => "fresh",
        }
    }
}

/// The exact source a build builds: what the agent checks out before the
/// first step, and what steps see as `NIGHTSHIFT_REPOSITORY`,
/// `NIGHTSHIFT_BRANCH` and `NIGHTSHIFT_REVISION`. Credentials never travel
/// here: the worker's own `[git]` settings supply them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSource {
    /// The repository URL as the builder names it.
    pub repository: String,
    /// The branch the revision was taken from (may be empty for a bare
    /// revision submitted by hand).
    #[serde(default)]
    pub branch: String,
    /// The full commit id (40 or 64 hex digits).
    pub revision: String,
    #[serde(default)]
    pub mode: CheckoutMode,
    /// Fetch only the revision itself (`--depth 1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shallow: bool,
}

/// Whether `text` is a full git commit id (SHA-1 or SHA-256, lowercase hex).
pub fn is_full_revision(text: &str) -> bool {
    (text.len() == 40 || text.len() == 64)
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One step of a build as the master hands it to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Human name of the step, e.g. `compile`.
    pub name: String,
    /// Shell command, run with `sh -c`.
    pub command: String,
    /// Kill the step's process tree after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Extra environment for the step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Directory relative to the build directory (`workdir/<builder>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The step holds master-side locks: the agent must send
    /// [`AgentMessage::StepWaiting`] and wait for [`MasterMessage::StepGranted`]
    /// before starting it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_grant: bool,
    /// This step is the checkout of the build's source: the agent runs its
    /// own git commands (with the worker's credentials) instead of `command`,
    /// which only describes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checkout: bool,
    /// This step uploads the build's artifacts: the agent uploads the files
    /// matching these patterns to the master instead of running `command`
    /// (which only describes it). Absent for every other step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<ArtifactUpload>,
}

/// What the artifact upload step uploads and the master's caps, so the agent
/// can refuse an oversize file before sending it (the master enforces the
/// caps itself: the agent is not trusted to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactUpload {
    /// Glob patterns relative to the build directory (`dist/*.tar.gz`).
    pub patterns: Vec<String>,
    /// Largest single file the master stores (`max_artifact_bytes`).
    pub max_file_bytes: u64,
    /// Largest total of one build's files (`max_build_artifact_bytes`).
    pub max_build_bytes: u64,
}

/// Header of an artifact upload (and download) carrying the lowercase hex
/// SHA-256 of the file's content.
pub const ARTIFACT_SHA256_HEADER: &str = "x-nightshift-sha256";

/// Longest artifact name (its path relative to the build directory).
pub const MAX_ARTIFACT_NAME: usize = 1024;

/// The path an agent `PUT`s artifact `name` of build `id` to, on the
/// master's port, with its worker token as `Authorization: Bearer`.
pub fn artifact_upload_path(id: BuildId, name: &str) -> String {
    format!("/api/v1/agent/builds/{id}/artifacts/{}", encode_path(name))
}

/// Percent-encodes a `/`-separated relative path for a URL, keeping `/`.
pub fn encode_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Checks an artifact name: a relative `/`-separated path of plain
/// components (no `..`, `.`, empty component, leading `/`, backslash or
/// control character), at most [`MAX_ARTIFACT_NAME`] bytes. Both ends check
/// it; the master stores the file under exactly this relative path.
pub fn check_artifact_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the artifact name is empty".into());
    }
    if name.len() > MAX_ARTIFACT_NAME {
        return Err(format!(
            "the artifact name is {} bytes long; at most {MAX_ARTIFACT_NAME} are allowed",
            name.len()
        ));
    }
    if name.starts_with('/') {
        return Err(format!(
            "artifact name `{name}` is absolute; it must be relative to the build directory"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(format!(
            "artifact name `{}` contains the character {c:?}",
            name.escape_debug()
        ));
    }
    for part in name.split('/') {
        match part {
            "" => {
                return Err(format!(
                    "artifact name `{name}` has an empty path component"
                ));
            }
            "." | ".." => {
                return Err(format!(
                    "artifact name `{name}` contains `{part}`; only plain path components are allowed"
                ));
            }
            _ if part.len() > 255 => {
                return Err(format!(
                    "artifact name `{name}` has a path component longer than 255 bytes"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// How a step or build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every step exited 0.
    Success,
    /// A step exited non-zero or could not be started.
    Failure,
    /// A step ran past its timeout and was killed.
    Timeout,
    /// Cancelled on request (by the master, the owner, or a stop deadline).
    Cancelled,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
        })
    }
}

/// The result of one finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Index of the step in the build's step list.
    pub step: u32,
    pub outcome: Outcome,
    /// Exit code when the process exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

/// The complete result of a build: what the agent delivers (and re-delivers
/// after a reconnect until the master acknowledges it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildResult {
    pub build_id: BuildId,
    pub outcome: Outcome,
    pub steps: Vec<StepResult>,
    /// Why the build was cancelled, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The full output of every step (stdout and stderr interleaved), so a
    /// master that missed the live stream still stores the whole log.
    #[serde(default)]
    pub log: String,
    pub finished_at: Timestamp,
}

/// What the agent's policies say about the time ahead, sent with every
/// presence so the master can start only builds that the worker's
/// availability will not cut (window-aware admission).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outlook {
    /// When the worker next stops taking builds (`away`/`offline`) as far as
    /// its schedules, manual and master overrides know; `None`: nothing known
    /// ends it within the agent's horizon. Load cannot be foreseen and is
    /// taken as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takes_builds_until: Option<Timestamp>,
    /// When a worker that is `available` now turns `reluctant` before it
    /// stops taking builds: a build running past it runs in time the owner
    /// lends only when nobody else can take the build. `None`: it stays
    /// available for as long as it takes builds (or is not available now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reluctant_from: Option<Timestamp>,
    /// The next stretch in which it takes builds again, after the current
    /// one (or from now, when it takes none now), within the horizon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window: Option<Window>,
    /// The owner's accepted grace past the end of a window (`overrun`), seconds.
    #[serde(default)]
    pub overrun_secs: u64,
}

/// A stretch of time `[from, until)`; `until` is `None` when nothing known
/// ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

/// Agent → master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First frame. The token also travels in the upgrade request's
    /// `Authorization: Bearer` header; the master checks both agree.
    Hello {
        protocol: u32,
        worker: String,
        agent_version: String,
        max_builds: u32,
        presence: Presence,
        /// Builds this agent is running right now (after a reconnect).
        running: Vec<BuildId>,
        /// The time ahead (absent from older agents: admission treats the
        /// worker's availability as unbounded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outlook: Option<Outlook>,
    },
    /// The worker's presence changed.
    Presence {
        presence: Presence,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outlook: Option<Outlook>,
    },
    /// The agent took the build and is starting it.
    BuildAccepted {
        build_id: BuildId,
    },
    /// The agent could not take the build (it turned away in the same
    /// instant, or is full); the master re-queues it at once.
    BuildRefused {
        build_id: BuildId,
        reason: String,
    },
    /// The next step holds locks; the agent waits for `StepGranted`.
    StepWaiting {
        build_id: BuildId,
        step: u32,
    },
    StepStarted {
        build_id: BuildId,
        step: u32,
        at: Timestamp,
    },
    /// A chunk of a step's output (stdout and stderr interleaved), in order.
    Output {
        build_id: BuildId,
        step: u32,
        data: String,
    },
    StepFinished {
        build_id: BuildId,
        result: StepResult,
    },
    /// The build ended. Sent again after a reconnect until acknowledged.
    BuildFinished {
        result: BuildResult,
    },
    /// The agent is exiting (graceful stop done, or shutting down).
    Goodbye {
        reason: String,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
}

/// Master → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    Welcome {
        protocol: u32,
        master_version: String,
        heartbeat_secs: u64,
        /// Builds from the hello's `running` list that the master no longer
        /// expects (already re-queued elsewhere): the agent cancels them.
        cancel: Vec<BuildId>,
        /// The master's `missing_timeout`: after it, a lost worker's builds
        /// are re-queued and their locks given to others. An agent that lost
        /// the master cancels what holds locks after half of it, so no lock
        /// has two holders. Absent from masters that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        missing_timeout_secs: Option<u64>,
    },
    /// The hello was not accepted; the connection closes after this frame.
    Refused {
        reason: String,
    },
    StartBuild {
        build_id: BuildId,
        builder: String,
        steps: Vec<StepSpec>,
        #[serde(default)]
        properties: BTreeMap<String, String>,
        /// The source to check out (by the step marked `checkout`) and to
        /// name in every step's environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<BuildSource>,
        /// The build holds master-wide locks for its whole run (its
        /// builder's `locks`): see `Welcome::missing_timeout_secs`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        holds_locks: bool,
        /// The master keeps at most this much of the build's log
        /// (`max_log_bytes`): the agent sends no output past it, and says
        /// so once in the log. Absent: no limit on the agent's side.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_log_bytes: Option<u64>,
    },
    /// The locks for this step are held; the agent may start it.
    StepGranted {
        build_id: BuildId,
        step: u32,
    },
    CancelBuild {
        build_id: BuildId,
        reason: String,
    },
    /// The master stored this build's result; the agent may forget it.
    ResultStored {
        build_id: BuildId,
    },
    /// The master will never take this build's result from this agent (it
    /// was not handed to it, was taken back, or is unknown or finished): the
    /// agent forgets it as after `ResultStored`, and logs the reason.
    ResultRefused {
        build_id: BuildId,
        reason: String,
    },
    /// The worker is away (or removed) and idle: the master lets it go. A
    /// stopping agent exits on this.
    Released {
        reason: String,
    },
    /// Master-side override of the worker's presence (a master schedule or
    /// an admin pause); `None` clears it.
    MasterOverride {
        presence: Option<Presence>,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
}

/// Why a frame could not be decoded, with the offending part named.
#[derive(Debug, thiserror::Error)]
#[error("bad frame: {0}")]
pub struct FrameError(String);

impl AgentMessage {
    pub fn decode(text: &str) -> Result<Self, FrameError> {
        decode(text)
    }
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("wire messages always serialize")
    }
}

impl MasterMessage {
    pub fn decode(text: &str) -> Result<Self, FrameError> {
        decode(text)
    }
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("wire messages always serialize")
    }
}

fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, FrameError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(FrameError(format!(
            "frame of {} bytes exceeds the limit of {MAX_FRAME_BYTES}",
            text.len()
        )));
    }
    serde_json::from_str(text).map_err(|e| FrameError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_names_keep_relative_paths_and_refuse_escapes() {
        for good in ["x.tar.gz", "dist/x.tar.gz", "a b/ü.bin", ".hidden/f"] {
            assert_eq!(check_artifact_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "`..`"),
            ("dist/../../x", "`..`"),
            ("./x", "`.`"),
            ("dist//x", "empty path component"),
            ("dist/", "empty path component"),
            ("a\\b", "'\\\\'"),
            ("a\nb", "'\\n'"),
        ] {
            let error = check_artifact_name(bad).expect_err(bad);
            assert!(error.contains(why), "{bad:?}: {error}");
        }
        assert!(check_artifact_name(&"a".repeat(MAX_ARTIFACT_NAME + 1)).is_err());
    }

    #[test]
    fn upload_paths_encode_everything_but_the_separators() {
        assert_eq!(
            artifact_upload_path(7, "dist/a b%.tar.gz"),
            "/api/v1/agent/builds/7/artifacts/dist/a%20b%25.tar.gz"
        );
    }

    #[test]
    fn an_older_step_without_upload_still_decodes() {
        let step: StepSpec =
            serde_json::from_str(r#"{"name":"x","command":"true"}"#).expect("decodes");
        assert_eq!(step.upload, None);
        let encoded = serde_json::to_string(&step).expect("encodes");
        assert!(!encoded.contains("upload"), "{encoded}");
    }
}
