//! Tests of the link against a fake master on loopback: hello, heartbeats, frames, reconnects, refusals, silent and busy masters.

use super::*;

#[test]
fn endpoint_adds_the_agent_path_and_checks_the_scheme() {
    assert_eq!(
        endpoint("wss://build.example:8443", false).unwrap(),
        format!("wss://build.example:8443{WS_PATH}")
    );
    assert_eq!(
        endpoint("https://build.example:8443/", false).unwrap(),
        format!("wss://build.example:8443{WS_PATH}")
    );
    assert_eq!(
        endpoint("wss://build.example/custom/agent", false).unwrap(),
        "wss://build.example/custom/agent"
    );
    assert_eq!(
        endpoint("ws://127.0.0.1:9000", true).unwrap(),
        format!("ws://127.0.0.1:9000{WS_PATH}")
    );
    let error = endpoint("ws://127.0.0.1:9000", false).unwrap_err();
    assert!(error.contains("insecure = true"), "{error}");
    assert!(
        endpoint("ftp://x", true)
            .unwrap_err()
            .contains("unknown scheme")
    );
    assert!(
        endpoint("build.example", false)
            .unwrap_err()
            .contains("no scheme")
    );
}

use nightshift_policy::{PresenceState, Source};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type ServerSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Accepts one agent connection; returns the socket and its
/// `Authorization` header.
// The callback signature is tungstenite's; its error type is not ours.
#[allow(clippy::result_large_err)]
async fn accept(listener: &TcpListener) -> (ServerSocket, Option<String>) {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .expect("the agent connects")
        .unwrap();
    let mut auth = None;
    let socket =
        tokio_tungstenite::accept_hdr_async(stream, |request: &Request, response: Response| {
            auth = request
                .headers()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            assert_eq!(request.uri().path(), WS_PATH);
            Ok(response)
        })
        .await
        .unwrap();
    (socket, auth)
}

async fn receive(socket: &mut ServerSocket) -> AgentMessage {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("the agent sends a frame")
            .expect("the connection stays open")
            .unwrap();
        if let Message::Text(text) = frame {
            return AgentMessage::decode(&text).unwrap();
        }
    }
}

async fn reply(socket: &mut ServerSocket, message: MasterMessage) {
    socket.send(Message::text(message.encode())).await.unwrap();
}

fn welcome(heartbeat_secs: u64) -> MasterMessage {
    MasterMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        master_version: "test".into(),
        heartbeat_secs,
        cancel: Vec::new(),
        missing_timeout_secs: None,
    }
}

async fn event(events: &mut mpsc::UnboundedReceiver<LinkEvent>) -> LinkEvent {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("the link reports")
        .unwrap()
}

struct Agent {
    outbound: crate::daemon::outgoing::LinkSender,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    task: tokio::task::JoinHandle<()>,
    _hello: watch::Sender<HelloState>,
}

async fn agent_for(listener: &TcpListener) -> Agent {
    let address = listener.local_addr().unwrap();
    let presence = Presence {
        state: PresenceState::Available,
        reason: "always".into(),
        source: Source::Default,
        since: jiff::Timestamp::UNIX_EPOCH,
        until: None,
    };
    let (hello_tx, hello_rx) = watch::channel(HelloState {
        presence,
        running: vec![4],
        outlook: Outlook::default(),
    });
    let (outbound_tx, outbound_rx) =
        crate::daemon::outgoing::link_queue(crate::daemon::outgoing::LINK_QUEUE);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let task = spawn(
        LinkSettings {
            url: endpoint(&format!("ws://{address}"), true).unwrap(),
            token: "s3cret".into(),
            worker: "w1".into(),
            max_builds: 2,
            tls: None,
            backoff_max: Duration::from_millis(400),
        },
        hello_rx,
        outbound_rx,
        events_tx,
    );
    Agent {
        outbound: outbound_tx,
        events: events_rx,
        task,
        _hello: hello_tx,
    }
}

