//! `nightshift-scale`: one real `master` and N lightweight fake agents that
//! speak the real protocol through `nightshift-proto` (TLS WebSocket, hello,
//! heartbeats both ways, presence frames, accepted/step/finished frames for
//! every build), swept over N = 100, 1,000, 10,000. For each N it prints:
//! time for all N to connect at the same instant, master RSS per connected
//! agent, idle master CPU, a flip of every worker to `away` (and back) until
//! the scheduler has seen all, trivial builds/s and master CPU per build with
//! N idle workers, the `master workers` answer time, and a reconnect storm
//! (the master SIGKILLed and restarted: time until all N are back).
//!
//! Run it after `cargo build --release`:
//! `cargo run --release -p nightshift-tests --bin nightshift-scale`
//! (`--agents 100,1000` picks the sizes, `--builds N` the throughput run,
//! `--json` prints one JSON object). It raises its own descriptor limit. It
//! is a benchmark, not a test: it asserts nothing and only reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use nightshift_policy::PresenceState;
use nightshift_proto::api::{BuildInfo, BuildState, SubmitRequest, SubmitResponse, WorkerPage};
use nightshift_proto::wire::{
    AgentMessage, BuildResult, MasterMessage, Outcome, PROTOCOL_VERSION, StepResult, WS_PATH,
};
use nightshift_tests::{Farm, WorkerSpec, presence};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const BUILDER: &str = "trivial";
/// How long any phase may take before the bench gives up on it.
const PHASE_LIMIT: Duration = Duration::from_secs(180);
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The figures for one N.
#[derive(Debug, Default, Serialize)]
struct Row {
    agents: usize,
    /// All N started at the same instant → all welcomed.
    connect_s: f64,
    /// Attempts that failed (refused with retry-after, timed out, reset).
    connect_failures: usize,
    master_rss_mb: f64,
    master_rss_kb_per_agent: f64,
    idle_cpu_pct: f64,
    /// Every worker sends `away` → the API (through the scheduler) shows none available.
    flip_away_ms: f64,
    /// And back to `available`.
    flip_back_ms: f64,
    builds_per_s: f64,
    master_cpu_ms_per_build: f64,
    /// `master workers` (the real CLI, default page) wall time.
    workers_cli_ms: f64,
    /// `GET /api/v1/workers?state=available&limit=50` on a kept-alive connection.
    workers_api_ms: f64,
    /// The master SIGKILLed and restarted: its ready line → all N welcomed.
    storm_s: f64,
    storm_failures: usize,
}

struct Args {
    sizes: Vec<usize>,
    builds: usize,
    json: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sizes: vec![100, 1_000, 10_000],
        builds: 500,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => args.json = true,
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
                bail!("unknown argument `{other}` (expected --agents N,N,..., --builds N, --json)")
            }
        }
    }
    Ok(args)
}

/// What all fake agents share with the driver.
struct Fleet {
    url: String,
    tls: Arc<rustls::ClientConfig>,
    /// Agents welcomed and still connected.
    connected: AtomicUsize,
    /// Failed connection attempts.
    failures: AtomicUsize,
    changed: Notify,
    presence: watch::Receiver<PresenceState>,
    stop: watch::Receiver<bool>,
}

impl Fleet {
    /// Waits until `connected` reaches `n`.
    async fn all_connected(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let notified = self.changed.notified();
            if self.connected.load(Ordering::Acquire) >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                bail!(
                    "only {} of {n} agents connected within {PHASE_LIMIT:?}",
                    self.connected.load(Ordering::Acquire)
                );
            }
        }
    }
}

enum SessionEnd {
    Stop,
    Lost { welcomed: bool },
    Busy(Duration),
}

