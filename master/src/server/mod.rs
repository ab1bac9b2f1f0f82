//! The master's one port: a TCP accept loop (large listen backlog,
//! TCP_NODELAY, optional TLS, a connection cap that sheds with "retry after",
//! a pause instead of a spin when descriptors run out) that serves the axum
//! router over hyper with upgrades, and the per-agent WebSocket session
//! (token checked at the upgrade, hello, frames, heartbeats, and the
//! per-connection frame rate limit: [`FrameLimits`], in
//! [`crate::connection_limits`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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

use crate::auth::{bearer, token_sha256};
use crate::connection_limits::{ConnectionGate, FrameLimits, FrameVerdict};
use crate::metrics::DisconnectReason;
use crate::outbox::Outbound;
use crate::outbox::{Next, agent_outbox};
use crate::scheduler::{Event, Hello};
use crate::state::AppState;

mod agent_socket;

use agent_socket::*;

use nightshift_proto::secret::constant_time_eq;

/// Time an agent has to send its hello after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats an agent may miss before its connection is dropped.
const MISSED_BEATS: u32 = 3;
/// Most heartbeats per second the whole farm sends the master: the beat
/// each agent is given in its welcome grows past [`HEARTBEAT_SECS`] with the
/// number of workers the master knows, so that this holds (each beat is a
/// TLS frame read, a pong written and a wakeup: ~0.1 ms of the master's
/// CPU on a loaded 2-core machine, so 400/s are 4 % of a core).
pub const FARM_HEARTBEATS_PER_SEC: u64 = 400;
/// The longest beat given (a dead connection is noticed within three).
pub const HEARTBEAT_MAX_SECS: u64 = 30;

/// The heartbeat period, in seconds, for a master that knows `workers`
/// workers (configured and enrolled): [`HEARTBEAT_SECS`] for most farms,
/// longer past 2,000 (10,000 workers: 25 s).
pub fn heartbeat_secs_for(workers: usize) -> u64 {
    let workers = u64::try_from(workers).unwrap_or(u64::MAX);
    workers
        .div_ceil(FARM_HEARTBEATS_PER_SEC)
        .clamp(HEARTBEAT_SECS, HEARTBEAT_MAX_SECS)
}
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

/// The router as hyper's service, putting the peer's address on every
/// request (`ConnectInfo<SocketAddr>`, read as an `Extension`, for limits per source
/// such as enrolment's) without a router of its own per connection.
#[derive(Clone)]
struct WithPeer {
    inner: TowerToHyperService<Router>,
    peer: SocketAddr,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for WithPeer {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
    >>::Response;
    type Error = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
    >>::Error;
    type Future = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
    >>::Future;

    fn call(&self, mut request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        self.inner.call(request)
    }
}

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
        .route("/api/v1/enroll", post(crate::enrolment::enroll))
        .merge(pages)
        .merge(forms)
        .route(
            "/api/v1/agent/builds/{id}/artifacts/{*name}",
            axum::routing::put(crate::artifacts::upload),
        )
        .route(
            "/hooks/{name}",
            axum::routing::post(crate::webhook::receive),
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
        let service = WithPeer {
            inner: TowerToHyperService::new(router),
            peer,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_grows_with_the_farm_past_400_beats_per_second() {
        assert_eq!(heartbeat_secs_for(0), HEARTBEAT_SECS);
        assert_eq!(heartbeat_secs_for(4), HEARTBEAT_SECS);
        assert_eq!(heartbeat_secs_for(2_000), HEARTBEAT_SECS);
        assert_eq!(heartbeat_secs_for(2_001), 6);
        assert_eq!(heartbeat_secs_for(10_000), 25);
        assert_eq!(heartbeat_secs_for(1_000_000), HEARTBEAT_MAX_SECS);
        for workers in [1, 999, 2_001, 10_000, 11_999] {
            let beat = heartbeat_secs_for(workers);
            assert!(
                workers as u64 <= beat * FARM_HEARTBEATS_PER_SEC,
                "{workers} workers at one beat per {beat} s exceed the farm's rate"
            );
        }
    }
}
