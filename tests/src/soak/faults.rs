//! The faults the soak injects (away flips, graceful stops, killed agents and master, an intruder) and the healing after them.

use super::*;

/// The faults a soak injects, in the order they take turns.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Away,
    AwayFor,
    Stop,
    StopDeadline,
    KillAgent,
    Intruder,
    KillMaster,
}

/// Master faults last, so `--no-master-faults` drops just them.
const FAULT_KINDS: &[Fault] = &[
    Fault::Away,
    Fault::Intruder,
    Fault::KillAgent,
    Fault::AwayFor,
    Fault::StopDeadline,
    Fault::Stop,
    Fault::KillMaster,
];

impl Soak {
    /// The next fault: the kinds take turns (so a short run meets each of
    /// them), on a random worker.
    pub(super) async fn inject(&mut self) -> anyhow::Result<()> {
        let worker = self.workers[self.rng.random_range(0..self.workers.len())].clone();
        if !self.running(&worker) {
            return Ok(());
        }
        let kinds = if self.config.master_faults {
            FAULT_KINDS
        } else {
            &FAULT_KINDS[..FAULT_KINDS.len() - 1]
        };
        let kind = kinds[self.faults.values().sum::<usize>() % kinds.len()];
        let logged = self.fault_log.len();
        let done = match kind {
            Fault::Away => self.away_flip(&worker, None).await,
            Fault::AwayFor => self.away_flip(&worker, Some("1s")).await,
            Fault::Stop => self.graceful_stop(&worker, None).await,
            Fault::StopDeadline => self.graceful_stop(&worker, Some("1s")).await,
            Fault::KillAgent => self.kill_agent(&worker).await,
            Fault::Intruder => self.intrude().await,
            Fault::KillMaster => self.kill_master().await,
        };
        if let Some(record) = self.fault_log.get_mut(logged) {
            record.ended = now_secs();
        }
        done
    }

    fn cli(&self, worker: &str, args: &[&str]) -> anyhow::Result<()> {
        let (code, out, err) = self.farm.worker_cli(worker, args)?;
        if code != 0 {
            bail!(
                "`worker {}` for {worker} exited {code}: {out}{err}",
                args.join(" ")
            );
        }
        Ok(())
    }

    async fn away_flip(&mut self, worker: &str, for_: Option<&str>) -> anyhow::Result<()> {
        match for_ {
            Some(for_) => {
                self.count("manual away --for 1s", Some(worker));
                let status = self.farm.worker_cli_json(
                    worker,
                    &["set-availability", "away", "--for", for_, "--json"],
                )?;
                let from = now_secs();
                // The manual state ends when the agent says (it was set
                // before the CLI returned, so a little before `from + 1 s`).
                let until = status["manual"]["until"].as_str().with_context(|| {
                    format!("`set-availability away --for` on {worker} says no end: {status}")
                })?;
                let until: jiff::Timestamp = until
                    .parse()
                    .with_context(|| format!("the end {until:?} of {worker}'s away"))?;
                self.away.push(AwayWindow {
                    worker: worker.to_owned(),
                    from,
                    to: until.as_nanosecond() as f64 / 1e9,
                    why: format!("away --for {for_}"),
                });
            }
            None => {
                self.count("away flip", Some(worker));
                self.cli(worker, &["set-availability", "away"])?;
                let from = now_secs();
                let hold = self.rng.random_range(100..1200);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                let to = now_secs();
                self.cli(worker, &["set-availability", "auto"])?;
                self.away.push(AwayWindow {
                    worker: worker.to_owned(),
                    from,
                    to,
                    why: "away".into(),
                });
            }
        }
        Ok(())
    }

    async fn graceful_stop(&mut self, worker: &str, deadline: Option<&str>) -> anyhow::Result<()> {
        let mut args = vec!["stop", "--graceful"];
        if let Some(deadline) = deadline {
            args.extend(["--deadline", deadline]);
            self.count("graceful stop with deadline", Some(worker));
        } else {
            self.count("graceful stop", Some(worker));
        }
        self.cli(worker, &args)?;
        let from = now_secs();
        let code = self
            .farm
            .wait_worker_exit(worker, Duration::from_secs(60))
            .await?;
        if code != Some(0) {
            bail!("`worker stop --graceful` left {worker} exiting with {code:?}");
        }
        let to = now_secs();
        if deadline.is_some() {
            self.downtimes.push(Downtime {
                worker: worker.to_owned(),
                at: to,
            });
        }
        self.away.push(AwayWindow {
            worker: worker.to_owned(),
            from,
            to,
            why: "stopping".into(),
        });
        self.farm.restart_worker(worker)?;
        self.farm.wait_worker_ready(worker).await
    }

    async fn kill_agent(&mut self, worker: &str) -> anyhow::Result<()> {
        self.count("SIGKILL agent", Some(worker));
        self.farm.kill_worker(worker)?;
        self.downtimes.push(Downtime {
            worker: worker.to_owned(),
            at: now_secs(),
        });
        let down = self.rng.random_range(0..3000);
        tokio::time::sleep(Duration::from_millis(down)).await;
        self.farm.restart_worker(worker)?;
        self.farm.wait_worker_ready(worker).await
    }

    async fn kill_master(&mut self) -> anyhow::Result<()> {
        self.count("SIGKILL master", None);
        self.farm.kill_master().await?;
        let down = self.rng.random_range(0..1500);
        tokio::time::sleep(Duration::from_millis(down)).await;
        self.farm.start_master().await
    }