/// One fake agent: connects, says hello, stays, reconnects as the real agent
/// does (spread over a second after losing a welcomed connection, then
/// backoff doubling from 200 ms to 10 s with jitter, a 503's Retry-After
/// honoured).
async fn fake_agent(fleet: Arc<Fleet>, name: String, token: String) {
    let mut backoff = Duration::from_millis(200);
    let mut stop = fleet.stop.clone();
    loop {
        let pause = match session(&fleet, &name, &token).await {
            SessionEnd::Stop => return,
            SessionEnd::Lost { welcomed: true } => {
                backoff = Duration::from_millis(200);
                Duration::from_millis(rand_below(1000))
            }
            SessionEnd::Lost { welcomed: false } => {
                fleet.failures.fetch_add(1, Ordering::Relaxed);
                let pause = jittered(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                pause
            }
            SessionEnd::Busy(asked) => {
                fleet.failures.fetch_add(1, Ordering::Relaxed);
                let pause = jittered(backoff).max(asked);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                pause
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.finish() % n.max(1)
}

fn jittered(backoff: Duration) -> Duration {
    let half = backoff.as_millis() as u64 / 2;
    Duration::from_millis(half + rand_below(half + 1))
}

async fn session(fleet: &Fleet, name: &str, token: &str) -> SessionEnd {
    let lost = SessionEnd::Lost { welcomed: false };
    let Ok(mut request) = fleet.url.as_str().into_client_request() else {
        return SessionEnd::Stop;
    };
    let Ok(bearer) = format!("Bearer {token}").parse() else {
        return SessionEnd::Stop;
    };
    request.headers_mut().insert("authorization", bearer);
    // Small buffers, so that the driver's own memory stays small too.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config),
        true,
        Some(tokio_tungstenite::Connector::Rustls(fleet.tls.clone())),
    );
    let mut ws = match tokio::time::timeout(Duration::from_secs(30), connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            let asked = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map_or(Duration::ZERO, Duration::from_secs);
            return SessionEnd::Busy(asked);
        }
        _ => return lost,
    };
    let mut presence_rx = fleet.presence.clone();
    let state = *presence_rx.borrow_and_update();
    let hello = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        worker: name.to_owned(),
        agent_version: "scale".into(),
        max_builds: 1,
        presence: presence(state),
        running: Vec::new(),
    };
    if ws.send(Message::text(hello.encode())).await.is_err() {
        return lost;
    }
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => match MasterMessage::decode(&text) {
            Ok(MasterMessage::Welcome { .. }) => {}
            _ => return lost,
        },
        _ => return lost,
    }
    fleet.connected.fetch_add(1, Ordering::AcqRel);
    fleet.changed.notify_waiters();
    let end = connected(fleet, &mut ws, &mut presence_rx).await;
    fleet.connected.fetch_sub(1, Ordering::AcqRel);
    fleet.changed.notify_waiters();
    end
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connected(
    fleet: &Fleet,
    ws: &mut Socket,
    presence_rx: &mut watch::Receiver<PresenceState>,
) -> SessionEnd {
    let mut stop = fleet.stop.clone();
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut seq = 0;
    let gone = SessionEnd::Lost { welcomed: true };
    loop {
        tokio::select! {
            frame = ws.next() => {
                let Some(Ok(frame)) = frame else { return gone };
                let Message::Text(text) = frame else {
                    if matches!(frame, Message::Close(_)) { return gone; }
                    continue;
                };
                match MasterMessage::decode(&text) {
                    Ok(MasterMessage::Ping { seq }) => {
                        if ws.send(Message::text(AgentMessage::Pong { seq }.encode())).await.is_err() {
                            return gone;
                        }
                    }
                    Ok(MasterMessage::StartBuild { build_id, .. }) => {
                        if run_build(ws, build_id).await.is_err() {
                            return gone;
                        }
                    }
                    _ => {}
                }
            }
            changed = presence_rx.changed() => {
                if changed.is_err() { return SessionEnd::Stop; }
                let state = *presence_rx.borrow_and_update();
                let frame = AgentMessage::Presence { presence: presence(state) };
                if ws.send(Message::text(frame.encode())).await.is_err() {
                    return gone;
                }
            }
            _ = beat.tick() => {
                seq += 1;
                if ws.send(Message::text(AgentMessage::Ping { seq }.encode())).await.is_err() {
                    return gone;
                }
            }
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return SessionEnd::Stop;
            }
        }
    }
}

/// The frames a real agent sends for a one-step build that succeeds at once.
async fn run_build(ws: &mut Socket, build_id: u64) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now();
    let step = StepResult {
        step: 0,
        outcome: Outcome::Success,
        exit_code: Some(0),
        signal: None,
        started_at: now,
        finished_at: now,
    };
    for message in [
        AgentMessage::BuildAccepted { build_id },
        AgentMessage::StepStarted {
            build_id,
            step: 0,
            at: now,
        },
        AgentMessage::StepFinished {
            build_id,
            result: step.clone(),
        },
        AgentMessage::BuildFinished {
            result: BuildResult {
                build_id,
                outcome: Outcome::Success,
                steps: vec![step],
                reason: None,
                log: String::new(),
                finished_at: now,
            },
        },
    ] {
        ws.send(Message::text(message.encode())).await?;
    }
    Ok(())
}

/// One kept-alive HTTPS connection to the admin API.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    token: String,
}

impl Conn {
    async fn open(farm: &Farm) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", farm.port)).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let stream = tokio_rustls::TlsConnector::from(farm.tls_client()?)
            .connect(name.to_owned(), tcp)
            .await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Conn {
            sender,
            host: format!("127.0.0.1:{}", farm.port),
            token: farm.admin_token()?,
        })
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<String> {
        self.sender.ready().await?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(text)
    }

    async fn available(&mut self) -> anyhow::Result<usize> {
        let text = self
            .call("GET", "/api/v1/workers?state=available&limit=1", None)
            .await?;
        Ok(serde_json::from_str::<WorkerPage>(&text)?.total)
    }
}

