//! A fleet of lightweight fake agents for scale measurements: each speaks
//! the real protocol through `nightshift-proto` (TLS WebSocket, hello,
//! heartbeats both ways, presence frames, the accepted/step/finished frames
//! of every build it is handed) and reconnects as the real agent does; plus
//! a kept-alive admin API connection and `/proc` readings of the master's
//! CPU time and memory. Used by `nightshift-scale` and the O(N) guard test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
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
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Farm, presence};

/// How long any phase may take before giving up on it.
pub const PHASE_LIMIT: Duration = Duration::from_secs(180);
/// A connection attempt (TCP, TLS, upgrade, welcome) gives up after this
/// long, as the real agent's does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The beat when a welcome gives none (the protocol's default).
const HEARTBEAT: Duration = Duration::from_secs(nightshift_proto::wire::HEARTBEAT_SECS);

/// What all fake agents share with the driver.
pub struct Fleet {
    pub url: String,
    /// `None` for an insecure (plain `ws://`) farm.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Agents welcomed and still connected.
    pub connected: AtomicUsize,
    /// Failed connection attempts other than those below: handshakes that
    /// timed out or were reset, upgrades that failed.
    pub failures: AtomicUsize,
    /// Attempts refused at the TCP level (nothing listening: the master is
    /// not up yet).
    pub port_refused: AtomicUsize,
    /// Attempts the master answered 503 with `Retry-After` (at its limit).
    pub shed: AtomicUsize,
    /// Welcomed connections whose TLS handshake resumed a session (a
    /// ticket from an earlier connection), and those that were full.
    pub resumed: AtomicUsize,
    pub full_handshakes: AtomicUsize,
    /// The heartbeat period the master gave in its last welcome, in seconds
    /// (0 before the first).
    pub beat_secs: std::sync::atomic::AtomicU64,
    changed: Notify,
    presence: watch::Receiver<PresenceState>,
    stop: watch::Receiver<bool>,
}

impl Fleet {
    /// A fleet for `farm`'s master; returns the senders that flip every
    /// agent's presence and stop them all.
    pub fn new(
        farm: &Farm,
    ) -> anyhow::Result<(
        Arc<Fleet>,
        watch::Sender<PresenceState>,
        watch::Sender<bool>,
    )> {
        let (presence_tx, presence) = watch::channel(PresenceState::Available);
        let (stop_tx, stop) = watch::channel(false);
        let fleet = Arc::new(Fleet {
            url: format!("{}{WS_PATH}", farm.ws_url()),
            tls: if farm.is_insecure() {
                None
            } else {
                Some(farm.tls_client()?)
            },
            connected: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
            port_refused: AtomicUsize::new(0),
            shed: AtomicUsize::new(0),
            resumed: AtomicUsize::new(0),
            full_handshakes: AtomicUsize::new(0),
            beat_secs: std::sync::atomic::AtomicU64::new(0),
            changed: Notify::new(),
            presence,
            stop,
        });
        Ok((fleet, presence_tx, stop_tx))
    }

