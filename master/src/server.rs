//! The master's one port: a TCP accept loop (large listen backlog,
//! TCP_NODELAY, optional TLS, a connection cap that sheds with "retry after",
//! a pause instead of a spin when descriptors run out) that serves the axum
//! router over hyper with upgrades, and the per-agent WebSocket session
//! (token checked at the upgrade, hello, frames, heartbeats, and the
//! per-connection frame rate limit: [`FrameLimits`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use nightshift_proto::api::ApiError;
use nightshift_proto::wire::{
    AgentMessage, HEARTBEAT_SECS, MAX_FRAME_BYTES, MasterMessage, PROTOCOL_VERSION, WS_PATH,
};
use tokio::net::{TcpListener, TcpSocket};

use crate::api::{AppState, bearer, token_sha256};
use crate::config::AgentLimits;
use crate::metrics::DisconnectReason;
use crate::outbox::{Next, agent_outbox};
use crate::scheduler::{Event, Hello, Outbound};
use nightshift_proto::secret::constant_time_eq;

/// Time an agent has to send its hello after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats an agent may miss before its connection is dropped.
const MISSED_BEATS: u32 = 3;
/// Pending connections the kernel queues for us (it caps this at
/// `net.core.somaxconn`): 10,000 agents reconnecting at once after a restart
/// must wait in the queue, not time out in SYN retries as with 128.
pub const LISTEN_BACKLOG: u32 = 8192;
/// Descriptors kept for everything that is not a connection: SQLite and its
/// WAL, the log, latent instances' pipes, the runtime.
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// Per-connection WebSocket read buffer. Agent frames are small (a presence
/// is ~200 bytes); a bigger frame grows the buffer as needed. The library's
/// default, 128 KiB zero-filled before each read, cost 128 KiB per agent
/// and a 128 KiB memset per heartbeat.
pub const WS_READ_BUFFER: usize = 4 * 1024;
/// Frames are written at once (each send is flushed anyway): no write
/// buffer is kept per connection.
pub const WS_WRITE_BUFFER: usize = 0;
/// Longest the accept loop pauses when the process is out of descriptors.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// A connection refused over the cap is told to come back after between
/// this many seconds and twice that (jittered, so a storm spreads out).
const RETRY_AFTER_SECS: u64 = 2;

/// Binds the master's port with a backlog of [`LISTEN_BACKLOG`].
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft descriptor limit to the hard one and says how many
/// connections that leaves room for (after [`RESERVED_DESCRIPTORS`]).
pub fn raise_descriptor_limit() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("cannot read the descriptor limit: {e}");
            return (1024, 1024 - RESERVED_DESCRIPTORS);
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the descriptor limit from {soft} to {hard}: {e}");
                soft
            }
        }
    } else {
        soft
    };
    (limit, limit.saturating_sub(RESERVED_DESCRIPTORS).max(1))
}

/// Counts open connections against the cap. A slot is given back when its
/// [`ConnectionSlot`] drops, however the connection ended.
#[derive(Debug)]
pub struct ConnectionGate {
    open: AtomicUsize,
    max: usize,
}

impl ConnectionGate {
    pub fn new(max: usize) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            open: AtomicUsize::new(0),
            max: max.max(1),
        })
    }

    /// Takes a slot unless `max` connections are open.
    pub fn enter(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(self)))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One open connection's place under the cap.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<ConnectionGate>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up. Its
/// clock is a parameter, so tests choose the instants.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token, going into debt if there is none; answers how long
    /// until the debt is paid (zero when there was a token).
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What to do with one frame from an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameVerdict {
    /// Handle it now.
    Pass,
    /// Handle it after this pause (the connection is over its rate).
    Throttle(Duration),
    /// Close the connection with this reason.
    Disconnect(String),
}

/// The per-connection frame rate limit (`[agent_limits]`): every frame
/// counts against `frames_per_second` (over it, reading slows down:
/// backpressure); control frames also count against
/// `control_frames_per_second`, and an agent that exhausts that burst is
/// flooding and is disconnected.
#[derive(Debug, Clone)]
pub struct FrameLimits {
    all: TokenBucket,
    control: TokenBucket,
}

impl FrameLimits {
    pub fn new(limits: &AgentLimits, now: Instant) -> FrameLimits {
        FrameLimits {
            all: TokenBucket::new(
                f64::from(limits.frames_per_second),
                f64::from(limits.frame_burst),
                now,
            ),
            control: TokenBucket::new(
                f64::from(limits.control_frames_per_second),
                f64::from(limits.control_frame_burst),
                now,
            ),
        }
    }