#[tokio::test]
async fn hello_heartbeats_frames_reconnect_and_goodbye() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = agent_for(&listener).await;

    let (mut socket, auth) = accept(&listener).await;
    assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
    match receive(&mut socket).await {
        AgentMessage::Hello {
            protocol,
            worker,
            max_builds,
            presence,
            running,
            ..
        } => {
            assert_eq!(protocol, PROTOCOL_VERSION);
            assert_eq!(worker, "w1");
            assert_eq!(max_builds, 2);
            assert_eq!(presence.state, PresenceState::Available);
            assert_eq!(running, vec![4]);
        }
        other => panic!("expected a hello, got {other:?}"),
    }
    reply(&mut socket, welcome(30)).await;
    assert!(matches!(
        event(&mut agent.events).await,
        LinkEvent::Up { .. }
    ));

    reply(&mut socket, MasterMessage::Ping { seq: 7 }).await;
    assert_eq!(receive(&mut socket).await, AgentMessage::Pong { seq: 7 });
    reply(&mut socket, MasterMessage::ResultStored { build_id: 3 }).await;
    assert_eq!(
        event(&mut agent.events).await,
        LinkEvent::Frame(MasterMessage::ResultStored { build_id: 3 })
    );
    assert!(
        agent
            .outbound
            .send(AgentMessage::BuildAccepted { build_id: 5 })
    );
    assert_eq!(
        receive(&mut socket).await,
        AgentMessage::BuildAccepted { build_id: 5 }
    );
    // A garbage frame is ignored, not fatal.
    socket.send(Message::text("{ nonsense")).await.unwrap();

    // The master goes away: the agent reports it and comes back.
    drop(socket);
    assert!(matches!(
        event(&mut agent.events).await,
        LinkEvent::Down { .. }
    ));
    let (mut socket, _) = accept(&listener).await;
    assert!(matches!(
        receive(&mut socket).await,
        AgentMessage::Hello { .. }
    ));
    reply(&mut socket, welcome(30)).await;
    assert!(matches!(
        event(&mut agent.events).await,
        LinkEvent::Up { .. }
    ));

    assert!(agent.outbound.send(AgentMessage::Goodbye {
        reason: "stopped".into(),
    }));
    assert_eq!(
        receive(&mut socket).await,
        AgentMessage::Goodbye {
            reason: "stopped".into()
        }
    );
    tokio::time::timeout(Duration::from_secs(60), agent.task)
        .await
        .expect("the link ends after the goodbye")
        .unwrap();
}

#[tokio::test]
async fn a_refusal_is_reported_and_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = agent_for(&listener).await;
    let (mut socket, _) = accept(&listener).await;
    receive(&mut socket).await;
    reply(
        &mut socket,
        MasterMessage::Refused {
            reason: "wrong token for worker w1".into(),
        },
    )
    .await;
    assert_eq!(
        event(&mut agent.events).await,
        LinkEvent::Refused {
            reason: "wrong token for worker w1".into()
        }
    );
    let (mut socket, _) = accept(&listener).await;
    assert!(matches!(
        receive(&mut socket).await,
        AgentMessage::Hello { .. }
    ));
}

#[tokio::test]
async fn a_silent_master_is_dropped_after_missed_heartbeats() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = agent_for(&listener).await;
    let (mut socket, _) = accept(&listener).await;
    receive(&mut socket).await;
    reply(&mut socket, welcome(1)).await;
    assert!(matches!(
        event(&mut agent.events).await,
        LinkEvent::Up { .. }
    ));
    // Keep the socket open but never read or answer.
    match event(&mut agent.events).await {
        LinkEvent::Down { error } => assert!(error.contains("nothing heard"), "{error}"),
        other => panic!("expected the link to drop, got {other:?}"),
    }
    drop(socket);
}

/// Answers one connection's upgrade request with a plain HTTP response.
async fn answer_http(listener: &TcpListener, response: &str) -> tokio::time::Instant {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .expect("the agent connects")
        .unwrap();
    let at = tokio::time::Instant::now();
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the agent sent its upgrade request");
        request.extend_from_slice(&chunk[..n]);
    }
    stream.write_all(response.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    at
}

