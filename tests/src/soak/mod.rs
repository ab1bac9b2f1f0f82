//! The fault soak: a real master and real agents run many builds with random
//! steps and lock claims while faults are injected at random (away flips,
//! manual `--for`, graceful stops with and without deadlines, SIGKILLed
//! agents, a SIGKILLed and restarted master, an intruding agent that floods
//! frames and forges results). Afterwards the farm's promises are checked
//! from the master's API and from a ledger every step appends to.
//!
//! Beside the faulty workers run windowed ones: `away` by default, their
//! owner opens a short window now and then (`set-availability available
//! --for 1s..4s`, whose end the agent announces to the master as its
//! outlook). Window-aware admission must start no build there that the
//! window's close would cut: the report counts builds that ran past their
//! window's close although their builder's estimate was known
//! (`ran_past_window`, goal 0), and a build admitted although its estimate
//! did not fit is a violation.
//!
//! Used by the `nightshift-soak` binary (long runs) and by `tests/tests/soak.rs`
//! (a short seeded run in the test suite).

use std::collections::{BTreeMap, BTreeSet};

mod check;
mod faults;
mod setup;

use check::*;
use setup::*;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use nightshift_policy::PresenceState;
use nightshift_proto::api::{BuildInfo, BuildState};
use nightshift_proto::wire::{AgentMessage, BuildId, BuildResult, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::{FakeAgent, Farm, WorkerSpec, presence};

/// The lock every `locked` build's middle step claims; `max_count = 1`.
const LOCK: &str = "soak-lock";
/// The name of the intruder: a worker with a valid token whom no builder lists.
const INTRUDER: &str = "intruder";
/// What the intruder writes into the results it forges.
const FORGED: &str = "FORGED-BY-INTRUDER";

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub builds: usize,
    pub workers: usize,
    /// Workers that take builds only in short windows their owner opens.
    pub windowed: usize,
    pub seed: u64,
    /// Also SIGKILL and restart the master.
    pub master_faults: bool,
    /// Longest wait for the last builds to finish after the faults stop.
    pub drain_deadline: Duration,
    /// Keep the farm's directory (master and worker logs, the database,
    /// the ledger) after the run even when it is clean; it is always kept
    /// when a violation is found.
    pub keep_dir: bool,
}

impl Default for SoakConfig {
    fn default() -> SoakConfig {
        SoakConfig {
            builds: 1000,
            workers: 4,
            windowed: 2,
            seed: 1,
            master_faults: true,
            drain_deadline: Duration::from_secs(300),
            keep_dir: false,
        }
    }
}

/// What a run saw; every count but `builds`, `faults_injected`, `retried`,
/// `windows`, `windowed_builds` and the `ran_past_*` figures must be 0.
/// `ran_past_window` is a figure with goal 0, not a violation: an estimate
/// bounds the builder's recent runs with a margin, and a build may still
/// take longer than all of them (a machine suddenly loaded).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    pub builds: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub started_while_away: usize,
    pub lock_overlaps: usize,
    pub forged_accepted: usize,
    /// Builds whose outcome is not the one their steps determine.
    pub wrong_outcome: usize,
    pub faults_injected: usize,
    pub retried: usize,
    /// Windows the windowed workers' owners opened.
    pub windows: usize,
    /// Builds handed to a windowed worker inside a window.
    pub windowed_builds: usize,
    /// Of those, builds that ran past the window's close although their
    /// builder's estimate was known when they started (goal 0).
    pub ran_past_window: usize,
    /// Of those, builds that ran past the close while their builder's
    /// estimate was still unknown (admission cannot hold them back).
    pub ran_past_without_estimate: usize,
    /// The longest run past a close, seconds (0 when none).
    pub ran_past_max_secs: f64,
    /// Builds started in a window whose rest was shorter than their
    /// builder's estimate (admission's own error; must be 0).
    pub admitted_past_window: usize,
    pub seconds: f64,
    /// One line per violation, for the log.
    pub violations: Vec<String>,
    /// One line per build that ran past its window's close.
    pub ran_past: Vec<String>,
    /// Faults by kind.
    pub faults: BTreeMap<String, usize>,
    /// Every fault injected, in order, with when it began and ended.
    pub fault_log: Vec<FaultRecord>,
    /// The farm's directory (master.log, workers/*/worker.log, data/,
    /// ledger), when it was kept.
    pub kept_dir: Option<String>,
    /// Ledger lines a killed step left torn (skipped by the checks).
    pub ledger_torn: Vec<String>,
}

/// One injected fault: what, on which worker, from when until when
/// (seconds since the epoch, as in the ledger).
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: String,
    /// The worker it hit (`None` for the master and the intruder).
    pub worker: Option<String>,
    pub began: f64,
    pub ended: f64,
}

