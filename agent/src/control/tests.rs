//! The control plane served for real (TCP and Unix socket) against a fake
//! daemon: who may change what, malformed input, metrics, the live feed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use nightshift_policy::PresenceState;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;

use super::client::{Reply, send};
use super::error::ErrorBody;
use super::server::{ADDR_FILE_NAME, ControlOptions, ControlServer, SOCKET_FILE_NAME, serve_with};
use super::{guard, metrics};
use crate::demo::stand_in_daemon;
use crate::handle::{AgentHandle, AgentStatus};

const WAIT: Duration = Duration::from_secs(30);

pub(super) fn now() -> Timestamp {
    "2026-11-23T11:00:00Z".parse().unwrap()
}

/// A fake daemon: the demo's stand-in over the tests' status fixture at
/// [`now`], with its status and the count of commands it received.
pub(super) struct FakeDaemon {
    pub(super) handle: AgentHandle,
    status: Arc<watch::Sender<AgentStatus>>,
    pub(super) commands: Arc<AtomicUsize>,
}

pub(super) fn fake_daemon() -> FakeDaemon {
    let status = Arc::new(watch::channel(metrics::tests::status_fixture(now())).0);
    let commands = Arc::new(AtomicUsize::new(0));
    FakeDaemon {
        handle: stand_in_daemon(status.clone(), commands.clone(), now),
        status,
        commands,
    }
}

fn options() -> ControlOptions {
    let mut options = ControlOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        TimeZone::get("Europe/Berlin").unwrap(),
    );
    options.clock = Arc::new(now);
    options
}

struct Running {
    daemon: FakeDaemon,
    server: ControlServer,
    dir: tempfile::TempDir,
}

async fn start() -> Running {
    let daemon = fake_daemon();
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(daemon.handle.clone(), options(), dir.path())
        .await
        .unwrap();
    Running {
        daemon,
        server,
        dir,
    }
}

impl Running {
    fn token(&self) -> String {
        guard::read_token(&self.dir.path().join(guard::TOKEN_FILE_NAME)).unwrap()
    }

    fn state(&self) -> PresenceState {
        self.daemon.handle.status.borrow().presence.state
    }

    fn commands(&self) -> usize {
        self.daemon.commands.load(Ordering::SeqCst)
    }