fn http(status: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_token_refused_at_the_upgrade_is_reported_with_the_masters_reason() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = agent_for(&listener).await;
    answer_http(
        &listener,
        &http(
            "401 Unauthorized",
            "",
            r#"{"error":"unknown worker or wrong token"}"#,
        ),
    )
    .await;
    assert_eq!(
        event(&mut agent.events).await,
        LinkEvent::Refused {
            reason: "unknown worker or wrong token".into()
        }
    );
}

#[tokio::test]
async fn a_busy_master_is_retried_no_sooner_than_its_retry_after() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = agent_for(&listener).await;
    let refused_at = answer_http(
        &listener,
        &http(
            "503 Service Unavailable",
            "retry-after: 2\r\n",
            r#"{"error":"the master is at its connection limit"}"#,
        ),
    )
    .await;
    match event(&mut agent.events).await {
        LinkEvent::Down { error } => {
            assert!(
                error.contains("503") && error.contains("connection limit"),
                "{error}"
            )
        }
        other => panic!("expected the link to report the refusal, got {other:?}"),
    }
    // backoff_max is 400 ms: only the master's Retry-After explains a
    // pause of 2 s.
    let (mut socket, _) = accept(&listener).await;
    assert!(
        refused_at.elapsed() >= Duration::from_secs(2),
        "retried after {:?}",
        refused_at.elapsed()
    );
    assert!(matches!(
        receive(&mut socket).await,
        AgentMessage::Hello { .. }
    ));
}

#[test]
fn the_spread_after_a_lost_connection_covers_its_window() {
    let pauses: Vec<Duration> = (0..400).map(|_| spread(Duration::from_secs(1))).collect();
    assert!(pauses.iter().all(|p| *p <= Duration::from_secs(1)));
    // Uniform over the window: both quarters at the ends are used.
    assert!(pauses.iter().any(|p| *p < Duration::from_millis(250)));
    assert!(pauses.iter().any(|p| *p > Duration::from_millis(750)));
}

#[test]
fn jitter_stays_within_the_upper_half() {
    for _ in 0..100 {
        let pause = jittered(Duration::from_secs(4));
        assert!(pause >= Duration::from_secs(2) && pause <= Duration::from_secs(4));
    }
}

/// The pauses of `attempts` failed attempts in a row, from the start.
fn pauses(attempts: usize, port_refused: bool, retry_after: Option<Duration>) -> Vec<Duration> {
    let mut backoff = BACKOFF_START;
    (0..attempts)
        .map(|_| {
            let (pause, next) =
                next_pause(backoff, Duration::from_secs(10), port_refused, retry_after);
            backoff = next;
            pause
        })
        .collect()
}

#[test]
fn a_refused_port_is_retried_within_two_seconds_other_failures_back_off_to_the_cap() {
    // A master restarting (nothing listens): never more than 2 s apart,
    // and still spread (upper half of the backoff).
    let refused = pauses(30, true, None);
    assert!(
        refused.iter().all(|p| *p <= REFUSED_BACKOFF_MAX),
        "{refused:?}"
    );
    assert!(
        refused[20..].iter().all(|p| *p >= REFUSED_BACKOFF_MAX / 2),
        "{refused:?}"
    );
    // Anything else (a timeout, a TLS error) backs off up to the cap.
    let other = pauses(30, false, None);
    assert!(
        other.iter().all(|p| *p <= Duration::from_secs(10)),
        "{other:?}"
    );
    assert!(
        other[20..].iter().all(|p| *p >= Duration::from_secs(5)),
        "{other:?}"
    );
    // Both start small.
    assert!(refused[0] <= BACKOFF_START && other[0] <= BACKOFF_START);
    // A master at its limit is not asked again before its Retry-After.
    let asked = pauses(5, false, Some(Duration::from_secs(7)));
    assert!(
        asked.iter().all(|p| *p >= Duration::from_secs(7)),
        "{asked:?}"
    );
}