    /// A worker with a valid token that no builder lists tries to adopt and
    /// finish builds that are not its own, and floods the master.
    async fn intrude(&mut self) -> anyhow::Result<()> {
        self.count("intruder (adopt, forge, flood)", None);
        let token = self.farm.worker_spec(INTRUDER)?.token.clone();
        let Ok(mut agent) = FakeAgent::connect(&self.farm, Some(&token)).await else {
            return Ok(());
        };
        let recent: Vec<BuildId> = self.submitted.iter().rev().take(8).copied().collect();
        agent
            .hello(INTRUDER, PresenceState::Available, 1, recent.clone())
            .await?;
        let now = jiff::Timestamp::now();
        for id in &recent {
            let forged = AgentMessage::BuildFinished {
                result: BuildResult {
                    build_id: *id,
                    outcome: Outcome::Success,
                    steps: vec![],
                    reason: None,
                    log: FORGED.into(),
                    finished_at: now,
                },
            };
            if agent.send(&forged).await.is_err() {
                break;
            }
        }
        for i in 0..2000 {
            let state = if i % 2 == 0 {
                PresenceState::Away
            } else {
                PresenceState::Available
            };
            let frame = AgentMessage::Presence {
                presence: presence(state),
                outlook: None,
            };
            if agent.send(&frame).await.is_err() {
                // Disconnected for flooding: what we want.
                break;
            }
        }
        agent.close().await;
        Ok(())
    }

    /// Every worker back, available and running; the master running.
    pub(super) async fn heal(&mut self) -> anyhow::Result<()> {
        for worker in self.workers.clone() {
            if !self.running(&worker) {
                self.farm.restart_worker(&worker)?;
                self.farm.wait_worker_ready(&worker).await?;
            }
            // Back to auto ends any `away --for` still running: the away
            // window the checker holds the master to ends here.
            let now = now_secs();
            for away in self.away.iter_mut().filter(|a| a.worker == worker) {
                away.to = away.to.min(now);
            }
            self.cli(&worker, &["set-availability", "auto"])?;
        }
        Ok(())
    }

    /// The windowed workers' stretches outside their windows (before the
    /// first, between two, after the last): nothing may start there.
    pub(super) fn closed_stretches(&self, end: f64) -> Vec<AwayWindow> {
        let mut stretches = Vec::new();
        for worker in &self.windowed {
            let mut from = self.began;
            let mut why = "away before its first window".to_owned();
            for window in self.windows.iter().filter(|w| &w.worker == worker) {
                stretches.push(AwayWindow {
                    worker: worker.clone(),
                    from,
                    to: window.requested,
                    why: why.clone(),
                });
                from = window.closes + CLOSE_PUSH_GRACE;
                why = "window's close".to_owned();
            }
            stretches.push(AwayWindow {
                worker: worker.clone(),
                from,
                to: end,
                why,
            });
        }
        stretches
    }

    /// What admission promised for the windowed workers: every build handed
    /// out in a window with its builder's estimate known ends before the
    /// close, and none is admitted whose estimate does not fit.
    pub(super) fn check_windows(
        &self,
        finished: &BTreeMap<BuildId, BuildInfo>,
        report: &mut SoakReport,
    ) {
        report.windows = self.windows.len();
        let secs = |t: jiff::Timestamp| t.as_nanosecond() as f64 / 1e9;
        // Each builder's successful runs, as the master measures them
        // (hand-out to the end), by when they finished.
        let mut history: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for build in finished.values() {
            if let (Some(Outcome::Success), Some(started), Some(end)) =
                (build.outcome, build.started_at, build.finished_at)
            {
                history
                    .entry(build.builder.as_str())
                    .or_default()
                    .push((secs(end), secs(end) - secs(started)));
            }
        }
        for runs in history.values_mut() {
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        for (id, build) in finished {
            let (Some(worker), Some(started), Some(ended)) =
                (build.worker.as_deref(), build.started_at, build.finished_at)
            else {
                continue;
            };
            let (started, ended) = (secs(started), secs(ended));
            let Some(window) = self
                .windows
                .iter()
                .find(|w| w.worker == worker && w.requested <= started && started < w.closes)
            else {
                continue;
            };
            report.windowed_builds += 1;
            let estimate = history
                .get(build.builder.as_str())
                .and_then(|runs| estimate_at(runs, started));
            if ended > window.closes {
                let past = ended - window.closes;
                report.ran_past_max_secs = report.ran_past_max_secs.max(past);
                if estimate.is_some() {
                    report.ran_past_window += 1;
                    report.ran_past.push(format!(
                        "build {id} of {} on {worker} ran {past:.3} s past its window's close \
                         (estimate {estimate:.3?} s, started {:.3} s before the close)",
                        build.builder,
                        window.closes - started
                    ));
                } else {
                    report.ran_past_without_estimate += 1;
                }
            }
            if let Some(estimate) = estimate
                && started + estimate > window.closes + ESTIMATE_TOLERANCE
            {
                report.admitted_past_window += 1;
                report.violations.push(format!(
                    "build {id} of {} was handed to {worker} {:.3} s before its window's close \
                     with an estimate of {estimate:.3} s",
                    build.builder,
                    window.closes - started
                ));
            }
        }
    }
}