    pub fn check(&mut self, message: &AgentMessage, now: Instant) -> FrameVerdict {
        let control = matches!(
            message,
            AgentMessage::Hello { .. }
                | AgentMessage::Presence { .. }
                | AgentMessage::BuildAccepted { .. }
                | AgentMessage::BuildRefused { .. }
                | AgentMessage::StepWaiting { .. }
                | AgentMessage::Goodbye { .. }
        );
        if control && !self.control.take(now).is_zero() {
            return FrameVerdict::Disconnect(format!(
                "rate limit: more than {} control frames (presence, step waits, \
                 accepted/refused) at over {}/s",
                self.control.burst, self.control.rate
            ));
        }
        match self.all.take(now) {
            wait if wait.is_zero() => FrameVerdict::Pass,
            wait => FrameVerdict::Throttle(wait),
        }
    }
}

/// The whole router: the admin API plus the agent endpoint.
pub fn router(state: AppState) -> Router {
    // The dashboard's pages: readable by anyone, or only after a login
    // (`dashboard`); the gate also tells each page who is looking.
    let pages = Router::new()
        .route("/", get(crate::dashboard::page))
        .route("/builds/{id}", get(crate::build_page::page))
        .route("/builds/{id}/events", get(crate::build_page::events))
        .route(
            "/builds/{id}/artifacts/{*name}",
            get(crate::artifacts::download),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::session::gate,
        ));
    // Logins and actions check their own session, CSRF token and origin.
    let forms = Router::new()
        .route(
            "/login",
            get(crate::session::login_page).post(crate::session::login),
        )
        .route("/logout", post(crate::session::logout))
        .route("/builds/{id}/cancel", post(crate::actions::cancel))
        .route("/builds/{id}/rebuild", post(crate::actions::rebuild))
        .route("/farm/pause", post(crate::actions::pause))
        .route("/farm/resume", post(crate::actions::resume));
    crate::api::router(state.clone())
        .route(WS_PATH, get(agent_upgrade))
        .route("/api/v1/enroll", post(crate::worker_groups::enroll))
        .merge(pages)
        .merge(forms)
        .route(
            "/api/v1/agent/builds/{id}/artifacts/{*name}",
            axum::routing::put(crate::artifacts::upload),
        )
        .route(
            "/hooks/{name}",
            axum::routing::post(crate::triggers::webhook::receive),
        )
        .with_state(state)
}

/// Whether an accept error means the process (or system) is out of
/// descriptors or memory: retrying at once would spin.
fn out_of_resources(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The answer over a cap (`what`: "agents" or "connections"): 503 with a
/// jittered `Retry-After`, then close.
fn over_capacity(what: &str, limit: usize) -> Response {
    let seconds = RETRY_AFTER_SECS + rand::random_range(0..=RETRY_AFTER_SECS);
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(ApiError {
            error: format!("the master is at its limit of {limit} {what}; retry after {seconds} s"),
        }),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Serves `router` on `listener` until `shutdown` resolves, holding at most
/// `gate.max()` connections. Over the cap, up to a sixteenth more are
/// answered 503 with `Retry-After` (and closed); beyond that a connection is
/// closed at once, before its TLS handshake costs anything.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    gate: Arc<ConnectionGate>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let shedding = ConnectionGate::new((gate.max() / 16).clamp(16, 1024));
    let mut pause = Duration::ZERO;
    let mut shed_since_log = 0u64;
    let mut last_shed_log: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    pause = Duration::ZERO;
                    pair
                }
                Err(e) if out_of_resources(&e) => {
                    // Retrying at once would spin at 100 % CPU and flood
                    // the log: pause (doubling up to a second) so that
                    // connections ending free descriptors meanwhile.
                    pause = (pause * 2).clamp(Duration::from_millis(10), ACCEPT_PAUSE_MAX);
                    tracing::warn!(
                        "accept failed: {e}; {} connections open (limit {}); pausing accepts for {} ms",
                        gate.open(),
                        gate.max(),
                        pause.as_millis()
                    );
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
                Err(e) => {
                    // E.g. a peer that reset before we accepted it.
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
            },
        };
        let (slot, router) = match gate.enter() {
            Some(slot) => (slot, router.clone()),
            None => {
                shed_since_log += 1;
                if last_shed_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        "at the connection limit ({}): {shed_since_log} connections refused with retry-after since the last report",
                        gate.max()
                    );
                    shed_since_log = 0;
                    last_shed_log = Some(Instant::now());
                }
                match shedding.enter() {
                    Some(slot) => {
                        let limit = gate.max();
                        let refuse = Router::new()
                            .fallback(move || async move { over_capacity("connections", limit) });
                        (slot, refuse)
                    }
                    // Beyond even that: close before the handshake.
                    None => continue,
                }
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(router);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // HTTP/1.1 only: agents, the CLI and browsers all speak it (no
            // ALPN offers h2), and WebSockets upgrade from it.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new());
            let result = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::info!("{peer}: TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::info!("{peer}: TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => {
                    builder
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!("{peer}: connection ended: {e}");
            }
        });
    }
}

