//! Checking a soak's ledger and the master's records against the promises: no build in an away window, none lost or run twice, estimates within tolerance.

use super::*;

impl Soak {
    /// Waits for every build, then checks the promises.
    pub(super) async fn check(&mut self) -> anyhow::Result<SoakReport> {
        let mut report = SoakReport {
            builds: self.submitted.len(),
            faults_injected: self.faults.values().sum(),
            faults: self.faults.clone(),
            fault_log: self.fault_log.clone(),
            ..SoakReport::default()
        };
        let deadline = Instant::now() + self.config.drain_deadline;
        let mut finished: BTreeMap<BuildId, BuildInfo> = BTreeMap::new();
        let pending: BTreeSet<BuildId> = self.submitted.iter().copied().collect();
        while finished.len() < pending.len() && Instant::now() < deadline {
            let api = self.farm.api()?;
            let open: Vec<BuildId> = pending
                .iter()
                .filter(|id| !finished.contains_key(id))
                .copied()
                .collect();
            for id in open {
                if let Ok(build) = api.build(id).await
                    && build.state == BuildState::Finished
                {
                    finished.insert(id, build);
                }
            }
            if finished.len() < pending.len() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        for id in pending.iter().filter(|id| !finished.contains_key(id)) {
            report.lost += 1;
            let state = self.farm.api()?.build(*id).await.map(|b| b.state);
            report
                .violations
                .push(format!("build {id} never finished (state {state:?})"));
        }

        let (entries, torn) = read_ledger(&self.ledger);
        report.ledger_torn = torn;
        // Runs per build: how many times its first step started.
        let mut runs: BTreeMap<BuildId, Vec<&Entry>> = BTreeMap::new();
        for entry in entries.iter().filter(|e| e.event == "start") {
            runs.entry(entry.build).or_default().push(entry);
        }
        for (id, build) in &finished {
            let count = runs.get(id).map_or(0, Vec::len) as u32;
            if build.retries > 0 {
                report.retried += 1;
            }
            if count > 1 + build.retries || (count > 1 && build.retry_reason.is_none()) {
                report.duplicated += 1;
                let starts = runs.get(id).map(Vec::as_slice).unwrap_or_default();
                let first = starts.first().map_or(0.0, |e| e.at);
                let last = starts.last().map_or(0.0, |e| e.at);
                let where_ = starts
                    .iter()
                    .map(|e| format!("{} at {:.3}", e.worker, e.at))
                    .collect::<Vec<_>>()
                    .join(", ");
                report.violations.push(format!(
                    "build {id} ran {count} times with retries {} and reason {:?} \
                     (started on {where_}; faults around: {})",
                    build.retries,
                    build.retry_reason,
                    self.faults_around(first - FAULT_LOOKBACK, last)
                ));
            }

            // Every step decides its own exit from the build id: `flaky`
            // fails when the id is a multiple of 4, the others never.
            let expected = if build.builder == "flaky" && id % 4 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            if build.outcome != Some(expected) {
                report.wrong_outcome += 1;
                report.violations.push(format!(
                    "build {id} of {} ended {:?}, its steps make it {expected:?} ({:?})",
                    build.builder, build.outcome, build.reason
                ));
            }
            if build.worker.as_deref() == Some(INTRUDER) {
                report.forged_accepted += 1;
                report
                    .violations
                    .push(format!("build {id} is recorded as run by the intruder"));
            }
        }
        for id in finished.keys() {
            if let Ok(log) = self.farm.api()?.log(*id).await
                && log.log.contains(FORGED)
            {
                report.forged_accepted += 1;
                report
                    .violations
                    .push(format!("build {id} carries a forged result"));
            }
        }
        // A build handed out and accepted just before the away was
        // acknowledged may start its first step just after: what counts is
        // when the master handed it out (`started_at` of its last run).
        let closed = self.closed_stretches(now_secs());
        for (id, build) in &finished {
            let (Some(worker), Some(started)) = (build.worker.as_deref(), build.started_at) else {
                continue;
            };
            let at = started.as_nanosecond() as f64 / 1e9;
            for window in self
                .away
                .iter()
                .chain(&closed)
                .filter(|w| w.worker == worker)
            {
                if at > window.from && at < window.to {
                    report.started_while_away += 1;
                    report.violations.push(format!(
                        "build {id} was handed to {worker} at {at:.3}, {:.3} s after its {} was acknowledged",
                        at - window.from,
                        window.why
                    ));
                }
            }
        }
        report.lock_overlaps = self.lock_overlaps(&entries, &mut report.violations);
        self.check_windows(&finished, &mut report);
        Ok(report)
    }

    /// The faults that were under way between `from` and `to`, in words.
    fn faults_around(&self, from: f64, to: f64) -> String {
        let near: Vec<String> = self
            .fault_log
            .iter()
            .filter(|f| f.ended >= from && f.began <= to)
            .map(|f| {
                format!(
                    "{}{} {:.3}..{:.3}",
                    f.kind,
                    f.worker
                        .as_deref()
                        .map(|w| format!(" on {w}"))
                        .unwrap_or_default(),
                    f.began,
                    f.ended
                )
            })
            .collect();
        if near.is_empty() {
            "none".to_owned()
        } else {
            near.join("; ")
        }
    }

    /// Lock holds from the ledger (`acquire` to `release`, or to the holder's
    /// forced end); with `max_count = 1` no two may overlap.
    pub(super) fn lock_overlaps(&self, entries: &[Entry], violations: &mut Vec<String>) -> usize {
        let mut holds: Vec<(f64, f64, BuildId, String)> = Vec::new();
        let end_of_run = now_secs();
        for acquire in entries.iter().filter(|e| e.event == "acquire") {
            let release = entries
                .iter()
                .filter(|e| {
                    e.event == "release"
                        && e.build == acquire.build
                        && e.worker == acquire.worker
                        && e.at >= acquire.at
                })
                .map(|e| e.at)
                .fold(f64::INFINITY, f64::min);
            let forced = self
                .downtimes
                .iter()
                .filter(|d| d.worker == acquire.worker && d.at >= acquire.at)
                .map(|d| d.at)
                .fold(f64::INFINITY, f64::min);
            let end = release.min(forced).min(end_of_run);
            holds.push((acquire.at, end, acquire.build, acquire.worker.clone()));
        }
        holds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut overlaps = 0;
        let mut latest: Option<&(f64, f64, BuildId, String)> = None;
        for hold in &holds {
            if let Some(previous) = latest {
                if hold.0 < previous.1 {
                    overlaps += 1;
                    let mut line = String::new();
                    let _ = write!(
                        line,
                        "lock {LOCK}: build {} on {} took it at {:.3} while build {} on {} held it \
                         (from {:.3}) until {:.3} (faults around: {})",
                        hold.2,
                        hold.3,
                        hold.0,
                        previous.2,
                        previous.3,
                        previous.0,
                        previous.1,
                        self.faults_around(previous.0 - FAULT_LOOKBACK, hold.0)
                    );
                    violations.push(line);
                }
                if hold.1 > previous.1 {
                    latest = Some(hold);
                }
            } else {
                latest = Some(hold);
            }
        }
        overlaps
    }
}

/// The master's estimate for a build handed out at `at`: the longest of
/// the last 20 successful runs that finished before plus a margin (half the
/// spread between their median and the longest, at least a tenth of the
/// longest and at least 1 s), unknown under 3 (as
/// `master/src/scheduler/estimate.rs`).
pub(super) fn estimate_at(runs: &[(f64, f64)], at: f64) -> Option<f64> {
    const WINDOW: usize = 20;
    const MIN_SAMPLES: usize = 3;
    let before = runs.partition_point(|(ended, _)| *ended < at);
    let recent = &runs[before.saturating_sub(WINDOW)..before];
    if recent.len() < MIN_SAMPLES {
        return None;
    }
    let mut took: Vec<f64> = recent.iter().map(|(_, took)| *took).collect();
    took.sort_by(f64::total_cmp);
    let longest = *took.last()?;
    let median = took[(took.len() - 1) / 2];
    let margin = ((longest - median) / 2.0).max(longest / 10.0).max(1.0);
    Some(longest + margin)
}
