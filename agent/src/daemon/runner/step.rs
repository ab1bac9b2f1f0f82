//! Running one step: spawning it in its group and cgroup, streaming its output under credit, timeout, cancel and kill.

use super::*;

impl Build {
    pub(super) async fn run_step(
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
        tracing::debug!(
            target: nightshift_proto::log::HANDOFF,
            "build {}: step {step_no} starting",
            self.request.build_id
        );
        let (mut child, reader) = match self.spawn_step(step, &dir, cgroup).await {
            Ok(spawned) => spawned,
            Err(error) => {
                let text = format!("step `{}`: cannot start `sh`: {error}", step.name);
                self.note(step_no, &format!("nightshift: {text}\n")).await;
                return failed(text);
            }
        };
        tracing::debug!(
            target: nightshift_proto::log::HANDOFF,
            "build {}: step {step_no} spawned",
            self.request.build_id
        );
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

    async fn spawn_step(
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
        let source = crate::daemon::checkout::source_env(self.request.source.as_ref())
            .into_iter()
            .map(|(name, value)| var(name, value));
        // Credentials reach the checkout step only, never a build's own steps.
        let auth = step
            .checkout
            .then(|| crate::daemon::checkout::auth_env(&self.settings.git))
            .into_iter()
            .flatten()
            .map(|(name, value)| var(name, value));
        let step_env = step.env.iter().map(|(name, value)| var(name, value));
        let script = match step.checkout {
            true => crate::daemon::checkout::script(self.request.source.as_ref()),
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
        })
        .await?;
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        Ok((child, reader))
    }
}
