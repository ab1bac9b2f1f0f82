//! `nightshift-scale`: one real `master` and N lightweight fake agents that
//! speak the real protocol through `nightshift-proto` (TLS WebSocket, hello,
//! heartbeats both ways, presence frames, accepted/step/finished frames for
//! every build), swept over N = 100, 1,000, 10,000. For each N it prints:
//! time for all N to connect at the same instant, master RSS per connected
//! agent, idle master CPU, a flip of every worker to `away` (and back) until
//! the scheduler has seen all, trivial builds/s and master CPU per build with
//! N idle workers, the `master workers`, API and dashboard answer times,
//! submit → start of builds queued throughout the flip (a few workers stay
//! available),
//! and a reconnect storm (the master SIGKILLed and restarted: time until
//! all N are back, attempts refused at the port, shed with `Retry-After` or
//! failed, resumed TLS sessions, and the CPU per agent of the master and of
//! this driver, which shares the machine). Each fake agent keeps its own TLS
//! session cache, as a real agent process does.
//!
//! Run it after `cargo build --release`:
//! `cargo run --release -p nightshift-tests --bin nightshift-scale`
//! (`--agents 100,1000` picks the sizes, `--builds N` the throughput run,
//! `--json` prints one JSON object). It raises its own descriptor limit. It
//! is a benchmark, not a test: it asserts nothing and only reports.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nightshift_policy::PresenceState;
use nightshift_tests::fleet::{Conn, Fleet, PHASE_LIMIT, cpu_ms, rss_kb, throughput};
use nightshift_tests::{Farm, WorkerSpec};
use serde::Serialize;

const BUILDER: &str = "trivial";

const USAGE: &str = "\
nightshift-scale: one real master and N fake agents speaking the real protocol;
prints the issue's table (connect, RSS per agent, idle CPU, farm-wide flip,
builds/s and master CPU per build, `master workers`, restart storm) per N.

The release figures, on an otherwise quiet machine, in one command:
  cargo build --release --bins && target/release/nightshift-scale

Options:
  --agents N,N,...  the sizes (default 100,1000,10000)
  --builds N        builds per throughput run (default 500)
  --insecure        plain ws:// instead of TLS (what TLS costs: memory, storm)
  --json            one JSON object instead of the table
  -h, --help        this text";

/// The figures for one N.
#[derive(Debug, Default, Serialize)]
struct Row {
    agents: usize,
    /// All N started at the same instant → all welcomed.
    connect_s: f64,
    /// Attempts that failed (refused with retry-after, timed out, reset).
    connect_failures: usize,
    master_rss_mb: f64,
    /// Before any agent connects (its N workers configured): the worker
    /// table and indexes are in this, not in the figure per agent.
    master_rss_unconnected_mb: f64,
    master_rss_kb_per_agent: f64,
    idle_cpu_pct: f64,
    /// Every worker sends `away` → the API (through the scheduler) shows none available.
    flip_away_ms: f64,
    /// And back to `available`.
    flip_back_ms: f64,
    /// The master's own CPU time for the flip to away (the wall time above
    /// also waits for the agents' side on a shared machine).
    flip_away_cpu_ms: f64,
    builds_per_s: f64,
    master_cpu_ms_per_build: f64,
    /// `master workers` (the real CLI, default page) wall time.
    workers_cli_ms: f64,
    /// `GET /api/v1/workers?state=available&limit=50` on a kept-alive connection.
    workers_api_ms: f64,
    /// The dashboard (`GET /`, its first page of workers) on the same connection.
    dashboard_ms: f64,
    /// The master SIGKILLed and restarted: its ready line → all N welcomed.
    storm_s: f64,
    /// Attempts during the storm that failed otherwise (timed out, reset).
    storm_failures: usize,
    /// Attempts refused at the TCP level (the master not listening yet).
    storm_port_refused: usize,
    /// Attempts answered 503 + Retry-After (the master shedding load).
    storm_shed: usize,
    /// Reconnections whose TLS handshake resumed a session / was full.
    storm_resumed: usize,
    storm_full_handshakes: usize,
    /// CPU during the storm (ready line → all back), in ms per reconnected
    /// agent: the master's, and the fleet driver's (it shares the machine).
    storm_master_cpu_ms_per_agent: f64,
    storm_driver_cpu_ms_per_agent: f64,
    /// SIGKILL → the restarted master's ready line.
    restart_to_ready_s: f64,
    /// Builds submitted one at a time to an idle farm: the master's
    /// submitted_at → started_at (the usual figure), median of
    /// [`IDLE_SAMPLES`].
    idle_build_start_ms: f64,
    /// The same for builds submitted every [`FLIP_SUBMIT_EVERY`] while the
    /// flip to away goes on (a few workers stay available throughout):
    /// median and largest, and how many.
    flip_build_start_ms: f64,
    flip_build_start_max_ms: f64,
    flip_build_samples: usize,
}

