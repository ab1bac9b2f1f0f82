//! The master's one port: a TCP accept loop (TCP_NODELAY, optional TLS) that
//! serves the axum router over hyper with upgrades, and the per-agent
//! WebSocket session (authentication, hello, frames, heartbeats).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use nightshift_proto::wire::{
    AgentMessage, HEARTBEAT_SECS, MAX_FRAME_BYTES, MasterMessage, PROTOCOL_VERSION, WS_PATH,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::{AppState, bearer, constant_time_eq, token_sha256};
use crate::scheduler::{Event, Hello, Outbound};

/// Time an agent has to send its hello after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats an agent may miss before its connection is dropped.
const MISSED_BEATS: u32 = 3;

/// The whole router: the admin API plus the agent endpoint.
pub fn router(state: AppState) -> Router {
    crate::api::router(state.clone())
        .route(WS_PATH, get(agent_upgrade))
        .route("/", get(crate::dashboard::page))
        .route("/builds/{id}", get(crate::build_page::page))
        .route("/builds/{id}/events", get(crate::build_page::events))
        .route(
            "/hooks/{name}",
            axum::routing::post(crate::triggers::webhook::receive),
        )
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // E.g. out of file descriptors: log and keep serving.
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(router.clone());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
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

async fn agent_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers);
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| agent_session(state, socket, token))
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
        ..
    } = hello
    else {
        return Err("the first frame must be a hello".into());
    };
    let config = state.config.get();
    let Some(def) = config.worker(&worker) else {
        return Err(format!("unknown worker `{worker}` or wrong token"));
    };
    let Some(token) = token else {
        return Err(format!(
            "worker `{worker}`: no token (send Authorization: Bearer <token> on the upgrade)"
        ));
    };
    // A latent instance presents the token made for its start.
    if !constant_time_eq(token_sha256(&token).as_bytes(), def.token_sha256.as_bytes())
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
    let (out, mut outbox) = mpsc::unbounded_channel();
    if state
        .events
        .send(Event::Connected {
            worker: worker.clone(),
            conn,
            hello,
            out,
        })
        .is_err()
    {
        return refuse(&mut socket, "master is stopping".into()).await;
    }
    let beat = Duration::from_secs(HEARTBEAT_SECS);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    let reason = loop {
        tokio::select! {
            outbound = outbox.recv() => match outbound {
                Some(Outbound::Message(message)) => {
                    if let Err(e) = socket.send(Message::Text(message.encode().into())).await {
                        break format!("send failed: {e}");
                    }
                }
                Some(Outbound::Close(why)) => {
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: truncate(&why, 120).into(),
                    }))).await;
                    break why;
                }
                None => break "master is stopping".into(),
            },
            frame = socket.recv() => {
                last_heard = Instant::now();
                match frame {
                    None => break "connection closed".into(),
                    Some(Err(e)) => break format!("bad frame: {e}"),
                    Some(Ok(Message::Text(text))) => match AgentMessage::decode(text.as_str()) {
                        Ok(AgentMessage::Ping { seq }) => {
                            let pong = MasterMessage::Pong { seq }.encode();
                            if let Err(e) = socket.send(Message::Text(pong.into())).await {
                                break format!("send failed: {e}");
                            }
                        }
                        Ok(AgentMessage::Pong { .. }) => {}
                        Ok(message) => {
                            let _ = state.events.send(Event::Agent {
                                worker: worker.clone(),
                                conn,
                                message,
                            });
                        }
                        Err(e) => {
                            let _ = socket.send(Message::Close(Some(CloseFrame {
                                code: 1007,
                                reason: truncate(&e.to_string(), 120).into(),
                            }))).await;
                            break e.to_string();
                        }
                    },
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
    let _ = state.events.send(Event::Disconnected {
        worker,
        conn,
        reason,
    });
}