impl SoakReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// The one summary line.
    pub fn summary(&self) -> String {
        format!(
            "builds {}, lost {}, duplicated {}, started-while-away {}, lock overlaps {}, \
             forged accepted {}, wrong outcome {}, faults injected {}, retried {}, \
             windows {}, builds in windows {}, ran past the window {} (without estimate {}, \
             at most {:.2} s), admitted past the window {}, {:.0} s",
            self.builds,
            self.lost,
            self.duplicated,
            self.started_while_away,
            self.lock_overlaps,
            self.forged_accepted,
            self.wrong_outcome,
            self.faults_injected,
            self.retried,
            self.windows,
            self.windowed_builds,
            self.ran_past_window,
            self.ran_past_without_estimate,
            self.ran_past_max_secs,
            self.admitted_past_window,
            self.seconds
        )
    }
}

/// A stretch during which a worker must start no build: from the moment its
/// `away` (or stop) was acknowledged until it was asked back.
#[derive(Debug, Clone)]
struct AwayWindow {
    worker: String,
    from: f64,
    to: f64,
    why: String,
}

/// When a worker's builds stopped by force (SIGKILL, a stop deadline): lock
/// holds without a `release` end there.
#[derive(Debug, Clone)]
struct Downtime {
    worker: String,
    at: f64,
}

/// A window a windowed worker's owner opened: asked for at `requested`,
/// taking builds until `closes` (what the agent announced).
#[derive(Debug, Clone)]
struct OpenWindow {
    worker: String,
    requested: f64,
    closes: f64,
}

/// How far before a violation the faults that may explain it are looked
/// for (a master restart re-queues after `missing_timeout`, 2 s here).
const FAULT_LOOKBACK: f64 = 10.0;

/// How long after a window's close the master may still hand out a build
/// before the agent's `away` reaches it (the agent refuses such a build;
/// it is re-queued and runs elsewhere).
const CLOSE_PUSH_GRACE: f64 = 0.5;

/// Tolerance when re-computing the master's estimate from the API's
/// figures (stored to the microsecond; a build adopted after its worker
/// came back counts from the adoption in the store, and not at all in the
/// master's memory).
const ESTIMATE_TOLERANCE: f64 = 0.2;

struct Soak {
    config: SoakConfig,
    farm: Farm,
    rng: StdRng,
    workers: Vec<String>,
    windowed: Vec<String>,
    windows: Vec<OpenWindow>,
    began: f64,
    ledger: PathBuf,
    submitted: Vec<BuildId>,
    away: Vec<AwayWindow>,
    downtimes: Vec<Downtime>,
    faults: BTreeMap<String, usize>,
    fault_log: Vec<FaultRecord>,
}

/// Runs a soak and returns what it saw.
pub async fn run(config: SoakConfig) -> anyhow::Result<SoakReport> {
    let started = Instant::now();
    let began = now_secs();
    let workers: Vec<String> = (1..=config.workers).map(|i| format!("w{i}")).collect();
    let windowed: Vec<String> = (1..=config.windowed).map(|i| format!("v{i}")).collect();
    let ledger_dir = tempfile::Builder::new()
        .prefix("nightshift-soak-")
        .tempdir()
        .context("cannot create the ledger dir")?;
    let ledger = ledger_dir.path().join("ledger");
    let mut builder = Farm::builder()
        .missing_timeout("2s")
        .master_toml(&master_toml(&ledger, &workers, &windowed))
        .worker(WorkerSpec::new(INTRUDER));
    for (i, name) in workers.iter().enumerate() {
        builder = builder.worker(WorkerSpec::new(name).max_builds(1 + (i % 2) as u32));
    }
    for name in &windowed {
        builder = builder
            .worker(WorkerSpec::new(name).worker_toml("[availability]\ndefault = \"away\"\n"));
    }
    let mut farm = builder.start().await?;
    for name in workers.iter().chain(&windowed) {
        farm.start_worker(name)?;
    }
    for name in workers.iter().chain(&windowed) {
        farm.wait_worker_ready(name).await?;
    }
    let mut soak = Soak {
        rng: StdRng::seed_from_u64(config.seed),
        config,
        farm,
        workers,
        windowed,
        windows: Vec::new(),
        began,
        ledger,
        submitted: Vec::new(),
        away: Vec::new(),
        downtimes: Vec::new(),
        faults: BTreeMap::new(),
        fault_log: Vec::new(),
    };
    soak.drive().await?;
    let mut report = soak.check().await?;
    report.seconds = started.elapsed().as_secs_f64();
    if soak.config.keep_dir || !report.is_clean() {
        // Everything a failure is read from afterwards, in one place.
        let dir = soak.farm.dir.path().to_path_buf();
        let copied = fs_err::copy(&soak.ledger, dir.join("ledger"));
        if let Err(e) = copied {
            report
                .violations
                .push(format!("cannot keep the ledger: {e}"));
        }
        fs_err::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&report).context("the report serializes")?,
        )?;
        soak.farm.dir.disable_cleanup(true);
        report.kept_dir = Some(dir.display().to_string());
    }
    drop(ledger_dir);
    Ok(report)
}

