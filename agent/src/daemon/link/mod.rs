//! The agent's connection to its master: one WebSocket (TLS unless the
//! config says `insecure = true`), the hello, heartbeats, and reconnecting
//! with exponential backoff and jitter.
//!
//! The link task owns the socket. The event loop sends it [`AgentMessage`]s
//! and hears [`LinkEvent`]s; it only sends while the link is up, and the link
//! discards anything left over from a previous connection before its hello
//! (the hello carries the current presence and running builds, and spooled
//! results are re-sent after every welcome).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nightshift_policy::Presence;
use nightshift_proto::wire::{
    AgentMessage, BuildId, HEARTBEAT_SECS, MAX_FRAME_BYTES, MasterMessage, Outlook,
    PROTOCOL_VERSION, WS_PATH,
};
use tokio::sync::{mpsc, watch};

use super::outgoing::{LinkReceiver, Outgoing};
use tokio::time::Instant;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A connection attempt (TCP, TLS, upgrade, welcome) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The link is dropped after this many heartbeats without hearing anything.
const MISSED_BEATS: u32 = 3;
const BACKOFF_START: Duration = Duration::from_millis(200);
/// After losing an established connection the first attempt comes at a
/// uniformly random instant within this window: when a master restarts,
/// all its agents lost their connections in the same instant, and spreading
/// their first attempts turns 10,000 simultaneous TLS handshakes into about
/// ten per millisecond.
const RECONNECT_SPREAD: Duration = Duration::from_secs(1);
/// Longest pause while the master's port refuses connections: nothing
/// listens there, as while a master restarts, and it will be back soon; a
/// short cap brings its agents back within seconds of its return (jitter
/// still spreads them), where the general cap (`backoff_max`) would leave
/// them waiting up to its full length.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest `Retry-After` from a master that is honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// How to reach the master.
#[derive(Clone)]
pub struct LinkSettings {
    /// `wss://host:port` (or `ws://` when insecure), with or without the path.
    pub url: String,
    pub token: String,
    pub worker: String,
    pub max_builds: u32,
    /// `None` for plain `ws://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Longest pause between reconnection attempts.
    pub backoff_max: Duration,
}

/// What goes into each hello; the event loop keeps it current.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloState {
    pub presence: Presence,
    pub running: Vec<BuildId>,
    /// The time ahead, sent with the hello.
    pub outlook: Outlook,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Welcomed. `presence` is what the hello told the master.
    Up {
        presence: Presence,
        cancel: Vec<BuildId>,
        /// The master's `missing_timeout`, when it says (the lock fence).
        missing_timeout: Option<Duration>,
    },
    /// The connection ended or an attempt failed; the link retries.
    Down {
        error: String,
    },
    /// The master refused the hello (wrong token, version...); the link retries.
    Refused {
        reason: String,
    },
    Frame(MasterMessage),
}

/// The endpoint URL: the configured master URL with [`WS_PATH`] when it has
/// no path of its own. Checks the scheme against whether TLS is on.
pub fn endpoint(url: &str, insecure: bool) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("master URL `{url}` has no scheme; expected wss://host:port"))?;
    match scheme {
        "wss" | "https" => {}
        "ws" | "http" if insecure => {}
        "ws" | "http" => {
            return Err(format!(
                "master URL `{url}` is not encrypted; use wss:// or set `insecure = true`"
            ));
        }
        other => {
            return Err(format!(
                "master URL `{url}`: unknown scheme `{other}`, expected wss"
            ));
        }
    }
    let scheme = if matches!(scheme, "wss" | "https") {
        "wss"
    } else {
        "ws"
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(format!("master URL `{url}` has no host"));
    }
    if rest.contains('/') {
        Ok(format!("{scheme}://{rest}"))
    } else {
        Ok(format!("{scheme}://{rest}{WS_PATH}"))
    }
}

/// Starts the link task. It ends after sending a `Goodbye` (or when the
/// outbound channel closes).
pub fn spawn(
    settings: LinkSettings,
    hello: watch::Receiver<HelloState>,
    outbound: LinkReceiver,
    events: mpsc::UnboundedSender<LinkEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(settings, hello, outbound, events))
}

enum SessionEnd {
    /// Goodbye sent or the agent is exiting: stop for good.
    Finished,
    /// Lost; `welcomed` says whether the master had accepted us, and
    /// `retry_after` is how long a master at its limit asked us to wait.
    Lost {
        error: String,
        welcomed: bool,
        retry_after: Option<Duration>,
        /// The TCP connection was refused: nothing listens on the port.
        port_refused: bool,
    },
    Refused(String),
}