/// Builds measured on an idle farm.
const IDLE_SAMPLES: usize = 10;

/// How often each of [`FLIP_SUBMITTERS`] submits a build while the farm flips.
const FLIP_SUBMIT_EVERY: Duration = Duration::from_millis(20);
const FLIP_SUBMITTERS: usize = 4;

/// Workers that stay available through the flip, so that a build queued
/// during it has somewhere to go.
const KEEPERS: usize = 4;

struct Args {
    sizes: Vec<usize>,
    builds: usize,
    json: bool,
    insecure: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sizes: vec![100, 1_000, 10_000],
        builds: 500,
        json: false,
        insecure: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => args.json = true,
            "--insecure" => args.insecure = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--agents" => {
                let list = it.next().context("--agents needs a list, e.g. 100,1000")?;
                args.sizes = list
                    .split(',')
                    .map(|n| n.trim().replace('_', "").parse())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("--agents {list}: not a list of numbers"))?;
            }
            "--builds" => {
                let n = it.next().context("--builds needs a number")?;
                args.builds = n.parse().with_context(|| format!("--builds {n}"))?;
            }
            other => {
                bail!(
                    "unknown argument `{other}` (expected --agents N,N,..., --builds N, --insecure, --json)"
                )
            }
        }
    }
    Ok(args)
}

