//! `nightshift-bench`: starts a real master and real worker agents on
//! loopback and prints the figures the project tracks: submit→start latency,
//! trivial builds per second with 1 and 4 workers, master CPU time per build,
//! presence change → master seeing it, idle RSS of agent and master, and
//! how builds yield: submit→start with builds spaced apart (with and without
//! a cgroup per build), and the speed of a CPU-bound owner task beside a
//! build that burns every core, relative to the task alone.
//!
//! Run it on an otherwise idle machine:
//! `cargo run --release -p nightshift-tests --bin nightshift-bench` (it
//! builds the release `master` and `worker` first, and prints on stderr
//! which binaries and which commit it measured)
//! (`--builds N` sets the size of the throughput runs, `--only throughput`
//! measures only submit → start, builds/s and master CPU per build,
//! `--json` prints the figures as one JSON object). It is a benchmark, not a
//! test: it asserts nothing and only reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use nightshift_policy::PresenceState;
use nightshift_proto::api::{BuildState, WorkerInfo, WorkerList};
use nightshift_tests::fleet::{Conn, cpu_ms, status_kb, throughput};
use nightshift_tests::{Farm, WorkerSpec};
use serde::Serialize;

const WORKERS: [&str; 4] = ["w1", "w2", "w3", "w4"];

#[derive(Debug, Default, Serialize)]
struct Figures {
    submit_to_start_ms: Summary,
    builds_per_sec_1_worker: f64,
    builds_per_sec_4_workers: f64,
    master_cpu_ms_per_build: f64,
    /// Agents the master cut off during the throughput runs (rate limit,
    /// outbox full, bad frame, silent): each costs a reconnect.
    throughput_disconnects: f64,
    presence_to_master_ms: Summary,
    /// The same while a fake agent floods the master with output frames.
    presence_to_master_during_flood_ms: Summary,
    /// Frames per second the flooder got through (the master's rate limit).
    flood_frames_per_sec: f64,
    /// A timed flip: the agent's wall-clock alarm fires at the instant the
    /// master already shows as the worker's `until` → the master shows the
    /// new state. Here a manual `away --for 1s` running out.
    timed_flip_to_master_ms: Summary,
    /// The same at real schedule boundaries (a window that opens and
    /// closes every other minute): a few samples, one a minute.
    schedule_boundary_to_master_ms: Summary,
    idle_agent_rss_mb: f64,
    idle_agent_private_mb: f64,
    idle_master_rss_mb: f64,
    /// Submit → step running, 0.5 s between builds, process-tree mode.
    spaced_submit_to_start_ms: Summary,
    /// The same with one cgroup per build (`None`: no cgroup could be made).
    spaced_submit_to_start_cgroup_ms: Option<Summary>,
    /// `--only spaced`: where the time goes, stage by stage (from the
    /// binaries' hand-off trace), without and with cgroups.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    spaced_stages_ms: Vec<Stage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    spaced_stages_cgroup_ms: Vec<Stage>,
    /// The owner's task speed beside a build burning every core, in percent
    /// of its speed alone: builds at normal priority (the old behaviour),
    /// at the default idle priority, and at the default in cgroup mode.
    owner_speed_normal_priority_percent: f64,
    owner_speed_idle_priority_percent: f64,
    owner_speed_cgroup_percent: Option<f64>,
    /// Why the cgroup figures are missing, or what cgroup mode applied.
    cgroup_note: String,
}

/// One stage of the way from submit to the step running: the time since
/// the stage before it.
#[derive(Debug, Serialize)]
struct Stage {
    stage: String,
    ms: Summary,
}

/// Percentiles of a sample. The p99 is given only from
/// [`Summary::P99_SAMPLES`] samples on: below that it would be the largest
/// value or the one before it, and `max` already says that.
#[derive(Debug, Default, Serialize)]
struct Summary {
    samples: usize,
    median: f64,
    p90: f64,
    p99: Option<f64>,
    max: f64,
}

impl Summary {
    const P99_SAMPLES: usize = 100;