impl Soak {
    /// Submits every build, injecting a fault now and then, then heals the
    /// farm so every build can finish.
    async fn drive(&mut self) -> anyhow::Result<()> {
        while self.submitted.len() < self.config.builds {
            let batch = self
                .rng
                .random_range(1..=4)
                .min(self.config.builds - self.submitted.len());
            for _ in 0..batch {
                // Mostly short builds; a few long enough for a stop deadline
                // to cut them.
                let builder = [
                    "quick", "flaky", "locked", "quick", "flaky", "locked", "slow",
                ][self.rng.random_range(0..7)];
                let id = self.submit(builder).await?;
                self.submitted.push(id);
            }
            if self.rng.random_bool(0.6) {
                self.inject().await?;
            }
            self.open_windows()?;
            let pause = self.rng.random_range(20..250);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self.heal().await
    }

    /// Submits, retrying while the master is down (it restarts itself only
    /// when a fault says so, so a failure here is a fault in progress).
    async fn submit(&mut self, builder: &str) -> anyhow::Result<BuildId> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.farm.api()?.submit(builder, Default::default()).await {
                Ok(response) => return Ok(response.build_id),
                Err(error) if Instant::now() > deadline => {
                    bail!("cannot submit to {builder}: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Now and then the owner of a windowed worker whose last window has
    /// closed opens a new one of 1 to 4 s (`set-availability available
    /// --for`); the close it announces is the manual state's end.
    fn open_windows(&mut self) -> anyhow::Result<()> {
        for worker in self.windowed.clone() {
            let now = now_secs();
            let open = self
                .windows
                .iter()
                .rev()
                .find(|w| w.worker == worker)
                .is_some_and(|w| w.closes + CLOSE_PUSH_GRACE > now);
            if open || !self.rng.random_bool(0.3) {
                continue;
            }
            let length = format!("{}s", self.rng.random_range(1..=4));
            let requested = now_secs();
            let status = self.farm.worker_cli_json(
                &worker,
                &["set-availability", "available", "--for", &length, "--json"],
            )?;
            let until = status["manual"]["until"]
                .as_str()
                .or_else(|| status["presence"]["until"].as_str())
                .with_context(|| {
                    format!("`set-availability --for` on {worker} says no end: {status}")
                })?;
            let closes: jiff::Timestamp = until
                .parse()
                .with_context(|| format!("the end {until:?} of {worker}'s window"))?;
            self.windows.push(OpenWindow {
                worker,
                requested,
                closes: closes.as_nanosecond() as f64 / 1e9,
            });
        }
        Ok(())
    }

    /// Counts a fault of `kind` on `worker` (none for the master or the
    /// intruder) and logs when it began; [`Soak::inject`] notes its end.
    fn count(&mut self, kind: &str, worker: Option<&str>) {
        *self.faults.entry(kind.to_owned()).or_default() += 1;
        let now = now_secs();
        self.fault_log.push(FaultRecord {
            kind: kind.to_owned(),
            worker: worker.map(str::to_owned),
            began: now,
            ended: now,
        });
    }

    fn running(&mut self, name: &str) -> bool {
        self.farm.agent(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::estimate_at;

    #[test]
    fn the_estimate_is_the_masters_bound_of_runs_finished_before() {
        let runs: Vec<(f64, f64)> = (1..=10)
            .map(|i| (f64::from(i), 10.0 * f64::from(i)))
            .collect();
        assert_eq!(estimate_at(&runs, 3.0), None, "two runs before");
        // 10, 20, 30 s: longest 30, median 20, margin 5 → a tenth, 3 → 5.
        assert_eq!(estimate_at(&runs, 3.5), Some(35.0));
        // 10..=100 s: longest 100, median 50, margin 25.
        assert_eq!(estimate_at(&runs, 100.0), Some(125.0));
        // Short runs: at least 1 s of margin.
        let quick = [(1.0, 0.2), (2.0, 0.3), (3.0, 0.25)];
        let estimate = estimate_at(&quick, 4.0).expect("three runs before");
        assert!((estimate - 1.3).abs() < 1e-9, "{estimate}");
    }
}