    /// A raw request over TCP with exactly the given headers.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let stream = TcpStream::connect(self.server.local_addr()).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(
            WAIT,
            sender.send_request(
                request
                    .body(Full::new(axum::body::Bytes::from(body)))
                    .unwrap(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply { status, body }
    }

    async fn csrf(&self) -> String {
        let page = self
            .raw(Method::GET, "/", &[("host", "localhost")], vec![])
            .await;
        assert_eq!(page.status, StatusCode::OK);
        let html = String::from_utf8(page.body.to_vec()).unwrap();
        let start = html.find("name=\"nightshift-csrf\" content=\"").unwrap() + 32;
        html[start..start + 64].to_owned()
    }
}

fn error_of(reply: &Reply) -> ErrorBody {
    serde_json::from_slice(&reply.body)
        .unwrap_or_else(|_| panic!("not a JSON error: {:?}", reply.body))
}

const AWAY: &[u8] = br#"{"state":"away","for":"1h"}"#;

#[tokio::test]
async fn post_without_credentials_is_refused_and_changes_nothing() {
    let running = start().await;
    let host = running.server.local_addr().to_string();
    let reply = running
        .raw(
            Method::POST,
            "/api/v1/set-availability",
            &[("host", &host), ("content-type", "application/json")],
            AWAY.to_vec(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&reply).error.contains("Bearer"));
    let reply = running
        .raw(
            Method::POST,
            "/api/v1/set-availability",
            &[
                ("host", &host),
                ("content-type", "application/json"),
                ("authorization", "Bearer nope"),
            ],
            AWAY.to_vec(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = running
        .raw(Method::POST, "/api/v1/stop", &[("host", &host)], vec![])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(running.commands(), 0);
    assert_eq!(running.state(), PresenceState::Away);
    assert!(!running.daemon.handle.status.borrow().stopping);
}

#[tokio::test]
async fn foreign_origin_or_host_is_refused_even_with_the_token() {
    let running = start().await;
    let token = format!("Bearer {}", running.token());
    let csrf = running.csrf().await;
    let host = running.server.local_addr().to_string();
    let cases: [&[(&str, &str)]; 4] = [
        &[
            ("host", &host),
            ("origin", "https://evil.example"),
            ("authorization", &token),
        ],
        &[
            ("host", &host),
            ("origin", "https://evil.example"),
            ("x-nightshift-csrf", &csrf),
        ],
        &[("host", "evil.example"), ("authorization", &token)],
        &[
            ("host", "rebind.evil.example:7878"),
            ("x-nightshift-csrf", &csrf),
        ],
    ];
    for headers in cases {
        let mut headers = headers.to_vec();
        headers.push(("content-type", "application/json"));
        let reply = running
            .raw(
                Method::POST,
                "/api/v1/set-availability",
                &headers,
                br#"{"state":"available"}"#.to_vec(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{headers:?}");
    }
    // Reading through a rebound name is refused too: the page holds the CSRF token.
    let reply = running
        .raw(Method::GET, "/", &[("host", "rebind.evil.example")], vec![])
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(!String::from_utf8_lossy(&reply.body).contains(&csrf));
    let reply = running
        .raw(Method::GET, "/api/v1/status", &[], vec![])
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(running.commands(), 0);
    assert_eq!(running.state(), PresenceState::Away);
}

#[tokio::test]
async fn the_page_csrf_token_changes_the_state() {
    let running = start().await;
    let csrf = running.csrf().await;
    let host = running.server.local_addr().to_string();
    let origin = format!("http://{host}");
    let reply = running
        .raw(
            Method::POST,
            "/api/v1/set-availability",
            &[
                ("host", &host),
                ("origin", &origin),
                ("x-nightshift-csrf", &csrf),
                ("content-type", "application/json"),
            ],
            br#"{"state":"reluctant","until":"19:00","reason":"video call"}"#.to_vec(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let status: AgentStatus = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(status.presence.state, PresenceState::Reluctant);
    // 19:00 in Berlin is 18:00 UTC in November.
    assert_eq!(
        status.presence.until,
        Some("2026-11-23T18:00:00Z".parse().unwrap())
    );
    assert_eq!(running.state(), PresenceState::Reluctant);
    let manual = running
        .daemon
        .handle
        .status
        .borrow()
        .manual
        .clone()
        .unwrap();
    assert_eq!(manual.reason.as_deref(), Some("video call"));
}

#[tokio::test]
async fn the_cli_path_over_the_unix_socket() {
    let running = start().await;
    let socket = running.dir.path().join(SOCKET_FILE_NAME);
    let token = running.token();
    let connect = || async { UnixStream::connect(&socket).await.unwrap() };
    let reply = send(connect().await, Method::GET, "/api/v1/status", None, None)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let status: AgentStatus = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(status, *running.daemon.handle.status.borrow());

    let reply = send(
        connect().await,
        Method::POST,
        "/api/v1/set-availability",
        None,
        Some(AWAY.to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(running.commands(), 0);

    let reply = send(
        connect().await,
        Method::POST,
        "/api/v1/set-availability",
        Some(&token),
        Some(br#"{"state":"available"}"#.to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(running.state(), PresenceState::Available);

    let reply = send(
        connect().await,
        Method::POST,
        "/api/v1/stop",
        Some(&token),
        Some(br#"{"graceful":true,"deadline":"30m"}"#.to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let answer: super::api::StopAnswer = serde_json::from_slice(&reply.body).unwrap();
    assert!(answer.graceful);
    assert_eq!(
        answer.deadline,
        Some("2026-11-23T11:30:00Z".parse().unwrap())
    );
    assert!(running.daemon.handle.status.borrow().stopping);
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx() {
    let running = start().await;
    let token = format!("Bearer {}", running.token());
    let base = [
        ("host", "localhost"),
        ("authorization", token.as_str()),
        ("content-type", "application/json"),
    ];
    let cases: Vec<(&str, Vec<u8>, StatusCode, Option<&str>)> = vec![
        (
            "/api/v1/set-availability",
            b"{".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/api/v1/set-availability",
            b"\xff\xfe".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/api/v1/set-availability",
            br#"{"state":"offline"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("state"),
        ),
        (
            "/api/v1/set-availability",
            br#"{"state":"away","for":"ever"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("for"),
        ),
        (
            "/api/v1/set-availability",
            br#"{"state":"away","until":"2001-01-01T00:00"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("until"),
        ),
        (
            "/api/v1/set-availability",
            br#"{"state":"away","reason":7}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("reason"),
        ),
        (
            "/api/v1/stop",
            br#"{"deadline":"1h"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("deadline"),
        ),
        (
            "/api/v1/stop",
            br#"[]"#.to_vec(),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (path, body, expected, field) in cases {
        let reply = running.raw(Method::POST, path, &base, body.clone()).await;
        assert_eq!(
            reply.status,
            expected,
            "{path} {:?}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            error_of(&reply).field.as_deref(),
            field,
            "{path} {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    let huge = format!(r#"{{"state":"away","reason":"{}"}}"#, "x".repeat(64 * 1024));
    let reply = running
        .raw(
            Method::POST,
            "/api/v1/set-availability",
            &base,
            huge.into_bytes(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let reply = running
        .raw(
            Method::POST,
            "/api/v1/set-availability",
            &[
                ("host", "localhost"),
                ("authorization", &token),
                ("content-type", "text/plain"),
            ],
            AWAY.to_vec(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let reply = running
        .raw(Method::GET, "/api/v1/stop", &base, vec![])
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let reply = running.raw(Method::GET, "/nope", &base, vec![]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(running.commands(), 0);
    assert_eq!(running.state(), PresenceState::Away);
    // The server still answers after all that.
    let reply = running
        .raw(Method::GET, "/api/v1/status", &base, vec![])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_parse_and_follow_the_state() {
    let running = start().await;
    let reply = running
        .raw(Method::GET, "/metrics", &[("host", "127.0.0.1")], vec![])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let samples = metrics::tests::parse(&text).unwrap();
    let away = samples
        .iter()
        .find(|s| s.name == "nightshift_worker_state" && s.labels["state"] == "away")
        .unwrap();
    assert_eq!(away.value, 1.0);
    running
        .daemon
        .status
        .send_modify(|status| status.presence.state = PresenceState::Available);
    let reply = running
        .raw(Method::GET, "/metrics", &[("host", "[::1]:80")], vec![])
        .await;
    let samples = metrics::tests::parse(std::str::from_utf8(&reply.body).unwrap()).unwrap();
    let state_of = |word: &str| {
        samples
            .iter()
            .find(|s| s.name == "nightshift_worker_state" && s.labels["state"] == word)
            .unwrap()
            .value
    };
    assert_eq!((state_of("available"), state_of("away")), (1.0, 0.0));
}

#[tokio::test]
async fn the_live_feed_pushes_a_change() {
    let running = start().await;
    let stream = TcpStream::connect(running.server.local_addr())
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/events")
        .header(header::HOST, "localhost")
        .body(Full::new(axum::body::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    let mut seen = String::new();
    let mut next_event = async || -> String {
        loop {
            if let Some(end) = seen.find("\n\n") {
                let event = seen[..end].to_owned();
                seen.drain(..end + 2);
                if event.starts_with("event: status") {
                    return event;
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    };
    let first = next_event().await;
    assert!(first.contains(">Away</h1>"), "{first}");
    running.daemon.status.send_modify(|status| {
        status.presence.state = PresenceState::Reluctant;
        status.presence.reason = "gaming <tonight>".into();
    });
    let second = next_event().await;
    assert!(second.contains(">Reluctant</h1>"), "{second}");
    assert!(second.contains("gaming &lt;tonight&gt;"), "{second}");
    // A burst of changes (a chatty build) is coalesced, and the last one
    // always arrives.
    for line in 0..100 {
        running.daemon.status.send_modify(|status| {
            status.builds[0].tail = format!("output line {line}");
        });
    }
    let mut events = 0;
    loop {
        let event = next_event().await;
        events += 1;
        if event.contains("output line 99") {
            break;
        }
    }
    assert!(events < 50, "{events} events for one burst");
    // Shutting down ends the stream instead of hanging on it.
    tokio::time::timeout(WAIT, running.server.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn files_are_private_and_cleaned_up() {
    use std::os::unix::fs::PermissionsExt;
    let running = start().await;
    let dir = running.dir.path();
    let mode = |path: &Path| fs_err::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join(SOCKET_FILE_NAME)), 0o600);
    assert_eq!(mode(&dir.join(guard::TOKEN_FILE_NAME)), 0o600);
    let addr = fs_err::read_to_string(dir.join(ADDR_FILE_NAME)).unwrap();
    assert_eq!(addr.trim(), running.server.local_addr().to_string());

    // A second agent on the same state dir is refused.
    let error = serve_with(running.daemon.handle.clone(), options(), dir)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("already running"), "{error}");

    let Running {
        server,
        dir,
        daemon: _daemon,
    } = running;
    server.shutdown().await.unwrap();
    assert!(!dir.path().join(SOCKET_FILE_NAME).exists());
    assert!(!dir.path().join(ADDR_FILE_NAME).exists());
    // The token stays: the next start (and open pages) keep using it.
    assert!(dir.path().join(guard::TOKEN_FILE_NAME).exists());
}

#[tokio::test]
async fn non_loopback_listen_needs_allow_remote_and_a_token_file() {
    let daemon = fake_daemon();
    let dir = tempfile::tempdir().unwrap();
    let mut options = options();
    options.listen = "0.0.0.0:0".parse().unwrap();
    let error = serve_with(daemon.handle.clone(), options.clone(), dir.path())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("[control] listen") && message.contains("allow_remote"),
        "{message}"
    );
    options.allow_remote = true;
    assert!(
        serve_with(daemon.handle.clone(), options.clone(), dir.path())
            .await
            .is_err()
    );
    assert!(!dir.path().join(SOCKET_FILE_NAME).exists());
    let token_file = dir.path().join("remote.token");
    fs_err::write(&token_file, "remote-secret\n").unwrap();
    options.token_file = Some(token_file);
    let server = serve_with(daemon.handle.clone(), options, dir.path())
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}
