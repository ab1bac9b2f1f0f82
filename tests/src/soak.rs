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
/// is a 90th percentile, and a build may take longer than its builders'
/// recent ones.
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

/// Seconds since the epoch, as `date +%s.%N` prints them in the ledger.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A step command that appends `<build> <event> <worker dir> <time>` to the ledger.
fn ledger_line(ledger: &Path, event: &str) -> String {
    format!(
        "printf '%s %s %s %s\\n' \"$NIGHTSHIFT_BUILD_ID\" {event} \"$PWD\" \"$(date +%s.%N)\" >> {}",
        ledger.display()
    )
}

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// The builders' configs: `workers` take every builder, `windowed` ones
/// every builder but `locked` (whose duration is mostly the wait for the
/// lock, which no estimate foresees).
fn master_toml(ledger: &Path, workers: &[String], windowed: &[String]) -> String {
    let locked_list = workers
        .iter()
        .map(|w| toml_str(w))
        .collect::<Vec<_>>()
        .join(", ");
    let list = workers
        .iter()
        .chain(windowed)
        .map(|w| toml_str(w))
        .collect::<Vec<_>>()
        .join(", ");
    let start = toml_str(&ledger_line(ledger, "start"));
    let work = toml_str("sleep 0.0$((NIGHTSHIFT_BUILD_ID % 10))");
    let flaky =
        toml_str("sleep 0.0$((NIGHTSHIFT_BUILD_ID % 5)); exit $((NIGHTSHIFT_BUILD_ID % 4 == 0))");
    // A cancel (SIGTERM to the step's group) ends the hold too: the trap
    // writes the release once `sleep` is gone, so a cancelled hold is not
    // taken for one that lasts until the worker's next downtime.
    let critical = toml_str(&format!(
        "release() {{ {}; }}; {}; trap 'release; exit 143' TERM; \
         sleep 0.$((NIGHTSHIFT_BUILD_ID % 3 + 1)); release",
        ledger_line(ledger, "release"),
        ledger_line(ledger, "acquire"),
    ));
    let end = toml_str(&ledger_line(ledger, "end"));
    format!(
        r#"
[[lock]]
name = "{LOCK}"
scope = "master"
max_count = 1

[[builder]]
name = "quick"
workers = [{list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "work", command = {work} }},
  {{ name = "end", command = {end} }},
]

[[builder]]
name = "flaky"
workers = [{list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "work", command = {flaky} }},
]

[[builder]]
name = "slow"
workers = [{list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "work", command = "sleep 1.$((NIGHTSHIFT_BUILD_ID % 9))" }},
  {{ name = "end", command = {end} }},
]

[[builder]]
name = "locked"
workers = [{locked_list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "critical", command = {critical}, locks = [{{ name = "{LOCK}", access = "exclusive" }}] }},
  {{ name = "end", command = {end} }},
]
"#
    )
}

/// One line of the ledger.
#[derive(Debug, Clone)]
struct Entry {
    build: BuildId,
    event: String,
    worker: String,
    at: f64,
}

fn read_ledger(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    let mut entries = Vec::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(build), Some(event), Some(dir), Some(at)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("ledger line {line:?} is torn");
        };
        // `<farm>/workers/<name>/work/<builder>`
        let worker = Path::new(dir)
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        entries.push(Entry {
            build: build
                .parse()
                .with_context(|| format!("ledger line {line:?}"))?,
            event: event.to_owned(),
            worker,
            at: at
                .parse()
                .with_context(|| format!("ledger line {line:?}"))?,
        });
    }
    Ok(entries)
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
/// figures (the master measures from the agent's step start, a restarted
/// master re-seeds from hand-out times).
const ESTIMATE_TOLERANCE: f64 = 0.2;

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

    /// The next fault: the kinds take turns (so a short run meets each of
    /// them), on a random worker.
    async fn inject(&mut self) -> anyhow::Result<()> {
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
    async fn heal(&mut self) -> anyhow::Result<()> {
        for worker in self.workers.clone() {
            if !self.running(&worker) {
                self.farm.restart_worker(&worker)?;
                self.farm.wait_worker_ready(&worker).await?;
            }
            self.cli(&worker, &["set-availability", "auto"])?;
        }
        Ok(())
    }

    /// The windowed workers' stretches outside their windows (before the
    /// first, between two, after the last): nothing may start there.
    fn closed_stretches(&self, end: f64) -> Vec<AwayWindow> {
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
    fn check_windows(&self, finished: &BTreeMap<BuildId, BuildInfo>, report: &mut SoakReport) {
        report.windows = self.windows.len();
        let secs = |t: jiff::Timestamp| t.as_nanosecond() as f64 / 1e9;
        // Each builder's successful runs, as the master measures them
        // (first step's start to the end), by when they finished.
        let mut history: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for build in finished.values() {
            if let (Some(Outcome::Success), Some(first), Some(end)) =
                (build.outcome, build.steps.first(), build.finished_at)
            {
                history
                    .entry(build.builder.as_str())
                    .or_default()
                    .push((secs(end), secs(end) - secs(first.started_at)));
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

    /// Waits for every build, then checks the promises.
    async fn check(&mut self) -> anyhow::Result<SoakReport> {
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

        let entries = read_ledger(&self.ledger)?;
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
    fn lock_overlaps(&self, entries: &[Entry], violations: &mut Vec<String>) -> usize {
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

/// The master's estimate for a build handed out at `at`: the 90th
/// percentile (nearest rank) of the last 20 successful runs that finished
/// before, unknown under 3 (as `master/src/scheduler/estimate.rs`).
fn estimate_at(runs: &[(f64, f64)], at: f64) -> Option<f64> {
    const WINDOW: usize = 20;
    const MIN_SAMPLES: usize = 3;
    let before = runs.partition_point(|(ended, _)| *ended < at);
    let recent = &runs[before.saturating_sub(WINDOW)..before];
    if recent.len() < MIN_SAMPLES {
        return None;
    }
    let mut took: Vec<f64> = recent.iter().map(|(_, took)| *took).collect();
    took.sort_by(f64::total_cmp);
    let rank = (90 * took.len()).div_ceil(100).max(1);
    took.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::estimate_at;

    #[test]
    fn the_estimate_is_the_masters_percentile_of_runs_finished_before() {
        let runs: Vec<(f64, f64)> = (1..=10).map(|i| (f64::from(i), f64::from(i))).collect();
        assert_eq!(estimate_at(&runs, 3.0), None, "two runs before");
        assert_eq!(estimate_at(&runs, 3.5), Some(3.0));
        assert_eq!(estimate_at(&runs, 100.0), Some(9.0));
    }
}