/// The pause before the next attempt after a connection that was never
/// welcomed, and the backoff after it: exponential with jitter up to
/// `backoff_max` (up to [`REFUSED_BACKOFF_MAX`] while the port refuses), and
/// never sooner than a master's `Retry-After`.
fn next_pause(
    backoff: Duration,
    backoff_max: Duration,
    port_refused: bool,
    retry_after: Option<Duration>,
) -> (Duration, Duration) {
    let cap = if port_refused {
        backoff_max.min(REFUSED_BACKOFF_MAX)
    } else {
        backoff_max
    }
    .max(BACKOFF_START);
    let backoff = backoff.min(cap);
    let pause = jittered(backoff);
    let pause = retry_after.map_or(pause, |asked| asked.min(RETRY_AFTER_MAX).max(pause));
    (pause, (backoff * 2).min(cap))
}

async fn run(
    settings: LinkSettings,
    hello: watch::Receiver<HelloState>,
    mut outbound: LinkReceiver,
    events: mpsc::UnboundedSender<LinkEvent>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        // Frames meant for the previous connection are stale now (dropping
        // them gives back their credit), and so is an overflow.
        loop {
            match outbound.try_recv() {
                Ok(Outgoing {
                    message: AgentMessage::Goodbye { .. },
                    ..
                })
                | Err(mpsc::error::TryRecvError::Disconnected) => {
                    return;
                }
                Ok(_) => continue,
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        outbound.forget_overflow();
        let end = session(&settings, &hello, &mut outbound, &events).await;
        let pause = match end {
            SessionEnd::Finished => return,
            SessionEnd::Lost {
                error,
                welcomed,
                retry_after,
                port_refused,
            } => {
                let _ = events.send(LinkEvent::Down { error });
                if welcomed {
                    backoff = BACKOFF_START;
                    spread(RECONNECT_SPREAD)
                } else {
                    let (pause, next) =
                        next_pause(backoff, settings.backoff_max, port_refused, retry_after);
                    backoff = next;
                    pause
                }
            }
            SessionEnd::Refused(reason) => {
                let _ = events.send(LinkEvent::Refused { reason });
                let pause = jittered(backoff);
                backoff = (backoff * 2).min(settings.backoff_max.max(BACKOFF_START));
                pause
            }
        };
        let wake = Instant::now() + pause;
        // Wait, but leave at once when the agent says goodbye meanwhile.
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                frame = outbound.recv() => match frame {
                    None
                    | Some(Outgoing {
                        message: AgentMessage::Goodbye { .. },
                        ..
                    }) => return,
                    Some(_) => {}
                },
            }
        }
    }
}

/// Somewhere in the upper half of `backoff`, so reconnecting agents spread out.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let extra = rand::random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(extra)
}

/// Anywhere from nothing to `window`, uniformly.
fn spread(window: Duration) -> Duration {
    Duration::from_millis(rand::random_range(0..=window.as_millis() as u64))
}

/// What an HTTP answer to the upgrade means: 401/403 is a refusal (wrong
/// token), 503 a master at its connection limit that says when to retry.
fn http_refusal(
    url: &str,
    response: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>,
) -> SessionEnd {
    let status = response.status();
    let body = response
        .body()
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let reason = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().chars().take(200).collect());
    match status.as_u16() {
        401 | 403 => SessionEnd::Refused(reason),
        code => SessionEnd::Lost {
            error: format!("the master at {url} answered {code}: {reason}"),
            welcomed: false,
            port_refused: false,
            retry_after: response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
    }
}