    fn of(mut values: Vec<f64>) -> Summary {
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if values.is_empty() {
                return f64::NAN;
            }
            let index = ((values.len() - 1) as f64 * q).round() as usize;
            values[index]
        };
        Summary {
            samples: values.len(),
            median: at(0.5),
            p90: at(0.9),
            p99: (values.len() >= Self::P99_SAMPLES).then(|| at(0.99)),
            max: at(1.0),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "median {:.2} ms, p90 {:.2} ms, ", self.median, self.p90)?;
        if let Some(p99) = self.p99 {
            write!(f, "p99 {p99:.2} ms, ")?;
        }
        write!(f, "max {:.2} ms ({} samples)", self.max, self.samples)
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Resident memory of `pid` in MB: `VmRSS` (all of it, including the
/// binary's and libraries' pages shared with the page cache).
fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    Ok(status_kb(pid, "VmRSS:")? / 1024.0)
}

/// Private resident memory of `pid` in MB (`RssAnon`: heap, stacks, what
/// the process alone costs the machine).
fn private_mb(pid: u32) -> anyhow::Result<f64> {
    Ok(status_kb(pid, "RssAnon:")? / 1024.0)
}

async fn wait_available(farm: &Farm, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        farm.wait_worker_state(name, PresenceState::Available)
            .await?;
    }
    Ok(())
}

/// A step that burns every core until cancelled.
const BURN_EVERY_CORE: &str =
    "for i in $(seq $(nproc)); do (while :; do :; done) & done; sleep 600";

/// What to run: everything, or only the spaced submit → step running
/// figures (with `samples` samples per mode), for iterating on that path.
#[derive(Debug, Clone, Copy)]
struct Options {
    builds: usize,
    only_spaced: bool,
    /// Only submit → start, builds/s and master CPU per build.
    only_throughput: bool,
    spaced_samples: usize,
    /// Real schedule boundaries to measure (one a minute).
    boundary_samples: usize,
}

