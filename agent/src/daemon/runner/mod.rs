//! Runs builds: each step with `sh -c` in `workdir/<builder>`, in its own
//! process group (and its own cgroup when the agent may create them) at the
//! priorities of `[builds]`, output streamed in batches, everything the step
//! started killed on cancel or timeout.
//!
//! A build runs as one tokio task that reports [`RunnerEvent`]s to the event
//! loop and takes cancel requests and lock grants through [`BuildControl`].
//!
//! Bounded end to end: events go to the loop through a bounded channel, and
//! every build frame for the master (output, step start, end and wait) first
//! takes [`Credit`] from the agent's [`OutputCredit`]. While a batch waits
//! for credit the step's pipe is not read, so a step that writes faster than
//! the link to the master carries blocks on its own writes; the batch waiting
//! holds at most [`BATCH_BYTES`].

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use nightshift_proto::wire::{BuildId, BuildResult, Outcome, StepResult, StepSpec};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use super::outgoing::{Credit, OutputCredit};
use super::spawn::{self, StepChild, StepCommand, step_environment, var};
use crate::build_processes::build_tree::{AGENT_MARKER, BUILD_MARKER};
use crate::build_processes::load::BuildTrees;
use nightshift_proto::clock::Clock;

mod output;
mod step;

pub(super) use output::*;

/// Output batches are sent at most this long after their first byte...
const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// ...or as soon as they reach this size (the pipe is not read while a
/// full batch waits for credit).
pub const BATCH_BYTES: usize = 32 * 1024;
/// The log carried in a `BuildResult` keeps at most this much (the tail);
/// the live stream carried everything. Keeps the frame under the wire limit.
const LOG_LIMIT: usize = 512 * 1024;
/// After a step's main process exits, how long to wait for processes it left
/// behind to close their output before they are killed; after that, how long
/// the pipe may stay idle (not counting waits for credit) before it is closed.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Once the step's group is killed, output is read for at most this long
/// (something outside the group may keep writing).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(60);

/// Events queued from all running builds to the event loop; a build whose
/// event does not fit waits (the loop never does).
pub const EVENT_QUEUE: usize = 64;

/// Environment variables of the agent that builds must never inherit: the
/// systemd notification socket, watchdog and socket-activation variables.
const HIDDEN_ENV_PREFIXES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"];

/// What the runner needs to know about its host.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The agent's `workdir`; builds run in `workdir/<builder>`.
    pub workdir: PathBuf,
    /// Between SIGTERM and SIGKILL when a step is cancelled or times out.
    pub kill_grace: Duration,
    /// The worker's git credentials, for the checkout step only.
    pub git: crate::config::GitAuth,
    /// The agent's credit for build frames in flight to the master.
    pub credit: OutputCredit,
    /// The master's API with this worker's token, for artifact uploads
    /// (`None` for a supervised agent, which runs no builds of ours).
    pub artifacts: Option<nightshift_proto::api::ApiClient>,
}

/// A build as the master handed it out.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub build_id: BuildId,
    pub builder: String,
    pub steps: Vec<StepSpec>,
    pub properties: BTreeMap<String, String>,
    /// What the build checks out (the step marked `checkout`) and names in
    /// every step's environment.
    pub source: Option<nightshift_proto::wire::BuildSource>,
    /// The master's `max_log_bytes`: no output is sent past it.
    pub max_log_bytes: Option<u64>,
}

/// What a running build tells the event loop, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerEvent {
    StepWaiting {
        build_id: BuildId,
        step: u32,
        credit: Credit,
    },
    StepStarted {
        build_id: BuildId,
        step: u32,
        at: Timestamp,
        credit: Credit,
    },
    Output {
        build_id: BuildId,
        step: u32,
        data: String,
        credit: Credit,
    },
    StepFinished {
        build_id: BuildId,
        result: StepResult,
        credit: Credit,
    },
    Finished {
        result: BuildResult,
    },
}

/// The event loop's grip on one running build.
#[derive(Debug)]
pub struct BuildControl {
    cancel: watch::Sender<Option<String>>,
    grants: mpsc::UnboundedSender<u32>,
}