async fn session(
    settings: &LinkSettings,
    hello: &watch::Receiver<HelloState>,
    outbound: &mut LinkReceiver,
    events: &mpsc::UnboundedSender<LinkEvent>,
) -> SessionEnd {
    let lost = |error: String| SessionEnd::Lost {
        error,
        welcomed: false,
        retry_after: None,
        port_refused: false,
    };
    let mut request = match settings.url.as_str().into_client_request() {
        Ok(request) => request,
        Err(error) => return lost(format!("bad master URL `{}`: {error}", settings.url)),
    };
    match HeaderValue::from_str(&format!("Bearer {}", settings.token)) {
        Ok(value) => {
            request.headers_mut().insert("authorization", value);
        }
        Err(_) => return lost("the token contains characters not allowed in a header".into()),
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let connector = match &settings.tls {
        Some(tls) => Connector::Rustls(tls.clone()),
        None => Connector::Plain,
    };
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config),
        true,
        Some(connector),
    );
    let mut socket = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Err(_) => return lost(format!("connecting to {} timed out", settings.url)),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            return http_refusal(&settings.url, &response);
        }
        Ok(Err(tokio_tungstenite::tungstenite::Error::Io(error)))
            if error.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            return SessionEnd::Lost {
                error: format!("cannot connect to {}: {error}", settings.url),
                welcomed: false,
                retry_after: None,
                port_refused: true,
            };
        }
        Ok(Err(error)) => return lost(format!("cannot connect to {}: {error}", settings.url)),
        Ok(Ok((socket, _response))) => socket,
    };

    let said_hello = hello.borrow().clone();
    let hello_frame = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        worker: settings.worker.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        max_builds: settings.max_builds,
        presence: said_hello.presence.clone(),
        running: said_hello.running.clone(),
        outlook: Some(said_hello.outlook.clone()),
    };
    if let Err(error) = socket.send(Message::text(hello_frame.encode())).await {
        return lost(format!("sending the hello failed: {error}"));
    }
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Ok(MasterMessage::decode(&text)),
                Some(Ok(Message::Close(frame))) => {
                    return Err(match frame {
                        Some(frame) => {
                            format!("the master closed the connection: {}", frame.reason)
                        }
                        None => "the master closed the connection".to_owned(),
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(format!("connection failed: {error}")),
                None => return Err("the master closed the connection".to_owned()),
            }
        }
    })
    .await;
    let heartbeat_secs = match answer {
        Err(_) => return lost("the master did not answer the hello".into()),
        Ok(Err(error)) => return lost(error),
        Ok(Ok(Err(error))) => return lost(format!("the master's answer to the hello: {error}")),
        Ok(Ok(Ok(MasterMessage::Refused { reason }))) => {
            let _ = socket.close(None).await;
            return SessionEnd::Refused(reason);
        }
        Ok(Ok(Ok(MasterMessage::Welcome {
            protocol,
            heartbeat_secs,
            cancel,
            missing_timeout_secs,
            ..
        }))) => {
            if protocol != PROTOCOL_VERSION {
                let _ = socket.close(None).await;
                return SessionEnd::Refused(format!(
                    "the master speaks protocol {protocol}, this agent {PROTOCOL_VERSION}"
                ));
            }
            let _ = events.send(LinkEvent::Up {
                presence: said_hello.presence,
                cancel,
                missing_timeout: missing_timeout_secs.map(Duration::from_secs),
            });
            heartbeat_secs
        }
        Ok(Ok(Ok(other))) => {
            return lost(format!(
                "the master answered the hello with {other:?} instead of a welcome"
            ));
        }
    };

    let beat = Duration::from_secs(if heartbeat_secs == 0 {
        HEARTBEAT_SECS
    } else {
        heartbeat_secs
    });
    let mut ticker = tokio::time::interval_at(Instant::now() + beat, beat);
    let overflow = outbound.overflow_signal();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    let welcomed_lost = |error: String| SessionEnd::Lost {
        error,
        welcomed: true,
        retry_after: None,
        port_refused: false,
    };
    loop {
        tokio::select! {
            frame = outbound.recv() => {
                let Some(Outgoing { message, credit }) = frame else {
                    let _ = socket.close(None).await;
                    return SessionEnd::Finished;
                };
                let goodbye = matches!(message, AgentMessage::Goodbye { .. });
                // A master that reads nothing for this long is not coming
                // back on this connection (a slow one still makes progress).
                let sent = tokio::time::timeout(
                    beat * MISSED_BEATS,
                    socket.send(Message::text(message.encode())),
                )
                .await;
                // Written (or failed): its credit goes back to the runner.
                drop(credit);
                match sent {
                    Ok(Ok(())) => {}
                    _ if goodbye => return SessionEnd::Finished,
                    Ok(Err(error)) => {
                        return welcomed_lost(format!("sending to the master failed: {error}"));
                    }
                    Err(_) => {
                        return welcomed_lost(format!(
                            "the master read nothing for {} s",
                            (beat * MISSED_BEATS).as_secs()
                        ));
                    }
                }
                if goodbye {
                    let _ = tokio::time::timeout(Duration::from_secs(2), socket.close(None)).await;
                    return SessionEnd::Finished;
                }
            }
            frame = socket.next() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => match MasterMessage::decode(&text) {
                        Ok(MasterMessage::Ping { seq }) => {
                            let pong = AgentMessage::Pong { seq }.encode();
                            if let Err(error) = socket.send(Message::text(pong)).await {
                                return welcomed_lost(format!("sending to the master failed: {error}"));
                            }
                        }
                        Ok(MasterMessage::Pong { .. }) => {}
                        Ok(message) => {
                            if let MasterMessage::StartBuild { build_id, .. } = &message {
                                tracing::debug!(
                                    target: nightshift_proto::log::HANDOFF,
                                    "build {build_id}: hand-out read"
                                );
                            }
                            let _ = events.send(LinkEvent::Frame(message));
                        }
                        Err(error) => {
                            tracing::warn!("ignoring a frame from the master: {error}");
                        }
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return welcomed_lost(match frame {
                            Some(frame) => format!("the master closed the connection: {}", frame.reason),
                            None => "the master closed the connection".to_owned(),
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return welcomed_lost(format!("connection failed: {error}")),
                    None => return welcomed_lost("the master closed the connection".into()),
                }
            }
            () = overflow.happened() => {
                return welcomed_lost(
                    "the queue to the master overflowed; reconnecting to resynchronise".into(),
                );
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > beat * MISSED_BEATS {
                    return welcomed_lost(format!(
                        "nothing heard from the master for {} s",
                        last_heard.elapsed().as_secs()
                    ));
                }
                seq += 1;
                let ping = AgentMessage::Ping { seq }.encode();
                if let Err(error) = socket.send(Message::text(ping)).await {
                    return welcomed_lost(format!("sending to the master failed: {error}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