async fn run(options: Options) -> anyhow::Result<Figures> {
    if options.only_spaced {
        return run_spaced(options.spaced_samples).await;
    }
    let builds = options.builds;
    // Declared before the farm so it is removed after the agents are gone.
    let cgroup = nightshift_tests::test_cgroup("bench");
    let mut builder = Farm::builder();
    for name in WORKERS {
        builder = builder.worker(WorkerSpec::new(name));
    }
    // Workers no builder lists: the flooder, and one whose schedule opens
    // and closes a window every other minute.
    builder = builder
        .worker(WorkerSpec::new("flood"))
        .worker(WorkerSpec::new(SCHEDULED).worker_toml(EVERY_OTHER_MINUTE));
    builder = builder
        .worker(WorkerSpec::new("pt").worker_toml("[builds]\ncgroups = \"off\"\n"))
        .worker(WorkerSpec::new("pt-normal").worker_toml(
            "[builds]\ncgroups = \"off\"\ncpu_priority = \"normal\"\nio_priority = \"normal\"\n",
        ))
        .builder("stamp-pt", &["pt"], &[("stamp", "date +%s%N")])
        .builder("burn-pt", &["pt"], &[("burn", BURN_EVERY_CORE)])
        .builder("burn-normal", &["pt-normal"], &[("burn", BURN_EVERY_CORE)]);
    let cgroup_dir = match &cgroup {
        Ok(Some(dir)) => Some(dir.0.clone()),
        _ => None,
    };
    if let Some(dir) = &cgroup_dir {
        builder = builder
            .worker(
                WorkerSpec::new("cg")
                    .in_cgroup(dir)
                    .worker_toml("[builds]\ncgroups = \"required\"\n"),
            )
            .builder("stamp-cg", &["cg"], &[("stamp", "date +%s%N")])
            .builder("burn-cg", &["cg"], &[("burn", BURN_EVERY_CORE)]);
    }
    let mut farm = builder
        .builder("trivial", &WORKERS, &[("run", "true")])
        .builder("stamp", &["w1"], &[("stamp", "date +%s%N")])
        .start()
        .await?;
    let mut figures = Figures::default();
    let master_pid = farm.master_pid().context("master not running")?;
    let tls = farm.tls_client()?;
    let token = farm.admin_token()?;

    farm.start_worker("w1")?;
    farm.start_worker(SCHEDULED)?;
    wait_available(&farm, &["w1"]).await?;

    // Submit → start: the step prints the wall clock when it starts.
    let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
    let measured = stamped_builds(&mut conn, "stamp", Summary::P99_SAMPLES, Duration::ZERO)
        .await
        .context("submit → start")?;
    figures.submit_to_start_ms = Summary::of(measured.iter().map(Sample::latency_ms).collect());

    // Throughput with one worker, and the master's CPU per build.
    let cpu_before = cpu_ms(master_pid)?;
    figures.builds_per_sec_1_worker = throughput(&farm, "trivial", builds, 4)
        .await
        .context("throughput, 1 worker")?;
    let cpu_after = cpu_ms(master_pid)?;

    for name in &WORKERS[1..] {
        farm.start_worker(name)?;
    }
    wait_available(&farm, &WORKERS).await?;
    let cpu_before_4 = cpu_ms(master_pid)?;
    figures.builds_per_sec_4_workers = throughput(&farm, "trivial", builds * 2, 16)
        .await
        .context("throughput, 4 workers")?;
    let cpu_after_4 = cpu_ms(master_pid)?;
    figures.master_cpu_ms_per_build =
        ((cpu_after - cpu_before) + (cpu_after_4 - cpu_before_4)) / (builds * 3) as f64;
    figures.throughput_disconnects = agent_disconnects(&farm).await?;
    if options.only_throughput {
        return Ok(figures);
    }

    // Presence: the owner flips w1 through its control API; the master's API
    // (polled on a kept-alive connection) shows the new state.
    let state_dir = farm.dir.path().join("workers/w1/state");
    let control_token = fs_err::read_to_string(state_dir.join("control.token"))
        .context("reading w1's control token")?
        .trim()
        .to_owned();
    let control_port = farm.worker_control_port("w1")?;
    let mut control = Conn::connect(control_port, None, control_token).await?;
    // The master closes connections left idle during the throughput runs.
    let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
    let presence = presence_flips(&mut control, &mut conn, Summary::P99_SAMPLES).await?;
    control
        .call(
            "POST",
            "/api/v1/set-availability",
            Some("{\"state\":\"auto\"}".into()),
        )
        .await?;

    // The same while another agent floods the master with output frames
    // (for builds that are not its own: refused, rate-limited, never fatal).
    let mut flooder = farm
        .fake_agent("flood", PresenceState::Away)
        .await
        .context("connecting the flooder")?;
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flood = tokio::spawn({
        let flooding = Arc::clone(&flooding);
        async move {
            let started = Instant::now();
            let mut sent = 0u64;
            let data = "x".repeat(200);
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let frame = nightshift_proto::wire::AgentMessage::Output {
                    build_id: 1,
                    step: 0,
                    data: data.clone(),
                };
                if flooder.send(&frame).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent as f64 / started.elapsed().as_secs_f64()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = presence_flips(&mut control, &mut conn, Summary::P99_SAMPLES).await;
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    figures.flood_frames_per_sec = flood.await?;
    figures.presence_to_master_during_flood_ms = Summary::of(during?);
    control
        .call(
            "POST",
            "/api/v1/set-availability",
            Some("{\"state\":\"auto\"}".into()),
        )
        .await?;
    figures.presence_to_master_ms = Summary::of(presence);

    // Timed flips, both on fresh connections (the master closes idle ones):
    // many manual `--for 1s` endings on w1 and, at once, a few real
    // schedule boundaries of the scheduled worker.
    let overrides = async {
        let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
        override_endings(&mut control, &mut conn, Summary::P99_SAMPLES).await
    };
    let boundaries = async {
        let mut samples = Vec::new();
        for _ in 0..options.boundary_samples {
            let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
            let asked = Instant::now();
            let before = loop {
                let info = worker_info(&mut conn, SCHEDULED).await?;
                if info.connected && info.until.is_some() {
                    break info;
                }
                if asked.elapsed() > Duration::from_secs(10) {
                    bail!("the master never showed {SCHEDULED} connected with its next boundary");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            // The master closes a connection idle for long: a fresh one
            // for the polling, made before the boundary.
            drop(conn);
            sleep_until_near(announced(&before)?).await;
            let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
            samples.push(timed_flip(&mut conn, before).await?);
        }
        anyhow::Ok(samples)
    };
    let (overrides, boundaries) = tokio::join!(overrides, boundaries);
    figures.timed_flip_to_master_ms =
        Summary::of(overrides.context("manual `--for` endings → master")?);
    figures.schedule_boundary_to_master_ms =
        Summary::of(boundaries.context("schedule boundaries → master")?);

    // Idle memory: let everything settle into idleness, then read RSS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rss = Vec::new();
    let mut private = Vec::new();
    for name in WORKERS {
        let pid = farm.agent(name).context("agent not running")?.child.id();
        rss.push(rss_mb(pid)?);
        private.push(private_mb(pid)?);
    }
    figures.idle_agent_rss_mb = rss.iter().copied().fold(0.0, f64::max);
    figures.idle_agent_private_mb = private.iter().copied().fold(0.0, f64::max);
    figures.idle_master_rss_mb = rss_mb(master_pid)?;
    for name in WORKERS {
        farm.stop_worker(name)
            .await
            .context("stopping the throughput workers")?;
    }

    // How builds yield, on workers of their own.
    let mut yielding = vec!["pt", "pt-normal"];
    if cgroup_dir.is_some() {
        yielding.push("cg");
    }
    for name in &yielding {
        farm.start_worker(name)?;
    }
    wait_available(&farm, &yielding)
        .await
        .context("the yield workers")?;
    // A fresh connection: the master closes idle ones.
    let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
    figures.spaced_submit_to_start_ms = Summary::of(
        spaced_latency(&mut conn, "stamp-pt", options.spaced_samples)
            .await
            .context("spaced submit → start, no cgroups")?
            .iter()
            .map(Sample::latency_ms)
            .collect(),
    );
    figures.owner_speed_normal_priority_percent = owner_speed(&farm, "burn-normal")
        .await
        .context("owner speed beside a normal-priority build")?;
    figures.owner_speed_idle_priority_percent = owner_speed(&farm, "burn-pt")
        .await
        .context("owner speed beside an idle-priority build")?;
    match (&cgroup, &cgroup_dir) {
        (_, Some(_)) => {
            let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
            figures.spaced_submit_to_start_cgroup_ms = Some(Summary::of(
                spaced_latency(&mut conn, "stamp-cg", options.spaced_samples)
                    .await
                    .context("spaced submit → start, cgroup per build")?
                    .iter()
                    .map(Sample::latency_ms)
                    .collect(),
            ));
            figures.owner_speed_cgroup_percent = Some(
                owner_speed(&farm, "burn-cg")
                    .await
                    .context("owner speed beside a build in a cgroup")?,
            );
            let status = farm.worker_cli_json("cg", &["status", "--json"])?;
            let isolation = &status["isolation"];
            figures.cgroup_note = format!(
                "cpu.weight {} applied: {}; {}",
                isolation["cpu_weight"], isolation["cpu_weight_applied"], isolation["notes"]
            );
        }
        (Err(error), None) => figures.cgroup_note = format!("no cgroup mode: {error:#}"),
        (Ok(_), None) => {
            figures.cgroup_note = "no cgroup mode: NIGHTSHIFT_SKIP_CGROUP_TESTS=1".to_owned()
        }
    }
    drop(farm);
    drop(cgroup);
    Ok(figures)
}

/// Only the spaced submit → step running figures, on a farm of the two
/// workers they need (`pt` without cgroups, `cg` with one per build).
async fn run_spaced(samples: usize) -> anyhow::Result<Figures> {
    let cgroup = nightshift_tests::test_cgroup("bench");
    let mut builder = Farm::builder()
        .master_env("NIGHTSHIFT_LOG", TRACE_FILTER)
        .worker(
            WorkerSpec::new("pt")
                .env("NIGHTSHIFT_LOG", TRACE_FILTER)
                .worker_toml("[builds]\ncgroups = \"off\"\n"),
        )
        .builder("stamp-pt", &["pt"], &[("stamp", "date +%s%N")]);
    let cgroup_dir = match &cgroup {
        Ok(Some(dir)) => Some(dir.0.clone()),
        _ => None,
    };
    if let Some(dir) = &cgroup_dir {
        builder = builder
            .worker(
                WorkerSpec::new("cg")
                    .in_cgroup(dir)
                    .env("NIGHTSHIFT_LOG", TRACE_FILTER)
                    .worker_toml("[builds]\ncgroups = \"required\"\n"),
            )
            .builder("stamp-cg", &["cg"], &[("stamp", "date +%s%N")]);
    }
    let mut farm = builder.start().await?;
    let mut figures = Figures::default();
    let tls = farm.tls_client()?;
    let token = farm.admin_token()?;
    farm.start_worker("pt")?;
    wait_available(&farm, &["pt"]).await?;
    let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
    let measured = spaced_latency(&mut conn, "stamp-pt", samples)
        .await
        .context("spaced submit → start, no cgroups")?;
    figures.spaced_submit_to_start_ms =
        Summary::of(measured.iter().map(Sample::latency_ms).collect());
    figures.spaced_stages_ms = stages(&farm.master_log(), &farm.worker_log("pt"), &measured);
    match (&cgroup, &cgroup_dir) {
        (_, Some(_)) => {
            farm.start_worker("cg")?;
            wait_available(&farm, &["cg"]).await?;
            let mut conn = Conn::connect(farm.port, Some(tls.clone()), token.clone()).await?;
            let measured = spaced_latency(&mut conn, "stamp-cg", samples)
                .await
                .context("spaced submit → start, cgroup per build")?;
            figures.spaced_submit_to_start_cgroup_ms = Some(Summary::of(
                measured.iter().map(Sample::latency_ms).collect(),
            ));
            figures.spaced_stages_cgroup_ms =
                stages(&farm.master_log(), &farm.worker_log("cg"), &measured);
            figures.cgroup_note = "one cgroup per build".to_owned();
        }
        (Err(error), None) => figures.cgroup_note = format!("no cgroup mode: {error:#}"),
        (Ok(_), None) => {
            figures.cgroup_note = "no cgroup mode: NIGHTSHIFT_SKIP_CGROUP_TESTS=1".to_owned()
        }
    }
    drop(farm);
    drop(cgroup);
    Ok(figures)
}

/// The log filter that turns on the binaries' hand-off trace.
const TRACE_FILTER: &str = "info,nightshift::handoff=debug";

/// One spaced build: its id, when the submit was sent and when its step
/// printed the clock (nanoseconds since the epoch).
#[derive(Debug, Clone, Copy)]
struct Sample {
    id: u64,
    sent_ns: u128,
    started_ns: u128,
}

impl Sample {
    fn latency_ms(&self) -> f64 {
        self.started_ns.saturating_sub(self.sent_ns) as f64 / 1e6
    }
}

/// Submit → the step's first command running, with 0.5 s between builds
/// (a build arriving at an idle worker, not back to back): `samples`
/// measured after 5 warm-up rounds.
async fn spaced_latency(
    conn: &mut Conn,
    builder: &str,
    samples: usize,
) -> anyhow::Result<Vec<Sample>> {
    stamped_builds(conn, builder, samples, Duration::from_millis(500)).await
}

/// Builds of `builder` (whose step prints the wall clock in nanoseconds)
/// one after the other, `pause` before each: `samples` measured after 5
/// warm-up rounds (caches, the agent's build dir).
async fn stamped_builds(
    conn: &mut Conn,
    builder: &str,
    samples: usize,
    pause: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let mut measured = Vec::new();
    for round in 0..samples + 5 {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let sent = now_ns();
        let id = conn.submit(builder).await?;
        conn.wait_finished(id).await?;
        let log = conn
            .call("GET", &format!("/api/v1/builds/{id}/log"), None)
            .await?;
        let log: nightshift_proto::api::BuildLog = serde_json::from_str(&log)?;
        let started: u128 = log
            .log
            .lines()
            .find_map(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow!("build {id} printed no timestamp: {:?}", log.log))?;
        if round >= 5 {
            measured.push(Sample {
                id,
                sent_ns: sent,
                started_ns: started,
            });
        }
    }
    Ok(measured)
}

/// The stages of the hand-off trace, in the order a build passes them (the
/// master's, then the agent's). The first is derived: the master's
/// "answered" line says how long after the request was read it came.
const STAGES: [&str; 11] = [
    "request read by the master",
    "committed",
    "queued",
    "handed out",
    "hand-out written",
    "hand-out read",
    "offered",
    "accepted",
    "runner started",
    "step 0 starting",
    "step 0 spawned",
];

/// Where the time of each sample went: for every stage, the time since the
/// stage before (the first since the submit was sent; a last row to the
/// step printing the clock), from the `nightshift::handoff` lines of the
/// master's and the worker's logs.
fn stages(master_log: &str, worker_log: &str, samples: &[Sample]) -> Vec<Stage> {
    // (build, stage) → nanoseconds since the epoch.
    let mut seen: BTreeMap<(u64, &str), u128> = BTreeMap::new();
    for line in master_log.lines().chain(worker_log.lines()) {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((_, event)) = rest.split_once("nightshift::handoff: build ") else {
            continue;
        };
        let Some((id, what)) = event.split_once(": ") else {
            continue;
        };
        let (Ok(at), Ok(id)) = (stamp.parse::<jiff::Timestamp>(), id.parse::<u64>()) else {
            continue;
        };
        let at = u128::try_from(at.as_nanosecond()).unwrap_or(0);
        if let Some(after) = what.strip_prefix("answered, ") {
            let micros: u128 = after
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            seen.insert((id, STAGES[0]), at.saturating_sub(micros * 1000));
        } else if let Some(stage) = STAGES.iter().find(|stage| what == **stage) {
            seen.insert((id, stage), at);
        }
    }
    let mut rows: Vec<(String, Vec<f64>)> = STAGES
        .iter()
        .map(|stage| (stage.to_string(), Vec::new()))
        .collect();
    rows.push(("step printed the clock".to_owned(), Vec::new()));
    for sample in samples {
        let mut before = sample.sent_ns;
        for (index, stage) in STAGES.iter().enumerate() {
            if let Some(at) = seen.get(&(sample.id, *stage)) {
                rows[index].1.push(at.saturating_sub(before) as f64 / 1e6);
                before = *at;
            }
        }
        rows[STAGES.len()]
            .1
            .push(sample.started_ns.saturating_sub(before) as f64 / 1e6);
    }
    rows.into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(stage, values)| Stage {
            stage,
            ms: Summary::of(values),
        })
        .collect()
}

/// A fixed amount of CPU-bound work on one thread, like an owner's compile
/// job; returns how long it took.
fn owner_task() -> Duration {
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..300_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    std::hint::black_box(x);
    start.elapsed()
}

/// The owner's task speed beside a build of `builder` (which burns every
/// core) relative to the task alone, in percent: the median of three
/// alternating alone/beside pairs.
async fn owner_speed(farm: &Farm, builder: &str) -> anyhow::Result<f64> {
    let api = farm.api()?;
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let alone = tokio::task::spawn_blocking(owner_task).await?;
        let id = api.submit(builder, BTreeMap::new()).await?.build_id;
        farm.wait_build_state(id, "running", |build| build.state == BuildState::Running)
            .await?;
        // Let the burners start on every core.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let beside = tokio::task::spawn_blocking(owner_task).await?;
        api.cancel(id, Some("bench: measured")).await?;
        farm.wait_build(id).await?;
        ratios.push(alone.as_secs_f64() / beside.as_secs_f64() * 100.0);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(ratios[1])
}

fn main() -> std::process::ExitCode {
    let mut options = Options {
        builds: 200,
        only_spaced: false,
        only_throughput: false,
        spaced_samples: Summary::P99_SAMPLES,
        boundary_samples: 3,
    };
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--builds" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => options.builds = n,
                _ => {
                    eprintln!("error: --builds needs a positive number");
                    return std::process::ExitCode::from(2);
                }
            },
            "--spaced-samples" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => options.spaced_samples = n,
                _ => {
                    eprintln!("error: --spaced-samples needs a positive number");
                    return std::process::ExitCode::from(2);
                }
            },
            "--boundary-samples" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => options.boundary_samples = n,
                _ => {
                    eprintln!("error: --boundary-samples needs a positive number");
                    return std::process::ExitCode::from(2);
                }
            },
            "--only" => match args.next().as_deref() {
                Some("spaced") => options.only_spaced = true,
                Some("throughput") => options.only_throughput = true,
                other => {
                    eprintln!(
                        "error: --only takes `spaced` (submit → step running, 0.5 s apart) or \
                         `throughput` (submit → start, builds/s, master CPU per build), not {other:?}"
                    );
                    return std::process::ExitCode::from(2);
                }
            },
            "--help" | "-h" => {
                println!(
                    "usage: nightshift-bench [--builds N] [--spaced-samples N] [--boundary-samples N] [--only spaced|throughput] [--json]"
                );
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("error: unknown argument `{other}` (try --help)");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    nightshift_proto::tls::install_crypto_provider();
    // What is measured: the binaries (built fresh for this profile, or
    // refused when older than their sources) and the commit.
    match nightshift_tests::binaries_description() {
        Ok(binaries) => eprint!("measuring:\n{binaries}"),
        Err(error) => {
            eprintln!("error: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    }
    match runtime.block_on(run(options)) {
        Ok(f) if json => {
            println!("{}", serde_json::to_string_pretty(&f).unwrap_or_default());
            std::process::ExitCode::SUCCESS
        }
        Ok(f) if options.only_spaced => {
            print_spaced(&f);
            std::process::ExitCode::SUCCESS
        }
        Ok(f) if options.only_throughput => {
            print_throughput(&f);
            std::process::ExitCode::SUCCESS
        }
        Ok(f) => {
            print_throughput(&f);
            println!(
                "presence change → master sees it:   {}",
                f.presence_to_master_ms
            );
            println!(
                "  … while an agent floods frames:   {} (flooder got {:.0} frames/s through)",
                f.presence_to_master_during_flood_ms, f.flood_frames_per_sec
            );
            println!(
                "alarm fires → master sees it:       {} (a manual `--for 1s` ending)",
                f.timed_flip_to_master_ms
            );
            println!(
                "  … at a schedule boundary:         {}",
                f.schedule_boundary_to_master_ms
            );
            println!(
                "idle agent RSS (largest of 4):      {:.1} MB, of which private {:.1} MB",
                f.idle_agent_rss_mb, f.idle_agent_private_mb
            );
            println!(
                "idle master RSS:                    {:.1} MB",
                f.idle_master_rss_mb
            );
            print_spaced(&f);
            println!("owner task speed beside a build burning every core (alone = 100 %):");
            println!(
                "  build at normal priority (old behaviour): {:.0} %",
                f.owner_speed_normal_priority_percent
            );
            println!(
                "  build at idle priority, no cgroups:       {:.0} %",
                f.owner_speed_idle_priority_percent
            );
            match f.owner_speed_cgroup_percent {
                Some(percent) => {
                    println!("  build at idle priority, cgroup/build:     {percent:.0} %")
                }
                None => println!("  build in a cgroup:                        not measured"),
            }
            println!("  cgroup mode: {}", f.cgroup_note);
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Submit → start, builds/s and the master's CPU per build.
fn print_throughput(f: &Figures) {
    println!(
        "submit → build start (idle worker): {}",
        f.submit_to_start_ms
    );
    println!(
        "trivial builds/s, 1 worker:         {:.1}",
        f.builds_per_sec_1_worker
    );
    println!(
        "trivial builds/s, 4 workers:        {:.1}",
        f.builds_per_sec_4_workers
    );
    println!(
        "master CPU per build:               {:.3} ms",
        f.master_cpu_ms_per_build
    );
    println!(
        "agents cut off during these runs:   {}",
        f.throughput_disconnects
    );
}

/// How many agent connections the master has cut off, for any reason.
async fn agent_disconnects(farm: &Farm) -> anyhow::Result<f64> {
    let text = farm.master_metrics().await?;
    Ok(["rate_limited", "outbox_full", "bad_frame", "silent"]
        .iter()
        .map(|why| {
            nightshift_tests::metric_sample(
                &text,
                "nightshift_master_agent_disconnects_total",
                &format!("reason=\"{why}\""),
            )
        })
        .sum())
}

/// The spaced submit → step running figures.
fn print_spaced(f: &Figures) {
    println!(
        "submit → step running, 0.5 s apart, no cgroups:   {}",
        f.spaced_submit_to_start_ms
    );
    match &f.spaced_submit_to_start_cgroup_ms {
        Some(summary) => {
            println!("submit → step running, 0.5 s apart, cgroup/build: {summary}")
        }
        None => println!("submit → step running, cgroup/build: not measured"),
    }
    for (mode, stages) in [
        ("no cgroups", &f.spaced_stages_ms),
        ("cgroup/build", &f.spaced_stages_cgroup_ms),
    ] {
        if stages.is_empty() {
            continue;
        }
        println!("  where the time goes ({mode}; each stage since the one before):");
        for stage in stages {
            println!(
                "    {:<28} median {:>6.2} ms, p90 {:>6.2} ms, max {:>7.2} ms",
                stage.stage, stage.ms.median, stage.ms.p90, stage.ms.max
            );
        }
    }
}

/// Flips w1 between away and available `rounds` times through its control
/// API; for each, the time until the master's API shows the new state.
/// The worker no builder lists whose schedule flips every minute.
const SCHEDULED: &str = "sched";

/// A window open in even minutes, closed in odd ones (UTC): a boundary
/// every minute.
const EVERY_OTHER_MINUTE: &str = r#"[availability]
timezone = "UTC"

[[availability.schedule]]
name = "even-minutes"
open = "*/2 * * * *"
close = "1-59/2 * * * *"
"#;

/// How worker `name` looks at the master.
async fn worker_info(conn: &mut Conn, name: &str) -> anyhow::Result<WorkerInfo> {
    let text = conn
        .call("GET", &format!("/api/v1/workers?name={name}"), None)
        .await?;
    let list: WorkerList = serde_json::from_str(&text)?;
    list.workers
        .into_iter()
        .find(|w| w.name == name)
        .ok_or_else(|| anyhow!("the master does not list {name}"))
}

/// Nanoseconds from now to `at` (negative once past).
fn ns_to(at: jiff::Timestamp) -> i128 {
    at.as_nanosecond() - jiff::Timestamp::now().as_nanosecond()
}

/// The instant the master announced as `before`'s next change.
fn announced(before: &WorkerInfo) -> anyhow::Result<jiff::Timestamp> {
    before
        .until
        .ok_or_else(|| anyhow!("{} has no known change ahead", before.name))
}

/// Sleeps until 30 ms before `at`, when [`timed_flip`] starts polling.
async fn sleep_until_near(at: jiff::Timestamp) {
    let ahead = ns_to(at) - 30_000_000;
    if ahead > 0 {
        tokio::time::sleep(Duration::from_nanos(ahead as u64)).await;
    }
}

/// Waits for the change the master announced in `before.until` and
/// returns how long after that instant the master showed another state, in
/// ms (the agent's alarm, its policy, the presence frame and the master's
/// scheduler). Polls the master from 30 ms before the instant on.
async fn timed_flip(conn: &mut Conn, before: WorkerInfo) -> anyhow::Result<f64> {
    let until = announced(&before)?;
    sleep_until_near(until).await;
    loop {
        let now = worker_info(conn, &before.name).await?;
        let late_ms = -ns_to(until) as f64 / 1e6;
        if now.state != before.state {
            return Ok(late_ms);
        }
        if late_ms > 10_000.0 {
            bail!(
                "{} was still {:?} 10 s after its announced change at {until}",
                before.name,
                before.state
            );
        }
    }
}

/// `rounds` times: w1 set `away --for 1s` through its control plane; once
/// the master shows it away with the end, measures that end (see
/// [`timed_flip`]).
async fn override_endings(
    control: &mut Conn,
    conn: &mut Conn,
    rounds: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        control
            .call(
                "POST",
                "/api/v1/set-availability",
                Some("{\"state\":\"away\",\"for\":\"1s\"}".into()),
            )
            .await?;
        let asked = Instant::now();
        let away = loop {
            let info = worker_info(conn, "w1").await?;
            if info.state == PresenceState::Away && info.until.is_some() {
                break info;
            }
            if asked.elapsed() > Duration::from_secs(10) {
                bail!("the master never showed w1 away with an end");
            }
        };
        samples.push(timed_flip(conn, away).await?);
    }
    Ok(samples)
}

async fn presence_flips(
    control: &mut Conn,
    conn: &mut Conn,
    rounds: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut presence = Vec::new();
    for round in 0..rounds {
        let (word, state) = if round % 2 == 0 {
            ("away", PresenceState::Away)
        } else {
            ("available", PresenceState::Available)
        };
        let start = Instant::now();
        control
            .call(
                "POST",
                "/api/v1/set-availability",
                Some(format!("{{\"state\":\"{word}\"}}")),
            )
            .await?;
        loop {
            let text = conn
                .call("GET", "/api/v1/workers", None)
                .await
                .context("presence → master")?;
            let list: WorkerList = serde_json::from_str(&text)?;
            if list
                .workers
                .iter()
                .any(|w| w.name == "w1" && w.state == state)
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the master never saw w1 {word}");
            }
        }
        presence.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(presence)
}
