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

use super::build_tree::{AGENT_MARKER, BUILD_MARKER};
use super::clock::Clock;
use super::load::BuildTrees;
use super::outgoing::{Credit, OutputCredit};
use super::spawn::{self, StepChild, StepCommand, step_environment, var};

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
    pub git: super::checkout::GitAuth,
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

    async fn run_step(
        &mut self,
        step_no: u32,
        step: &StepSpec,
        build_dir: &Path,
        cgroup: Option<&Path>,
    ) -> StepEnd {
        let failed = |reason: String| StepEnd {
            outcome: Outcome::Failure,
            exit_code: None,
            signal: None,
            reason: Some(reason),
        };
        let dir = match &step.workdir {
            Some(relative) => match safe_join(build_dir, relative) {
                Ok(dir) => dir,
                Err(problem) => {
                    let text = format!("step `{}`: bad workdir: {problem}", step.name);
                    self.note(step_no, &format!("nightshift: {text}\n")).await;
                    return failed(text);
                }
            },
            None => build_dir.to_owned(),
        };
        if let Err(error) = fs_err::create_dir_all(&dir) {
            let text = format!("step `{}`: cannot create its directory: {error}", step.name);
            self.note(step_no, &format!("nightshift: {text}\n")).await;
            return failed(text);
        }
        let (mut child, reader) = match self.spawn_step(step, &dir, cgroup) {
            Ok(spawned) => spawned,
            Err(error) => {
                let text = format!("step `{}`: cannot start `sh`: {error}", step.name);
                self.note(step_no, &format!("nightshift: {text}\n")).await;
                return failed(text);
            }
        };
        let pgid = child.id().map(|pid| pid as i32);
        self.trees.set_step_group(self.request.build_id, pgid);

        let mut reader = Some(reader);
        let mut buffer = vec![0u8; 16 * 1024];
        let mut batch = Batch::default();
        let mut status = None;
        let mut ended_by: Option<(Outcome, String)> = None;
        let mut kill_at: Option<Instant> = None;
        // After the main process exits: when its group is killed (lingering
        // writers had their time), then when the pipe counts as idle.
        let mut drain_until: Option<Instant> = None;
        let mut group_killed_at: Option<Instant> = None;
        // The batch's time is up: it goes as soon as there is credit.
        let mut batch_due = false;
        let timeout_at = step
            .timeout_secs
            .map(|secs| Instant::now() + Duration::from_secs(secs));
        let mut cancel_open = true;
        let far = Instant::now() + Duration::from_secs(86400 * 365);

        loop {
            if status.is_some() && reader.is_none() {
                break;
            }
            // A full batch is not added to: the pipe waits, and so does the
            // step when it fills.
            let batch_full = batch.pending.len() >= BATCH_BYTES;
            let sending = (batch_full || batch_due) && !batch.pending.is_empty();
            let drain_deadline = match group_killed_at {
                None => drain_until,
                Some(killed) => drain_until.map(|idle| idle.min(killed + DRAIN_AFTER_KILL)),
            };
            tokio::select! {
                read = async {
                    match reader.as_mut() {
                        Some(reader) => reader.read(&mut buffer).await,
                        None => std::future::pending().await,
                    }
                }, if !batch_full => match read {
                    Ok(0) | Err(_) => reader = None,
                    Ok(n) => {
                        batch.push(&buffer[..n]);
                        if group_killed_at.is_some() {
                            drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                        }
                    }
                },
                credit = self.settings.credit.take(batch.pending.len()), if sending => {
                    batch_due = false;
                    self.flush(step_no, &mut batch, credit).await;
                    if group_killed_at.is_some() {
                        // Waiting for credit is not idleness.
                        drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                    }
                }
                exit = child.wait(), if status.is_none() => {
                    status = Some(exit);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                () = sleep_until(batch.due.unwrap_or(far)), if batch.due.is_some() && !batch_due => {
                    batch_due = true;
                }
                () = sleep_until(timeout_at.unwrap_or(far)),
                    if timeout_at.is_some() && ended_by.is_none() && status.is_none() =>
                {
                    let secs = step.timeout_secs.unwrap_or_default();
                    ended_by = Some((
                        Outcome::Timeout,
                        format!("step `{}` ran past its timeout of {secs} s", step.name),
                    ));
                    self.trees.signal_build(self.request.build_id, Signal::SIGTERM);
                    kill_at = Some(Instant::now() + self.settings.kill_grace);
                }
                changed = self.cancel.changed(), if cancel_open && ended_by.is_none() => {
                    match changed {
                        Err(_) => cancel_open = false,
                        Ok(()) => {
                            if let Some(reason) = self.cancel_reason() {
                                ended_by = Some((Outcome::Cancelled, reason));
                                self.trees.signal_build(self.request.build_id, Signal::SIGTERM);
                                kill_at = Some(Instant::now() + self.settings.kill_grace);
                            }
                        }
                    }
                }
                () = sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    self.trees.signal_build(self.request.build_id, Signal::SIGKILL);
                    kill_at = None;
                }
                () = sleep_until(drain_deadline.unwrap_or(far)),
                    if drain_deadline.is_some() && reader.is_some() && !sending =>
                {
                    let now = Instant::now();
                    match group_killed_at {
                        None => {
                            // Something the step started still holds its
                            // output open: its group goes now, and what it
                            // wrote before is still read (at the link's pace).
                            if let Some(pgid) = pgid.filter(|pgid| *pgid > 1) {
                                let _ = nix::sys::signal::killpg(
                                    nix::unistd::Pid::from_raw(pgid),
                                    Signal::SIGKILL,
                                );
                            }
                            group_killed_at = Some(now);
                            drain_until = Some(now + DRAIN_AFTER_EXIT);
                        }
                        // Nothing came for a while (a process outside the
                        // group holds the pipe), or something outside the
                        // group keeps writing: stop reading.
                        Some(_) => reader = None,
                    }
                }
            }
        }
        // Nothing a step started outlives it: its process group now; and
        // after the build's last step, everything the build started,
        // whatever group or session it moved to. (A whole-build kill between
        // steps could reach the next step, which runs in the same build
        // cgroup and carries the same build marker.)
        let trees = self.trees.clone();
        let build_id = self.request.build_id;
        // The artifact upload step starts no process: the build's processes
        // are all killed before it reads the files they made.
        let last_step = self.request.steps[step_no as usize + 1..]
            .iter()
            .all(|later| later.upload.is_some());
        let killed = tokio::task::spawn_blocking(move || {
            if let Some(pgid) = pgid.filter(|pgid| *pgid > 1) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
            }
            if last_step {
                trees.signal_build(build_id, Signal::SIGKILL);
            }
            trees.set_step_group(build_id, None);
        })
        .await;
        if killed.is_err() {
            self.trees.set_step_group(build_id, None);
        }
        if !batch.pending.is_empty() {
            let credit = self.settings.credit.take(batch.pending.len()).await;
            self.flush(step_no, &mut batch, credit).await;
        }
        if let Some(text) = batch.finish() {
            self.note(step_no, &text).await;
        }

        use std::os::unix::process::ExitStatusExt;
        let (exit_code, signal) = match &status {
            Some(Ok(status)) => (status.code(), status.signal()),
            _ => (None, None),
        };
        if let Some((outcome, reason)) = ended_by {
            return StepEnd {
                outcome,
                exit_code,
                signal,
                reason: Some(reason),
            };
        }
        match status {
            Some(Ok(status)) if status.success() => StepEnd {
                outcome: Outcome::Success,
                exit_code,
                signal,
                reason: None,
            },
            Some(Ok(_)) => StepEnd {
                outcome: Outcome::Failure,
                exit_code,
                signal,
                reason: Some(match (exit_code, signal) {
                    (Some(code), _) => format!("step `{}` exited with {code}", step.name),
                    (None, Some(signal)) => {
                        format!("step `{}` was killed by signal {signal}", step.name)
                    }
                    _ => format!("step `{}` failed", step.name),
                }),
            },
            Some(Err(error)) => failed(format!(
                "step `{}`: waiting for it failed: {error}",
                step.name
            )),
            None => failed(format!("step `{}` ended without an exit status", step.name)),
        }
    }

    async fn flush(&mut self, step_no: u32, batch: &mut Batch, credit: Credit) {
        if let Some(data) = batch.take() {
            let Some(data) = self.within_log_cap(data) else {
                return; // the pipe is drained, nothing crosses the link
            };
            self.log.push(&data);
            self.send(RunnerEvent::Output {
                build_id: self.request.build_id,
                step: step_no,
                data,
                credit,
            })
            .await;
        }
    }

    #[allow(
        unsafe_code,
        reason = "pre_exec joins the build's cgroup between fork and exec"
    )]
    fn spawn_step(
        &self,
        step: &StepSpec,
        dir: &Path,
        cgroup: Option<&Path>,
    ) -> std::io::Result<(StepChild, tokio::net::unix::pipe::Receiver)> {
        let (reader, writer) = std::io::pipe()?;
        let markers = [
            var(AGENT_MARKER, self.trees.agent_tag()),
            var(BUILD_MARKER, self.request.build_id.to_string()),
            var("NIGHTSHIFT_BUILDER", &self.request.builder),
            var("NIGHTSHIFT_STEP", &step.name),
        ];
        let properties = self
            .request
            .properties
            .iter()
            .map(|(key, value)| var(property_env_name(key), value));
        let source = super::checkout::source_env(self.request.source.as_ref())
            .into_iter()
            .map(|(name, value)| var(name, value));
        // Credentials reach the checkout step only, never a build's own steps.
        let auth = step
            .checkout
            .then(|| super::checkout::auth_env(&self.settings.git))
            .into_iter()
            .flatten()
            .map(|(name, value)| var(name, value));
        let step_env = step.env.iter().map(|(name, value)| var(name, value));
        let script = match step.checkout {
            true => super::checkout::script(self.request.source.as_ref()),
            false => step.command.clone(),
        };
        let child = spawn::spawn(StepCommand {
            script,
            dir: dir.to_owned(),
            env: step_environment(
                &HIDDEN_ENV_PREFIXES,
                markers
                    .into_iter()
                    .chain(properties)
                    .chain(source)
                    .chain(auth)
                    .chain(step_env),
            ),
            output: OwnedFd::from(writer),
            cgroup: cgroup.map(Path::to_owned),
            priority: self.trees.child_priority(),
        })?;
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        Ok((child, reader))
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

/// Output not yet sent: text decoded so far plus an incomplete UTF-8 tail.
#[derive(Default)]
struct Batch {
    pending: String,
    carry: Vec<u8>,
    due: Option<Instant>,
}

impl Batch {
    fn push(&mut self, bytes: &[u8]) {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(bytes);
        let mut rest = &data[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.pending.push_str(text);
                    break;
                }
                Err(error) => {
                    let valid = error.valid_up_to();
                    // SAFETY-free: `valid` bytes were just checked.
                    self.pending
                        .push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match error.error_len() {
                        Some(bad) => {
                            self.pending.push('\u{FFFD}');
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            self.carry = rest[valid..].to_vec();
                            break;
                        }
                    }
                }
            }
        }
        if !self.pending.is_empty() && self.due.is_none() {
            self.due = Some(Instant::now() + FLUSH_AFTER);
        }
    }

    fn take(&mut self) -> Option<String> {
        self.due = None;
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }

    /// What is left at the end: bytes of an unfinished character.
    fn finish(&mut self) -> Option<String> {
        if self.carry.is_empty() {
            None
        } else {
            let text = String::from_utf8_lossy(&self.carry).into_owned();
            self.carry.clear();
            Some(text)
        }
    }
}