impl BuildControl {
    /// Cancels the build: the running step's process tree gets SIGTERM, then
    /// SIGKILL after the grace period; the build ends `cancelled`.
    pub fn cancel(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.cancel.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The master granted the locks of `step`.
    pub fn grant(&self, step: u32) {
        let _ = self.grants.send(step);
    }
}

/// Starts a build as a task on the current runtime.
pub fn spawn(
    request: BuildRequest,
    settings: Arc<RunnerSettings>,
    trees: Arc<BuildTrees>,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<RunnerEvent>,
) -> BuildControl {
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let (grant_tx, grant_rx) = mpsc::unbounded_channel();
    let build = Build {
        request,
        settings,
        trees,
        clock,
        events,
        cancel: cancel_rx,
        grants: grant_rx,
        log: Log::default(),
        withheld: 0,
    };
    tokio::spawn(build.run());
    BuildControl {
        cancel: cancel_tx,
        grants: grant_tx,
    }
}

struct Build {
    request: BuildRequest,
    settings: Arc<RunnerSettings>,
    trees: Arc<BuildTrees>,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<RunnerEvent>,
    cancel: watch::Receiver<Option<String>>,
    grants: mpsc::UnboundedReceiver<u32>,
    log: Log,
    /// Output not sent because the log reached `max_log_bytes`.
    withheld: u64,
}

/// How one step ended.
pub(super) struct StepEnd {
    pub(super) outcome: Outcome,
    pub(super) exit_code: Option<i32>,
    pub(super) signal: Option<i32>,
    /// Why, when the step did not simply exit.
    pub(super) reason: Option<String>,
}

impl Build {
    async fn run(mut self) {
        let build_id = self.request.build_id;
        tracing::debug!(target: nightshift_proto::log::HANDOFF, "build {build_id}: runner started");
        let cgroup = self.trees.begin(build_id);
        let mut steps = Vec::new();
        let mut outcome = Outcome::Success;
        let mut reason = None;

        match safe_join(&self.settings.workdir, &self.request.builder) {
            Err(problem) => {
                self.note(0, &format!("nightshift: bad builder name: {problem}\n"))
                    .await;
                outcome = Outcome::Failure;
                reason = Some(problem);
            }
            Ok(build_dir) => {
                for index in 0..self.request.steps.len() {
                    let step_no = index as u32;
                    if let Some(why) = self.cancel_reason() {
                        outcome = Outcome::Cancelled;
                        reason = Some(why);
                        break;
                    }
                    let step = self.request.steps[index].clone();
                    if step.needs_grant && !self.wait_for_grant(step_no).await {
                        outcome = Outcome::Cancelled;
                        reason = self.cancel_reason();
                        break;
                    }
                    let started_at = self.clock.now();
                    let credit = self.settings.credit.take(0).await;
                    self.send(RunnerEvent::StepStarted {
                        build_id,
                        step: step_no,
                        at: started_at,
                        credit,
                    })
                    .await;
                    let end = match &step.upload {
                        Some(upload) => {
                            super::upload::run(self.upload_context(step_no), upload, &build_dir)
                                .await
                        }
                        None => {
                            self.run_step(step_no, &step, &build_dir, cgroup.as_deref())
                                .await
                        }
                    };
                    let result = StepResult {
                        step: step_no,
                        outcome: end.outcome,
                        exit_code: end.exit_code,
                        signal: end.signal,
                        started_at,
                        finished_at: self.clock.now(),
                    };
                    steps.push(result.clone());
                    let credit = self.settings.credit.take(0).await;
                    self.send(RunnerEvent::StepFinished {
                        build_id,
                        result,
                        credit,
                    })
                    .await;
                    if end.outcome != Outcome::Success {
                        outcome = end.outcome;
                        reason = end.reason;
                        break;
                    }
                }
            }
        }
        self.trees.end(build_id);
        let result = BuildResult {
            build_id,
            outcome,
            steps,
            reason,
            log: {
                let mut log = std::mem::take(&mut self.log).finish();
                if self.withheld > 0 {
                    log.push_str(&format!(
                        "[nightshift: {} bytes of output past max_log_bytes were not sent]\n",
                        self.withheld
                    ));
                }
                log
            },
            finished_at: self.clock.now(),
        };
        self.send(RunnerEvent::Finished { result }).await;
    }

    /// What the artifact upload step needs of the build.
    fn upload_context(&mut self, step: u32) -> super::upload::UploadContext<'_> {
        super::upload::UploadContext {
            build_id: self.request.build_id,
            step,
            client: self.settings.artifacts.clone(),
            cancel: &mut self.cancel,
            events: &self.events,
            log: &mut self.log,
        }
    }

    async fn send(&self, event: RunnerEvent) {
        // The loop outlives every build it starts; if it is gone the agent
        // is exiting and there is nobody left to tell.
        let _ = self.events.send(event).await;
    }

    fn cancel_reason(&self) -> Option<String> {
        self.cancel.borrow().clone()
    }

    /// Writes a line of the agent's own into the step's output.
    async fn note(&mut self, step: u32, text: &str) {
        self.log.push(text);
        let credit = self.settings.credit.take(text.len()).await;
        self.send(RunnerEvent::Output {
            build_id: self.request.build_id,
            step,
            data: text.to_owned(),
            credit,
        })
        .await;
    }

    /// Sends `StepWaiting` and waits for the grant; false when cancelled first.
    async fn wait_for_grant(&mut self, step: u32) -> bool {
        let credit = self.settings.credit.take(0).await;
        self.send(RunnerEvent::StepWaiting {
            build_id: self.request.build_id,
            step,
            credit,
        })
        .await;
        loop {
            tokio::select! {
                granted = self.grants.recv() => match granted {
                    Some(granted) if granted == step => return true,
                    Some(_) => continue,
                    None => return false,
                },
                changed = self.cancel.changed() => {
                    if changed.is_err() || self.cancel.borrow().is_some() {
                        return false;
                    }
                }
            }
        }
    }
}

/// `NIGHTSHIFT_PROP_<KEY>`: build properties as environment variables, the
/// key upper-cased with every character that is not a letter or digit as `_`.
fn property_env_name(key: &str) -> String {
    let key: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("NIGHTSHIFT_PROP_{key}")
}

/// `base/relative`, refusing absolute paths and `..` so a build never
/// writes outside the agent's workdir.
pub fn safe_join(base: &Path, relative: &str) -> Result<PathBuf, String> {
    if relative.is_empty() {
        return Err("it is empty".into());
    }
    let path = Path::new(relative);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(format!("`{relative}` contains `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("`{relative}` is absolute; it must be relative"));
            }
        }
    }
    Ok(base.join(path))
}

#[cfg(test)]
mod tests;