/// Whether `token` belongs to some worker (configured, enrolled in a
/// configured group, or a latent instance started by this master). A
/// group's enrolment token is not a worker token: it is refused here. Checked before the upgrade, so a stranger costs
/// one HTTP answer instead of a WebSocket session waiting for a hello.
fn token_known(state: &AppState, token: &str) -> bool {
    let hash = token_sha256(token);
    let config = state.config.get();
    config.workers_with_token(&hash).next().is_some()
        || state.latent_tokens.worker_with_hash(&hash).is_some()
        || state
            .enrolled
            .with_token(&hash)
            .is_some_and(|member| config.worker_group(&member.group).is_some())
}

async fn agent_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return unauthorized("no token (send Authorization: Bearer <token> on the upgrade)");
    };
    if !token_known(&state, &token) {
        return unauthorized("unknown worker or wrong token");
    }
    let Some(slot) = state.agent_slots.enter() else {
        tracing::warn!(
            "an agent was refused with retry-after: {} agents connected, the limit (max_agents)",
            state.agent_slots.max()
        );
        return over_capacity("agents", state.agent_slots.max());
    };
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            agent_session(state, socket, Some(token)).await;
        })
}

fn unauthorized(reason: &str) -> Response {
    tracing::warn!("agent refused at the upgrade: {reason}");
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(ApiError {
            error: reason.to_owned(),
        }),
    )
        .into_response()
}

async fn refuse(socket: &mut WebSocket, reason: String) {
    tracing::warn!("agent refused: {reason}");
    let frame = MasterMessage::Refused {
        reason: reason.clone(),
    }
    .encode();
    let _ = socket.send(Message::Text(frame.into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1008,
            reason: truncate(&reason, 120).into(),
        })))
        .await;
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Reads and checks the hello: version, worker, token.
async fn read_hello(
    state: &AppState,
    socket: &mut WebSocket,
    token: Option<String>,
) -> Result<(String, Hello), String> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await {
        Err(_) => return Err("no hello within 10s".into()),
        Ok(None) => return Err("closed before its hello".into()),
        Ok(Some(Err(e))) => return Err(format!("bad first frame: {e}")),
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(_))) => return Err("the first frame must be a JSON text hello".into()),
    };
    let value: serde_json::Value =
        serde_json::from_str(first.as_str()).map_err(|e| format!("bad hello: not JSON: {e}"))?;
    if value.get("type").and_then(|t| t.as_str()) != Some("hello") {
        return Err("the first frame must be a hello".into());
    }
    match value.get("protocol").and_then(|p| p.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} is not supported; this master speaks version {PROTOCOL_VERSION}"
            ));
        }
        None => return Err("bad hello: no protocol version".into()),
    }
    let hello = AgentMessage::decode(first.as_str()).map_err(|e| format!("bad hello: {e}"))?;
    let AgentMessage::Hello {
        worker,
        agent_version,
        max_builds,
        presence,
        running,
        outlook,
        ..
    } = hello
    else {
        return Err("the first frame must be a hello".into());
    };
    let config = state.config.get();
    // A `[[worker]]`'s token hash, or an enrolled member's (of a group
    // still configured).
    let expected = match config.worker(&worker) {
        Some(def) => def.token_sha256.clone(),
        None => match state.enrolled.member(&worker) {
            Some(member) if config.worker_group(&member.group).is_some() => member.token_sha256,
            _ => return Err(format!("unknown worker `{worker}` or wrong token")),
        },
    };
    let Some(token) = token else {
        return Err(format!(
            "worker `{worker}`: no token (send Authorization: Bearer <token> on the upgrade)"
        ));
    };
    // A latent instance presents the token made for its start.
    if !constant_time_eq(token_sha256(&token).as_bytes(), expected.as_bytes())
        && !state.latent_tokens.matches(&worker, &token)
    {
        return Err(format!("unknown worker `{worker}` or wrong token"));
    }
    Ok((
        worker,
        Hello {
            agent_version,
            max_builds,
            presence,
            running,
            outlook,
        },
    ))
}