/// Room kept under `max_log_bytes` for the lines saying the log is full.
const LOG_FULL_NOTE_ROOM: u64 = 512;

impl Build {
    /// What of `data` may still be sent under the master's `max_log_bytes`
    /// (less [`LOG_FULL_NOTE_ROOM`]): all of it, a part followed once by a
    /// line saying the log is full, or nothing (`None`). What is cut is
    /// counted for the result's last line.
    fn within_log_cap(&mut self, data: String) -> Option<String> {
        let Some(cap) = self.request.max_log_bytes else {
            return Some(data);
        };
        let room = cap.saturating_sub(LOG_FULL_NOTE_ROOM);
        let sent = self.log.total() as u64;
        if self.withheld > 0 || sent + data.len() as u64 > room {
            let first = self.withheld == 0;
            let mut keep = usize::try_from(room.saturating_sub(sent)).unwrap_or(usize::MAX);
            keep = keep.min(data.len());
            while !data.is_char_boundary(keep) {
                keep -= 1;
            }
            self.withheld += (data.len() - keep) as u64;
            if !first {
                return None;
            }
            tracing::info!(
                "build {}: its log reached max_log_bytes ({cap} bytes); later output is not sent",
                self.request.build_id
            );
            let mut kept = data[..keep].to_owned();
            kept.push_str(&format!(
                "\n[nightshift: this build's log reached max_log_bytes ({cap} bytes): later \
                 output is not sent to the master; the steps run on]\n"
            ));
            return Some(kept);
        }
        Some(data)
    }
}