    /// Zeroes the attempt counters (failures, refusals, handshakes).
    pub fn reset_counters(&self) {
        for counter in [
            &self.failures,
            &self.port_refused,
            &self.shed,
            &self.resumed,
            &self.full_handshakes,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// Starts one fake agent per worker of `names` (all at once). Each has
    /// its own TLS session cache, as each real agent has in its own
    /// process, so reconnections resume their sessions as real ones do.
    pub fn spawn(
        self: &Arc<Self>,
        farm: &Farm,
        names: &[String],
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut agents = Vec::with_capacity(names.len());
        for name in names {
            let spec = farm.worker_spec(name)?;
            let tls = self.tls.as_ref().map(|shared| {
                let mut own = (**shared).clone();
                own.resumption = rustls::client::Resumption::in_memory_sessions(4);
                Arc::new(own)
            });
            agents.push(tokio::spawn(fake_agent(
                self.clone(),
                tls,
                spec.name.clone(),
                spec.token.clone(),
            )));
        }
        Ok(agents)
    }

    /// Waits until `connected` reaches `n` (within [`PHASE_LIMIT`]).
    pub async fn all_connected(&self, n: usize) -> anyhow::Result<()> {
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
    Lost {
        welcomed: bool,
    },
    Busy(Duration),
    /// Nothing listens on the port (the master is restarting).
    PortRefused,
}

/// One fake agent: connects, says hello, stays, reconnects as the real agent
/// does (spread over a second after losing a welcomed connection, then
/// backoff doubling from 200 ms to 10 s with jitter, to 2 s only while the
/// port refuses connections, a 503's Retry-After honoured).
pub async fn fake_agent(
    fleet: Arc<Fleet>,
    tls: Option<Arc<rustls::ClientConfig>>,
    name: String,
    token: String,
) {
    let mut backoff = Duration::from_millis(200);
    let mut stop = fleet.stop.clone();
    loop {
        let pause = match session(&fleet, &tls, &name, &token).await {
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
            SessionEnd::PortRefused => {
                fleet.port_refused.fetch_add(1, Ordering::Relaxed);
                backoff = backoff.min(Duration::from_secs(2));
                let pause = jittered(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                pause
            }
            SessionEnd::Busy(asked) => {
                fleet.shed.fetch_add(1, Ordering::Relaxed);
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

async fn session(
    fleet: &Fleet,
    tls: &Option<Arc<rustls::ClientConfig>>,
    name: &str,
    token: &str,
) -> SessionEnd {
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
        Some(match tls {
            Some(tls) => tokio_tungstenite::Connector::Rustls(tls.clone()),
            None => tokio_tungstenite::Connector::Plain,
        }),
    );
    // As the real agent: TCP, TLS, upgrade and welcome within 10 s.
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut ws = match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            let asked = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map_or(Duration::ZERO, Duration::from_secs);
            return SessionEnd::Busy(asked);
        }
        Ok(Err(tokio_tungstenite::tungstenite::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            return SessionEnd::PortRefused;
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
        outlook: None,
    };
    if ws.send(Message::text(hello.encode())).await.is_err() {
        return lost;
    }
    // The beat the master gives (longer for a big farm), as the agent keeps.
    let beat = match tokio::time::timeout_at(deadline, ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => match MasterMessage::decode(&text) {
            Ok(MasterMessage::Welcome { heartbeat_secs, .. }) if heartbeat_secs > 0 => {
                fleet.beat_secs.store(heartbeat_secs, Ordering::Relaxed);
                Duration::from_secs(heartbeat_secs)
            }
            Ok(MasterMessage::Welcome { .. }) => HEARTBEAT,
            _ => return lost,
        },
        _ => return lost,
    };
    let resumed = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Rustls(stream) => {
            stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        }
        _ => false,
    };
    if resumed {
        fleet.resumed.fetch_add(1, Ordering::Relaxed);
    } else if tls.is_some() {
        fleet.full_handshakes.fetch_add(1, Ordering::Relaxed);
    }
    fleet.connected.fetch_add(1, Ordering::AcqRel);
    fleet.changed.notify_waiters();
    let end = connected(fleet, &mut ws, &mut presence_rx, beat).await;
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
    heartbeat: Duration,
) -> SessionEnd {
    let mut stop = fleet.stop.clone();
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
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
                let answered = match MasterMessage::decode(&text) {
                    Ok(MasterMessage::Ping { seq }) => {
                        ws.send(Message::text(AgentMessage::Pong { seq }.encode())).await.is_ok()
                    }
                    Ok(MasterMessage::StartBuild { build_id, .. }) => {
                        run_build(ws, build_id).await.is_ok()
                    }
                    _ => true,
                };
                if !answered {
                    return gone;
                }
            }
            changed = presence_rx.changed() => {
                if changed.is_err() { return SessionEnd::Stop; }
                let state = *presence_rx.borrow_and_update();
                let frame = AgentMessage::Presence { presence: presence(state), outlook: None };
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

/// One kept-alive HTTP/1.1 connection (TLS or plain), so the figures
/// measure the farm and not the bench's own handshakes.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    token: String,
}

impl Conn {
    /// To the farm master's admin API (TLS unless the farm is insecure).
    pub async fn open(farm: &Farm) -> anyhow::Result<Conn> {
        let tls = if farm.is_insecure() {
            None
        } else {
            Some(farm.tls_client()?)
        };
        Conn::connect(farm.port, tls, farm.admin_token()?).await
    }

    /// To any HTTP server on loopback `port` (an agent's control plane
    /// too), over TLS when `tls` is given, with `token` as the bearer.
    pub async fn connect(
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: String,
    ) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let sender = match tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name.to_owned(), tcp)
                    .await?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                sender
            }
            None => {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(connection);
                sender
            }
        };
        Ok(Conn {
            sender,
            host: format!("127.0.0.1:{port}"),
            token,
        })
    }

    pub async fn call(
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

    /// Queues a build of `builder`; answers its id.
    pub async fn submit(&mut self, builder: &str) -> anyhow::Result<u64> {
        let body = serde_json::to_string(&SubmitRequest {
            builder: builder.to_owned(),
            properties: BTreeMap::new(),
            revision: None,
            branch: None,
        })?;
        let text = self.call("POST", "/api/v1/builds", Some(body)).await?;
        Ok(serde_json::from_str::<SubmitResponse>(&text)?.build_id)
    }

    /// Waits (long-polling) until build `id` is finished.
    pub async fn wait_finished(&mut self, id: u64) -> anyhow::Result<BuildInfo> {
        loop {
            let text = self
                .call(
                    "GET",
                    &format!("/api/v1/builds/{id}/wait?timeout_secs=60"),
                    None,
                )
                .await?;
            let build: BuildInfo = serde_json::from_str(&text)?;
            if build.state == BuildState::Finished {
                return Ok(build);
            }
        }
    }

    pub async fn available(&mut self) -> anyhow::Result<usize> {
        let text = self
            .call("GET", "/api/v1/workers?state=available&limit=1", None)
            .await?;
        Ok(serde_json::from_str::<WorkerPage>(&text)?.total)
    }
}

/// utime + stime of a process, in milliseconds.
pub fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(ticks * 1000.0 / hz)
}

/// Resident memory of `pid` in KB (`VmRSS`).
pub fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    status_kb(pid, "VmRSS:")
}

/// A KB figure of `/proc/PID/status`, by its field name (`"RssAnon:"`).
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = fs_err::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow!("no {field} for {pid}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("odd {field} line"))?
        .parse()?)
}

/// `total` builds from `clients` kept-alive connections (each submits,
/// waits for the result, goes again); returns builds/s.
pub async fn throughput(
    farm: &Farm,
    builder: &str,
    total: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut conn = Conn::open(farm).await?;
        let next = next.clone();
        let builder = builder.to_owned();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let id = conn.submit(&builder).await?;
                let build = conn.wait_finished(id).await?;
                if build.outcome != Some(Outcome::Success) {
                    bail!("build {id} ended {:?}", build.outcome);
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