/// utime + stime of a process, in milliseconds.
fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("odd VmRSS line"))?
        .parse()?)
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

/// `total` builds from `clients` kept-alive connections (each submits,
/// waits for the result, goes again); returns builds/s.
async fn throughput(farm: &Farm, total: usize, clients: usize) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut conn = Conn::open(farm).await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let body = serde_json::to_string(&SubmitRequest {
                    builder: BUILDER.to_owned(),
                    properties: BTreeMap::new(),
                })?;
                let text = conn.call("POST", "/api/v1/builds", Some(body)).await?;
                let id = serde_json::from_str::<SubmitResponse>(&text)?.build_id;
                loop {
                    let text = conn
                        .call(
                            "GET",
                            &format!("/api/v1/builds/{id}/wait?timeout_secs=60"),
                            None,
                        )
                        .await?;
                    let build: BuildInfo = serde_json::from_str(&text)?;
                    if build.state == BuildState::Finished {
                        if build.outcome != Some(Outcome::Success) {
                            bail!("build {id} ended {:?}", build.outcome);
                        }
                        break;
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn measure(n: usize, builds: usize) -> anyhow::Result<Row> {
    let names: Vec<String> = (0..n).map(|i| format!("s{i:05}")).collect();
    let mut farm_builder = Farm::builder();
    for name in &names {
        farm_builder = farm_builder.worker(WorkerSpec::new(name));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut farm = farm_builder
        .builder(BUILDER, &refs, &[("noop", "true")])
        .start()?;
    let pid = farm.master_pid().context("no master pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kb(pid)?;

    let (presence_tx, presence_rx) = watch::channel(PresenceState::Available);
    let (stop_tx, stop_rx) = watch::channel(false);
    let fleet = Arc::new(Fleet {
        url: format!("{}{WS_PATH}", farm.ws_url()),
        tls: farm.tls_client()?,
        connected: AtomicUsize::new(0),
        failures: AtomicUsize::new(0),
        changed: Notify::new(),
        presence: presence_rx,
        stop: stop_rx,
    });
    let mut row = Row {
        agents: n,
        ..Row::default()
    };

    // Everyone at once.
    let start = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for spec in names.iter().map(|name| farm.worker_spec(name)) {
        let spec = spec?;
        agents.push(tokio::spawn(fake_agent(
            fleet.clone(),
            spec.name.clone(),
            spec.token.clone(),
        )));
    }
    fleet.all_connected(n).await?;
    row.connect_s = start.elapsed().as_secs_f64();
    row.connect_failures = fleet.failures.swap(0, Ordering::Relaxed);

    // Settle (the last connections' handshakes), then memory and idle CPU
    // over two heartbeat periods.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kb(pid)?;
    row.master_rss_mb = rss / 1024.0;
    row.master_rss_kb_per_agent = (rss - rss_before) / n as f64;
    let idle = Duration::from_secs(10);
    let cpu = cpu_ms(pid)?;
    tokio::time::sleep(idle).await;
    row.idle_cpu_pct = (cpu_ms(pid)? - cpu) / idle.as_secs_f64() / 10.0;

    let mut conn = Conn::open(&farm).await?;
    let start = Instant::now();
    presence_tx.send_replace(PresenceState::Away);
    row.flip_away_ms = until_available(&mut conn, 0, start).await?;
    let start = Instant::now();
    presence_tx.send_replace(PresenceState::Available);
    row.flip_back_ms = until_available(&mut conn, n, start).await?;

    let cpu = cpu_ms(pid)?;
    row.builds_per_s = throughput(&farm, builds, 8).await?;
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
    drop(conn);

    // The storm: every agent loses its master at once and comes back.
    farm.kill_master()?;
    fleet.failures.store(0, Ordering::Relaxed);
    farm.start_master()?;
    let start = Instant::now();
    fleet.all_connected(n).await?;
    row.storm_s = start.elapsed().as_secs_f64();
    row.storm_failures = fleet.failures.load(Ordering::Relaxed);

    stop_tx.send_replace(true);
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
            "{:.1} KB ({:.0} MB in all)",
            r.master_rss_kb_per_agent, r.master_rss_mb
        )
    });
    line("idle master CPU, % of one core", &|r| {
        format!("{:.2}", r.idle_cpu_pct)
    });
    line("all flip to away → scheduler has seen all", &|r| {
        format!("{:.0} ms", r.flip_away_ms)
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
    line("master restart → all reconnected", &|r| {
        format!("{:.2} s ({} failed attempts)", r.storm_s, r.storm_failures)
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
        let row = measure(n, args.builds)
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