/// The build's log: everything, or its tail when it grows past the limit.
#[derive(Default)]
pub(super) struct Log {
    text: String,
    dropped: usize,
}

impl Log {
    pub(super) fn push(&mut self, data: &str) {
        self.text.push_str(data);
        if self.text.len() > LOG_LIMIT {
            let mut cut = self.text.len() - LOG_LIMIT * 3 / 4;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.text.drain(..cut);
            self.dropped += cut;
        }
    }

    /// Bytes pushed so far (kept or not).
    fn total(&self) -> usize {
        self.text.len() + self.dropped
    }

    fn finish(self) -> String {
        if self.dropped == 0 {
            self.text
        } else {
            format!(
                "[nightshift: {} bytes of earlier output are not in this log; they were streamed live]\n{}",
                self.dropped, self.text
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::clock::SystemClock;
    use crate::daemon::outgoing::FRAME_COST;

    fn step(name: &str, command: &str) -> StepSpec {
        StepSpec {
            name: name.to_owned(),
            command: command.to_owned(),
            timeout_secs: None,
            env: BTreeMap::new(),
            workdir: None,
            needs_grant: false,
            checkout: false,
            upload: None,
        }
    }

    struct Harness {
        workdir: tempfile::TempDir,
        events: mpsc::Receiver<RunnerEvent>,
        sender: mpsc::Sender<RunnerEvent>,
        credit: OutputCredit,
    }

    impl Harness {
        fn new() -> Harness {
            Harness::with_credit(OutputCredit::default())
        }

        fn with_credit(credit: OutputCredit) -> Harness {
            let (sender, events) = mpsc::channel(EVENT_QUEUE);
            Harness {
                workdir: tempfile::tempdir().unwrap(),
                events,
                sender,
                credit,
            }
        }

        fn start(&self, build_id: BuildId, steps: Vec<StepSpec>) -> BuildControl {
            self.start_capped(build_id, steps, None)
        }

        /// [`Harness::start`] with the master's `max_log_bytes`.
        fn start_capped(
            &self,
            build_id: BuildId,
            steps: Vec<StepSpec>,
            max_log_bytes: Option<u64>,
        ) -> BuildControl {
            let settings = Arc::new(RunnerSettings {
                artifacts: None,
                workdir: self.workdir.path().to_owned(),
                kill_grace: Duration::from_millis(500),
                git: Default::default(),
                credit: self.credit.clone(),
            });
            let mut properties = BTreeMap::new();
            properties.insert("branch-name".to_owned(), "main".to_owned());
            spawn(
                BuildRequest {
                    build_id,
                    builder: "demo".to_owned(),
                    steps,
                    properties,
                    source: None,
                    max_log_bytes,
                },
                settings,
                Arc::new(BuildTrees::without_cgroups()),
                Arc::new(SystemClock),
                self.sender.clone(),
            )
        }

        async fn next(&mut self) -> RunnerEvent {
            tokio::time::timeout(Duration::from_secs(60), self.events.recv())
                .await
                .expect("the runner reports within a minute")
                .expect("the runner's channel stays open")
        }

        /// Collects events until the build finishes.
        /// Collects events until the build finishes (giving back their
        /// credit, as the link does once it has written them).
        async fn finish(&mut self) -> (Vec<RunnerEvent>, BuildResult) {
            let mut seen = Vec::new();
            loop {
                match self.next().await {
                    RunnerEvent::Finished { result } => return (seen, result),
                    event => seen.push(without_credit(event)),
                }
            }
        }
    }

    fn without_credit(event: RunnerEvent) -> RunnerEvent {
        match event {
            RunnerEvent::StepWaiting { build_id, step, .. } => RunnerEvent::StepWaiting {
                build_id,
                step,
                credit: Credit::none(),
            },
            RunnerEvent::StepStarted {
                build_id, step, at, ..
            } => RunnerEvent::StepStarted {
                build_id,
                step,
                at,
                credit: Credit::none(),
            },
            RunnerEvent::Output {
                build_id,
                step,
                data,
                ..
            } => RunnerEvent::Output {
                build_id,
                step,
                data,
                credit: Credit::none(),
            },
            RunnerEvent::StepFinished {
                build_id, result, ..
            } => RunnerEvent::StepFinished {
                build_id,
                result,
                credit: Credit::none(),
            },
            finished @ RunnerEvent::Finished { .. } => finished,
        }
    }

    #[tokio::test]
    async fn a_step_writing_faster_than_its_credit_comes_back_waits_on_its_pipe() {
        // 256 KiB of credit, held by the test as a link that writes nothing.
        let credit = OutputCredit::new(256 * 1024);
        let mut harness = Harness::with_credit(credit.clone());
        let marker = harness.workdir.path().join("demo/wrote-everything");
        // 8 MB: far more than the credit, the batch, the read buffer and
        // the pipe together can take from the step.
        harness.start(
            7,
            vec![step(
                "flood",
                "head -c 8000000 /dev/zero | tr '\\0' y; touch wrote-everything; echo done",
            )],
        );
        let mut held = Vec::new();
        let mut bytes = 0;
        // The largest frame: a batch just under full plus one read.
        while credit.available() >= FRAME_COST + BATCH_BYTES + 16 * 1024 + 4 {
            let event = harness.next().await;
            if let RunnerEvent::Output { data, .. } = &event {
                bytes += data.len();
            }
            held.push(event);
        }
        // The credit is spent and nothing is given back: the step can only
        // have written what the credit, one batch, one read and the pipe hold.
        assert!(bytes <= 256 * 1024, "{bytes} bytes of output arrived");
        assert!(
            !marker.exists(),
            "the step finished writing 8 MB although only {bytes} bytes left it"
        );
        // The link catches up: everything arrives, in order, and the step ends.
        drop(held);
        let (events, result) = harness.finish().await;
        assert_eq!(
            result.outcome,
            Outcome::Success,
            "{}",
            result.reason.unwrap_or_default()
        );
        let rest = output_of(&events);
        assert_eq!(bytes + rest.len(), 8_000_000 + "done\n".len());
        assert!(rest.ends_with("yyydone\n"), "{}", &rest[rest.len() - 20..]);
        assert!(marker.exists());
    }

    fn output_of(events: &[RunnerEvent]) -> String {
        events
            .iter()
            .filter_map(|event| match event {
                RunnerEvent::Output { data, .. } => Some(data.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the process exists and is not a zombie.
    fn alive(pid: i32) -> bool {
        match fs_err::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    async fn wait_until_dead(pid: i32) -> bool {
        for _ in 0..200 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn steps_run_in_order_in_the_builder_directory_and_stop_at_the_first_failure() {
        let mut harness = Harness::new();
        let mut second = step("fail", "echo to-stderr >&2; exit 3");
        second.workdir = Some("sub/dir".into());
        harness.start(
            7,
            vec![
                step("first", "pwd; echo hello"),
                second,
                step("never", "echo never-runs"),
            ],
        );
        let (events, result) = harness.finish().await;
        assert_eq!(result.build_id, 7);
        assert_eq!(result.outcome, Outcome::Failure);
        assert_eq!(result.steps.len(), 2);
        assert_eq!(result.steps[0].outcome, Outcome::Success);
        assert_eq!(result.steps[0].exit_code, Some(0));
        assert_eq!(result.steps[1].outcome, Outcome::Failure);
        assert_eq!(result.steps[1].exit_code, Some(3));
        assert_eq!(result.reason.as_deref(), Some("step `fail` exited with 3"));
        let build_dir = harness.workdir.path().join("demo");
        assert!(
            result
                .log
                .starts_with(&format!("{}\nhello\n", build_dir.display())),
            "{}",
            result.log
        );
        assert!(result.log.contains("to-stderr"));
        assert!(!result.log.contains("never-runs"));
        assert!(build_dir.join("sub/dir").is_dir());
        assert_eq!(output_of(&events), result.log);
        let kinds: Vec<_> = events
            .iter()
            .filter(|event| !matches!(event, RunnerEvent::Output { .. }))
            .map(|event| match event {
                RunnerEvent::StepStarted { step, .. } => format!("started {step}"),
                RunnerEvent::StepFinished { result, .. } => format!("finished {}", result.step),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["started 0", "finished 0", "started 1", "finished 1"]
        );
    }

    /// Issue 8: output past the master's `max_log_bytes` does not cross
    /// the link. The step runs to its end (its pipe is still drained), the
    /// log says once that it is full, and the result's last line says how
    /// much was not sent.
    #[tokio::test]
    async fn output_past_max_log_bytes_is_not_sent_and_the_step_runs_on() {
        let mut harness = Harness::new();
        harness.start_capped(
            3,
            vec![step("loud", "seq 1 200000"), step("after", "echo after")],
            Some(8192),
        );
        let (events, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Success, "{}", result.log);
        assert_eq!(result.steps.len(), 2, "both steps ran");
        let sent = output_of(&events);
        assert!(sent.len() <= 8192, "{} bytes sent", sent.len());
        assert_eq!(
            sent.matches("log reached max_log_bytes (8192 bytes)")
                .count(),
            1,
            "{sent}"
        );
        assert!(!sent.contains("after\n"), "{sent}");
        assert!(result.log.starts_with(&sent));
        assert!(
            result.log.len() <= 8192,
            "{} bytes in the result",
            result.log.len()
        );
        // `seq 1 200000` writes 1,288,895 bytes: nearly all were withheld.
        let last = result.log.trim_end().lines().last().unwrap_or_default();
        let withheld: u64 = last
            .strip_prefix("[nightshift: ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in the last line {last:?}"));
        assert!(
            withheld > 1_280_000
                && last.ends_with("bytes of output past max_log_bytes were not sent]"),
            "{last}"
        );
    }

    #[tokio::test]
    async fn output_is_streamed_in_batches_and_kept_whole_in_the_log() {
        let mut harness = Harness::new();
        harness.start(1, vec![step("lines", "seq 1 20000")]);
        let (events, result) = harness.finish().await;
        let expected: String = (1..=20000).map(|n| format!("{n}\n")).collect();
        assert_eq!(result.log, expected);
        assert_eq!(output_of(&events), expected);
        let chunks = events
            .iter()
            .filter(|event| matches!(event, RunnerEvent::Output { .. }))
            .count();
        assert!(
            chunks < 100,
            "20000 lines should travel in a few batches, not {chunks}"
        );
    }

    #[tokio::test]
    #[allow(
        unsafe_code,
        reason = "set_var: the variables a real agent inherits from systemd"
    )]
    async fn steps_see_their_env_and_properties_but_never_the_systemd_socket() {
        // SAFETY: tests that read these variables are in this module only,
        // and no other test depends on them being unset.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", "/run/systemd/notify");
            std::env::set_var("WATCHDOG_USEC", "1000000");
            std::env::set_var("LISTEN_FDS", "1");
        }
        let mut harness = Harness::new();
        let mut env_step = step(
            "env",
            "echo \"notify=${NOTIFY_SOCKET-unset} watchdog=${WATCHDOG_USEC-unset} listen=${LISTEN_FDS-unset}\"; \
             echo \"greeting=$GREETING build=$NIGHTSHIFT_BUILD_ID builder=$NIGHTSHIFT_BUILDER branch=$NIGHTSHIFT_PROP_BRANCH_NAME\"",
        );
        env_step.env.insert("GREETING".into(), "hi there".into());
        harness.start(42, vec![env_step]);
        let (_, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Success);
        assert_eq!(
            result.log,
            "notify=unset watchdog=unset listen=unset\n\
             greeting=hi there build=42 builder=demo branch=main\n"
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_tree_including_grandchildren() {
        let mut harness = Harness::new();
        let mut slow = step(
            "slow",
            "sleep 300 & echo grandchild=$!; sh -c 'sleep 300' & wait",
        );
        slow.timeout_secs = Some(1);
        harness.start(3, vec![slow, step("after", "echo not-reached")]);
        let (events, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Timeout);
        assert_eq!(result.steps.len(), 1);
        assert_eq!(result.steps[0].outcome, Outcome::Timeout);
        assert!(
            result
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("timeout of 1 s"),
            "{:?}",
            result.reason
        );
        let log = output_of(&events);
        let pid: i32 = log
            .lines()
            .find_map(|line| line.strip_prefix("grandchild="))
            .and_then(|pid| pid.trim().parse().ok())
            .unwrap_or_else(|| panic!("no grandchild pid in {log:?}"));
        assert!(
            wait_until_dead(pid).await,
            "grandchild {pid} survived the timeout"
        );
        assert!(!result.log.contains("not-reached"));
    }

    #[tokio::test]
    async fn processes_that_left_the_steps_group_or_session_die_with_the_step() {
        let mut harness = Harness::new();
        // `setsid` and a double fork: neither is in the step's process group
        // after its parent is gone, and the step does not wait for them.
        harness.start(
            11,
            vec![step(
                "escape",
                "setsid sh -c 'echo setsid=$$; exec sleep 300' & \
                 sh -c 'sh -c \"echo orphan=\\$\\$; setsid sleep 300\" &'; \
                 sleep 1",
            )],
        );
        let (events, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Success, "{}", result.log);
        let log = output_of(&events);
        let pids: Vec<i32> = log
            .lines()
            .filter_map(|line| line.split_once('=')?.1.trim().parse().ok())
            .collect();
        assert_eq!(pids.len(), 2, "{log}");
        for pid in pids {
            assert!(wait_until_dead(pid).await, "{pid} outlived its step: {log}");
        }
    }

    #[tokio::test]
    async fn the_builds_processes_are_gone_before_its_artifacts_are_read() {
        let mut harness = Harness::new();
        let upload = StepSpec {
            upload: Some(nightshift_proto::wire::ArtifactUpload {
                patterns: vec!["dist/*".into()],
                max_file_bytes: 1 << 20,
                max_build_bytes: 1 << 20,
            }),
            ..step("artifacts", "upload artifacts dist/*")
        };
        harness.start(
            12,
            vec![
                step(
                    "daemon",
                    "setsid sh -c 'echo daemon=$$; exec sleep 300' & sleep 1",
                ),
                upload,
            ],
        );
        let (events, result) = harness.finish().await;
        // This harness has no master: the upload step fails, saying so.
        assert_eq!(result.outcome, Outcome::Failure, "{}", result.log);
        assert_eq!(result.steps.len(), 2, "{}", result.log);
        assert!(
            result.log.contains("no master to upload to"),
            "{}",
            result.log
        );
        let log = output_of(&events);
        let pid: i32 = log
            .lines()
            .find_map(|line| line.strip_prefix("daemon=")?.trim().parse().ok())
            .expect("the daemon's pid");
        assert!(
            wait_until_dead(pid).await,
            "a daemon of the last real step outlived it: {log}"
        );
    }

    #[tokio::test]
    async fn a_step_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let mut harness = Harness::new();
        let stubborn = step(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        );
        let control = harness.start(4, vec![stubborn]);
        loop {
            if let RunnerEvent::Output { data, .. } = harness.next().await
                && data.contains("ready")
            {
                break;
            }
        }
        control.cancel("owner wants the machine back");
        let (_, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Cancelled);
        assert_eq!(result.steps[0].signal, Some(libc::SIGKILL));
        assert_eq!(
            result.reason.as_deref(),
            Some("owner wants the machine back")
        );
    }

    #[tokio::test]
    async fn cancelling_stops_the_running_step_and_skips_the_rest() {
        let mut harness = Harness::new();
        let control = harness.start(
            5,
            vec![
                step("long", "echo started; sleep 300"),
                step("next", "echo no"),
            ],
        );
        loop {
            if let RunnerEvent::Output { data, .. } = harness.next().await
                && data.contains("started")
            {
                break;
            }
        }
        control.cancel("the master re-queued it");
        let (_, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Cancelled);
        assert_eq!(result.steps.len(), 1);
        assert_eq!(result.steps[0].signal, Some(libc::SIGTERM));
        assert!(!result.log.contains("no\n"));
    }

    #[tokio::test]
    async fn a_step_needing_locks_waits_for_its_grant() {
        let mut harness = Harness::new();
        let mut locked = step("locked", "echo in-lock");
        locked.needs_grant = true;
        let control = harness.start(6, vec![step("free", "true"), locked]);
        let mut waiting = false;
        while !waiting {
            match harness.next().await {
                RunnerEvent::StepWaiting { build_id, step, .. } => {
                    assert_eq!((build_id, step), (6, 1));
                    waiting = true;
                }
                RunnerEvent::StepStarted { step, .. } => assert_eq!(step, 0),
                RunnerEvent::Finished { .. } => panic!("finished without waiting for the grant"),
                _ => {}
            }
        }
        // Nothing starts before the grant...
        assert!(
            tokio::time::timeout(Duration::from_millis(300), harness.events.recv())
                .await
                .is_err()
        );
        control.grant(0); // a grant for another step is not this one's
        control.grant(1);
        let (_, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Success);
        assert_eq!(result.log, "in-lock\n");
    }

    #[tokio::test]
    async fn a_build_cancelled_while_waiting_for_locks_ends_cancelled() {
        let mut harness = Harness::new();
        let mut locked = step("locked", "echo in-lock");
        locked.needs_grant = true;
        let control = harness.start(8, vec![locked]);
        assert!(matches!(
            harness.next().await,
            RunnerEvent::StepWaiting { step: 0, .. }
        ));
        control.cancel("stop deadline");
        let (_, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Cancelled);
        assert!(result.steps.is_empty());
        assert_eq!(result.reason.as_deref(), Some("stop deadline"));
    }

    #[tokio::test]
    async fn paths_leaving_the_workdir_are_refused() {
        let mut harness = Harness::new();
        let mut escape = step("escape", "touch escaped");
        escape.workdir = Some("../..".into());
        harness.start(9, vec![escape]);
        let (_, result) = harness.finish().await;
        assert_eq!(result.outcome, Outcome::Failure);
        assert!(result.log.contains("contains `..`"), "{}", result.log);
        assert!(safe_join(Path::new("/w"), "/etc").is_err());
        assert_eq!(
            safe_join(Path::new("/w"), "a/./b").unwrap(),
            Path::new("/w/a/./b")
        );
    }

    #[test]
    fn split_utf8_characters_are_joined_across_reads() {
        let mut batch = Batch::default();
        let text = "grüße ✓";
        let bytes = text.as_bytes();
        for chunk in bytes.chunks(1) {
            batch.push(chunk);
        }
        assert_eq!(batch.take().as_deref(), Some(text));
        batch.push(b"bad \xff byte");
        assert_eq!(batch.take().as_deref(), Some("bad \u{FFFD} byte"));
        batch.push(b"\xe2\x9c");
        assert_eq!(batch.take(), None);
        assert_eq!(batch.finish().as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn a_huge_log_keeps_its_tail_and_says_what_was_dropped() {
        let mut log = Log::default();
        let line = "x".repeat(1023) + "\n";
        for _ in 0..2048 {
            log.push(&line);
        }
        log.push("the end\n");
        let text = log.finish();
        assert!(text.len() <= LOG_LIMIT + 200, "{}", text.len());
        assert!(text.starts_with("[nightshift: "));
        assert!(text.ends_with("the end\n"));
    }
}