/// One agent's connection, from hello to close.
async fn agent_session(state: AppState, mut socket: WebSocket, token: Option<String>) {
    let (worker, hello) = match read_hello(&state, &mut socket, token).await {
        Ok(pair) => pair,
        Err(reason) => return refuse(&mut socket, reason).await,
    };
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    // Limits as configured when the agent connected (a reconfig applies to
    // later connections).
    let agent_limits = state.config.get().agent_limits;
    let outbox_frames = agent_limits.outbox_frames as usize;
    let (out, mut outbox) = agent_outbox(outbox_frames);
    // Connection events go through the bounded agent inbox, in order: a
    // full inbox makes this task wait, and its socket is not read meanwhile.
    if state
        .agent_events
        .send(Event::Connected {
            worker: worker.clone(),
            conn,
            hello,
            out,
        })
        .await
        .is_err()
    {
        return refuse(&mut socket, "master is stopping".into()).await;
    }
    let beat = Duration::from_secs(HEARTBEAT_SECS);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
    let mut last_heard = Instant::now();
    let mut limits = FrameLimits::new(&agent_limits, Instant::now());
    let mut seq = 0u64;
    let reason = loop {
        tokio::select! {
            outbound = outbox.next() => match outbound {
                Next::Frame(Outbound::Message(message)) => {
                    if let Err(e) = socket.send(Message::Text(message.encode().into())).await {
                        break format!("send failed: {e}");
                    }
                }
                Next::Frame(Outbound::AfterCommit(committed)) => committed.wait().await,
                Next::Frame(Outbound::Close(why)) => {
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: truncate(&why, 120).into(),
                    }))).await;
                    break why;
                }
                Next::Overflowed => {
                    let why = format!(
                        "outbox full: the agent did not read its last {outbox_frames} frames"
                    );
                    tracing::warn!("worker {worker}: disconnected: {why}");
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: truncate(&why, 120).into(),
                    }))).await;
                    break why;
                }
                Next::Dropped => break "master is stopping".into(),
            },
            frame = socket.recv() => {
                last_heard = Instant::now();
                match frame {
                    None => break "connection closed".into(),
                    Some(Err(e)) => break format!("bad frame: {e}"),
                    Some(Ok(Message::Text(text))) => {
                        let message = match AgentMessage::decode(text.as_str()) {
                            Ok(message) => message,
                            Err(e) => {
                                crate::metrics::METRICS.disconnected(DisconnectReason::BadFrame);
                                let _ = socket.send(Message::Close(Some(CloseFrame {
                                    code: 1007,
                                    reason: truncate(&e.to_string(), 120).into(),
                                }))).await;
                                break e.to_string();
                            }
                        };
                        match limits.check(&message, Instant::now()) {
                            FrameVerdict::Pass => {}
                            FrameVerdict::Throttle(wait) => {
                                // Not reading meanwhile: TCP pushes back on the agent.
                                crate::metrics::METRICS.frame_rate_limited();
                                tokio::time::sleep(wait).await;
                            }
                            FrameVerdict::Disconnect(why) => {
                                crate::metrics::METRICS.disconnected(DisconnectReason::RateLimited);
                                tracing::warn!("worker {worker}: disconnected: {why}");
                                let _ = socket.send(Message::Close(Some(CloseFrame {
                                    code: 1008,
                                    reason: truncate(&why, 120).into(),
                                }))).await;
                                break why;
                            }
                        }
                        match message {
                            AgentMessage::Ping { seq } => {
                                let pong = MasterMessage::Pong { seq }.encode();
                                if let Err(e) = socket.send(Message::Text(pong.into())).await {
                                    break format!("send failed: {e}");
                                }
                            }
                            AgentMessage::Pong { .. } => {}
                            message => {
                                let event = Event::Agent {
                                    worker: worker.clone(),
                                    conn,
                                    message,
                                };
                                if state.agent_events.send(event).await.is_err() {
                                    break "master is stopping".into();
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let _ = socket.send(Message::Close(Some(CloseFrame {
                            code: 1003,
                            reason: "binary frames are not part of the protocol".into(),
                        }))).await;
                        break "bad frame: binary frames are not part of the protocol".into();
                    }
                    Some(Ok(Message::Close(_))) => break "agent closed the connection".into(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > beat * MISSED_BEATS {
                    crate::metrics::METRICS.disconnected(DisconnectReason::Silent);
                    break format!("silent for {}s (missed heartbeats)", last_heard.elapsed().as_secs());
                }
                seq += 1;
                let ping = MasterMessage::Ping { seq }.encode();
                if let Err(e) = socket.send(Message::Text(ping.into())).await {
                    break format!("send failed: {e}");
                }
            }
        }
    };
    tracing::info!("worker {worker}: connection closed: {reason}");
    let _ = state
        .agent_events
        .send(Event::Disconnected {
            worker,
            conn,
            reason,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_policy::{Presence, PresenceState, Source};

    fn presence_frame() -> AgentMessage {
        AgentMessage::Presence {
            presence: Presence {
                state: PresenceState::Available,
                reason: "flip".into(),
                source: Source::Manual,
                since: jiff::Timestamp::UNIX_EPOCH,
                until: None,
            },
            outlook: None,
        }
    }

    fn output_frame() -> AgentMessage {
        AgentMessage::Output {
            build_id: 1,
            step: 0,
            data: "y\n".into(),
        }
    }

    #[test]
    fn output_past_the_burst_is_throttled_to_the_rate_and_never_disconnected() {
        let start = Instant::now();
        let defaults = AgentLimits::default();
        let mut limits = FrameLimits::new(&defaults, start);
        for _ in 0..defaults.frame_burst {
            assert_eq!(limits.check(&output_frame(), start), FrameVerdict::Pass);
        }
        match limits.check(&output_frame(), start) {
            FrameVerdict::Throttle(wait) => {
                assert_eq!(
                    wait,
                    Duration::from_secs_f64(1.0 / f64::from(defaults.frames_per_second))
                );
            }
            other => panic!("expected a throttle, got {other:?}"),
        }
        // Far over the rate for long: still only throttled (a chatty build).
        for _ in 0..10_000 {
            assert!(matches!(
                limits.check(&output_frame(), start),
                FrameVerdict::Throttle(_)
            ));
        }
        // Once the debt is paid (at the sustained rate), frames pass again.
        let later =
            start + Duration::from_secs_f64(10_002.0 / f64::from(defaults.frames_per_second));
        assert_eq!(limits.check(&output_frame(), later), FrameVerdict::Pass);
    }

    #[test]
    fn a_presence_flood_is_disconnected_but_a_steady_pace_is_not() {
        let start = Instant::now();
        let defaults = AgentLimits::default();
        let mut steady = FrameLimits::new(&defaults, start);
        for i in 0..10_000u32 {
            let at = start
                + Duration::from_secs_f64(
                    f64::from(i) / f64::from(defaults.control_frames_per_second),
                );
            assert_eq!(
                steady.check(&presence_frame(), at),
                FrameVerdict::Pass,
                "frame {i}"
            );
        }
        let mut flood = FrameLimits::new(&defaults, start);
        for _ in 0..defaults.control_frame_burst {
            assert_eq!(flood.check(&presence_frame(), start), FrameVerdict::Pass);
        }
        match flood.check(&presence_frame(), start) {
            FrameVerdict::Disconnect(why) => assert!(why.contains("rate limit"), "{why}"),
            other => panic!("expected a disconnect, got {other:?}"),
        }
    }

    #[test]
    fn configured_limits_are_the_ones_applied() {
        let start = Instant::now();
        let limits = AgentLimits {
            frames_per_second: 4,
            frame_burst: 2,
            control_frames_per_second: 1,
            control_frame_burst: 3,
            outbox_frames: 8,
        };
        let mut frames = FrameLimits::new(&limits, start);
        assert_eq!(frames.check(&output_frame(), start), FrameVerdict::Pass);
        assert_eq!(frames.check(&output_frame(), start), FrameVerdict::Pass);
        assert_eq!(
            frames.check(&output_frame(), start),
            FrameVerdict::Throttle(Duration::from_millis(250))
        );
        let mut control = FrameLimits::new(&limits, start);
        for _ in 0..3 {
            assert!(!matches!(
                control.check(&presence_frame(), start),
                FrameVerdict::Disconnect(_)
            ));
        }
        match control.check(&presence_frame(), start) {
            FrameVerdict::Disconnect(why) => {
                assert!(why.contains("more than 3 control frames"), "{why}");
                assert!(why.contains("over 1/s"), "{why}");
            }
            other => panic!("expected a disconnect, got {other:?}"),
        }
    }
}
