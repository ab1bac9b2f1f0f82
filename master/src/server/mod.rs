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

mod agent_socket;
mod limits;

use agent_socket::*;
pub use limits::*;

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
