//! Build events of the event loop: starting builds, their runner's progress,
//! and their results.

use nightshift_proto::wire::{AgentMessage, BuildId, BuildResult};

use crate::daemon::runner::{self, BuildRequest, RunnerEvent};

use crate::handle::RunningBuild;

use super::{Build, Daemon, Disposition, Outgoing, TAIL_LINES};

impl Daemon {
    /// Starts `request` (unless refused); `holds_locks`: it holds
    /// master-wide locks for its whole run (the lock fence watches it).
    pub(super) fn start_build(&mut self, request: BuildRequest, holds_locks: bool) {
        let build_id = request.build_id;
        tracing::debug!(target: nightshift_proto::log::HANDOFF, "build {build_id}: offered");
        if self.builds.contains_key(&build_id) {
            // The master re-sent a build we run: it is ours already.
            self.send(AgentMessage::BuildAccepted { build_id });
            return;
        }
        // The presence at this instant: a window may have closed a moment
        // ago while the loop, busy or starved of CPU, has not yet handled
        // the policy boundary (the master is told at once, too).
        self.reevaluate();
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
        tracing::debug!(target: nightshift_proto::log::HANDOFF, "build {build_id}: accepted");
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
                holds_locks,
                granted_step: None,
                fenced: false,
            },
        );
        // Told after the runner is spawned, so the step's start runs ahead
        // of writing this frame (the runner's own frames go through this
        // loop, so they still follow it on the wire).
        self.send(AgentMessage::BuildAccepted { build_id });
        self.update_hello_running();
    }

    pub(super) fn update_hello_running(&mut self) {
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

    pub(super) fn on_runner(&mut self, event: RunnerEvent) {
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
                if let Some(build) = self.builds.get_mut(&build_id)
                    && build.granted_step == Some(result.step)
                {
                    // Its locks go back once the master hears of the end.
                    build.granted_step = None;
                }
                self.send(Outgoing {
                    message: AgentMessage::StepFinished { build_id, result },
                    credit,
                });
            }
            RunnerEvent::Finished { result } => self.build_finished(result),
        }
    }

    pub(super) fn set_step(&mut self, build_id: BuildId, step: u32) {
        if let Some(build) = self.builds.get_mut(&build_id) {
            build.status.step = step;
            build.status.step_name = build
                .step_names
                .get(step as usize)
                .cloned()
                .unwrap_or_default();
        }
    }

    pub(super) fn build_finished(&mut self, result: BuildResult) {
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
}

/// Keeps the last [`TAIL_LINES`] lines of a build's output.
pub(super) fn push_tail(tail: &mut Vec<String>, data: &str) {
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