/// Waits until the API shows `want` available workers; returns the ms taken.
async fn until_available(conn: &mut Conn, want: usize, since: Instant) -> anyhow::Result<f64> {
    loop {
        if conn.available().await? == want {
            return Ok(since.elapsed().as_secs_f64() * 1000.0);
        }
        if since.elapsed() > PHASE_LIMIT {
            bail!("the scheduler did not see the flip within {PHASE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Submits `samples` builds one after the other, each after the last has
/// finished; answers the median submitted_at → started_at in ms.
async fn idle_start_ms(conn: &mut Conn, samples: usize) -> anyhow::Result<f64> {
    let mut took = Vec::with_capacity(samples);
    for _ in 0..samples {
        let id = conn.submit(BUILDER).await?;
        took.push(started_ms(conn, id).await?);
    }
    Ok(median(&mut took))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

async fn started_ms(conn: &mut Conn, id: u64) -> anyhow::Result<f64> {
    let build = conn.wait_finished(id).await?;
    let started = build
        .started_at
        .with_context(|| format!("build {id} finished without a start time"))?;
    Ok(started.duration_since(build.submitted_at).as_secs_f64() * 1000.0)
}

/// The fleet driver's own CPU time (it shares the machine), in ms.
fn own_cpu_ms() -> anyhow::Result<f64> {
    cpu_ms(std::process::id())
}

async fn measure(n: usize, builds: usize, insecure: bool) -> anyhow::Result<Row> {
    let names: Vec<String> = (0..n).map(|i| format!("s{i:05}")).collect();
    let mut farm_builder = Farm::builder();
    for name in &names {
        farm_builder = farm_builder.worker(WorkerSpec::new(name));
    }
    if insecure {
        farm_builder = farm_builder.insecure();
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut farm = farm_builder
        .builder(BUILDER, &refs, &[("noop", "true")])
        .start()
        .await?;
    let pid = farm.master_pid().context("no master pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kb(pid)?;

    // Most agents flip with the farm; a few keepers stay available.
    let keepers = KEEPERS.min(n / 2);
    let (keeper_names, flipper_names) = names.split_at(keepers);
    let (fleet, presence_tx, stop_tx) = Fleet::new(&farm)?;
    let (keeper_fleet, _keeper_presence, keeper_stop) = Fleet::new(&farm)?;
    let mut row = Row {
        agents: n,
        master_rss_unconnected_mb: rss_before / 1024.0,
        ..Row::default()
    };

    // Everyone at once.
    let start = Instant::now();
    let mut agents = fleet.spawn(&farm, flipper_names)?;
    agents.extend(keeper_fleet.spawn(&farm, keeper_names)?);
    fleet.all_connected(flipper_names.len()).await?;
    keeper_fleet.all_connected(keepers).await?;
    row.connect_s = start.elapsed().as_secs_f64();
    row.connect_failures = fleet.failures.swap(0, Ordering::Relaxed)
        + fleet.shed.swap(0, Ordering::Relaxed)
        + fleet.port_refused.swap(0, Ordering::Relaxed);

    // Settle for a heartbeat period (the last connections' handshakes, and
    // every agent's first beat), then memory and idle CPU over two periods
    // (the master gives a longer beat to a big farm).
    let beat = Duration::from_secs(fleet.beat_secs.load(Ordering::Relaxed).max(5));
    tokio::time::sleep(beat).await;
    let rss = rss_kb(pid)?;
    row.master_rss_mb = rss / 1024.0;
    row.master_rss_kb_per_agent = (rss - rss_before) / n as f64;
    let idle = beat * 2;
    let cpu = cpu_ms(pid)?;
    tokio::time::sleep(idle).await;
    row.idle_cpu_pct = (cpu_ms(pid)? - cpu) / idle.as_secs_f64() / 10.0;

    let mut conn = Conn::open(&farm).await?;
    let mut submitter = Conn::open(&farm).await?;
    row.idle_build_start_ms = idle_start_ms(&mut submitter, IDLE_SAMPLES).await?;
    // Throughout the flip each of FLIP_SUBMITTERS connections queues a
    // build every FLIP_SUBMIT_EVERY (an answer can take longer while the
    // master is busy); the keepers are there to take them.
    let mut submitters = Vec::with_capacity(FLIP_SUBMITTERS);
    for _ in 0..FLIP_SUBMITTERS {
        submitters.push(Conn::open(&farm).await?);
    }
    let start = Instant::now();
    let cpu = cpu_ms(pid)?;
    presence_tx.send_replace(PresenceState::Away);
    let (flipped_tx, flipped) = tokio::sync::watch::channel(false);
    let mut submitting = Vec::with_capacity(FLIP_SUBMITTERS);
    for mut submitter in submitters {
        let mut flipped = flipped.clone();
        submitting.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while !*flipped.borrow() {
                ids.push(submitter.submit(BUILDER).await?);
                tokio::select! {
                    () = tokio::time::sleep(FLIP_SUBMIT_EVERY) => {}
                    _ = flipped.changed() => {}
                }
            }
            anyhow::Ok(ids)
        }));
    }
    loop {
        let available = conn.available().await?;
        if available == keepers {
            row.flip_away_ms = start.elapsed().as_secs_f64() * 1000.0;
            break;
        }
        if start.elapsed() > PHASE_LIMIT {
            bail!("the scheduler did not see the flip within {PHASE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    row.flip_away_cpu_ms = cpu_ms(pid)? - cpu;
    let _ = flipped_tx.send(true);
    let mut took = Vec::new();
    for task in submitting {
        for id in task.await?? {
            took.push(started_ms(&mut submitter, id).await?);
        }
    }
    row.flip_build_samples = took.len();
    row.flip_build_start_max_ms = took.iter().copied().fold(0.0, f64::max);
    row.flip_build_start_ms = median(&mut took);
    drop(submitter);
    let start = Instant::now();
    presence_tx.send_replace(PresenceState::Available);
    row.flip_back_ms = until_available(&mut conn, n, start).await?;

    let cpu = cpu_ms(pid)?;
    row.builds_per_s = throughput(&farm, BUILDER, builds, 8).await?;
    row.master_cpu_ms_per_build = (cpu_ms(pid)? - cpu) / builds as f64;

    let start = Instant::now();
    let (code, _, stderr) = farm.master_cli(&["workers"])?;
    row.workers_cli_ms = start.elapsed().as_secs_f64() * 1000.0;
    if code != 0 {
        bail!("master workers failed: {stderr}");
    }
    let start = Instant::now();
    conn.call("GET", "/api/v1/workers?state=available&limit=50", None)
        .await?;
    row.workers_api_ms = start.elapsed().as_secs_f64() * 1000.0;
    let start = Instant::now();
    conn.call("GET", "/", None).await?;
    row.dashboard_ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(conn);

    // The storm: every agent loses its master at once and comes back.
    let killed = Instant::now();
    farm.kill_master().await?;
    fleet.reset_counters();
    keeper_fleet.reset_counters();
    farm.start_master().await?;
    let start = Instant::now();
    row.restart_to_ready_s = (start - killed).as_secs_f64();
    let pid = farm.master_pid().context("no master pid")?;
    let (master_cpu, driver_cpu) = (cpu_ms(pid)?, own_cpu_ms()?);
    fleet.all_connected(flipper_names.len()).await?;
    keeper_fleet.all_connected(keepers).await?;
    row.storm_s = start.elapsed().as_secs_f64();
    row.storm_master_cpu_ms_per_agent = (cpu_ms(pid)? - master_cpu) / n as f64;
    row.storm_driver_cpu_ms_per_agent = (own_cpu_ms()? - driver_cpu) / n as f64;
    let both = |counter: fn(&Fleet) -> &std::sync::atomic::AtomicUsize| {
        counter(&fleet).load(Ordering::Relaxed) + counter(&keeper_fleet).load(Ordering::Relaxed)
    };
    row.storm_failures = both(|f| &f.failures);
    row.storm_port_refused = both(|f| &f.port_refused);
    row.storm_shed = both(|f| &f.shed);
    row.storm_resumed = both(|f| &f.resumed);
    row.storm_full_handshakes = both(|f| &f.full_handshakes);

    stop_tx.send_replace(true);
    keeper_stop.send_replace(true);
    for agent in agents {
        let _ = agent.await;
    }
    Ok(row)
}

fn raise_own_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("cannot raise the descriptor limit from {soft} to {hard}: {e}");
    }
}

fn print_table(rows: &[Row]) {
    let header: Vec<String> = rows.iter().map(|r| r.agents.to_string()).collect();
    println!("| connected agents | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(rows.len()));
    let line = |label: &str, cell: &dyn Fn(&Row) -> String| {
        let cells: Vec<String> = rows.iter().map(cell).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    line("all connected (at once)", &|r| {
        format!(
            "{:.2} s ({} failed attempts)",
            r.connect_s, r.connect_failures
        )
    });
    line("master RSS per connected agent", &|r| {
        format!(
            "{:.1} KB ({:.0} MB in all, {:.0} MB before any connected)",
            r.master_rss_kb_per_agent, r.master_rss_mb, r.master_rss_unconnected_mb
        )
    });
    line("idle master CPU, % of one core", &|r| {
        format!("{:.2}", r.idle_cpu_pct)
    });
    line("all flip to away → scheduler has seen all", &|r| {
        format!(
            "{:.0} ms ({:.0} ms master CPU)",
            r.flip_away_ms, r.flip_away_cpu_ms
        )
    });
    line("builds queued during the flip: submit → start", &|r| {
        format!(
            "median {:.1} ms, max {:.1} ms of {} (idle farm: median {:.1} ms)",
            r.flip_build_start_ms,
            r.flip_build_start_max_ms,
            r.flip_build_samples,
            r.idle_build_start_ms
        )
    });
    line("all flip back to available", &|r| {
        format!("{:.0} ms", r.flip_back_ms)
    });
    line("trivial builds/s with N idle workers", &|r| {
        format!("{:.0}", r.builds_per_s)
    });
    line("master CPU per build", &|r| {
        format!("{:.2} ms", r.master_cpu_ms_per_build)
    });
    line("`master workers` (CLI, first page)", &|r| {
        format!("{:.0} ms", r.workers_cli_ms)
    });
    line("API: 50 available workers", &|r| {
        format!("{:.1} ms", r.workers_api_ms)
    });
    line("dashboard (first page of workers)", &|r| {
        format!("{:.1} ms", r.dashboard_ms)
    });
    line("master restart → all reconnected", &|r| {
        format!(
            "{:.2} s ({} failed, {} shed with retry-after, {} port refused)",
            r.storm_s, r.storm_failures, r.storm_shed, r.storm_port_refused
        )
    });
    line("… its TLS handshakes: resumed / full", &|r| {
        format!("{} / {}", r.storm_resumed, r.storm_full_handshakes)
    });
    line("… CPU per agent: master / fleet driver", &|r| {
        format!(
            "{:.2} / {:.2} ms",
            r.storm_master_cpu_ms_per_agent, r.storm_driver_cpu_ms_per_agent
        )
    });
    line("… SIGKILL → restarted master ready", &|r| {
        format!("{:.2} s", r.restart_to_ready_s)
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    raise_own_descriptor_limit();
    nightshift_proto::tls::install_crypto_provider();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        eprintln!("N = {n} ...");
        let row = measure(n, args.builds, args.insecure)
            .await
            .with_context(|| format!("with {n} agents"))?;
        eprintln!("{row:?}");
        rows.push(row);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}
