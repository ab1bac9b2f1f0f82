//! Fuzz targets for what a page, a local program or a file controls on the
//! agent: the control plane's request handling (guard, routes, JSON bodies)
//! and the `worker.toml` loader. Seeded short passes run with the tests;
//! `NIGHTSHIFT_FUZZ_ITERS=1000000 cargo test --release -p nightshift-agent
//! fuzz_ -- --nocapture` runs a long one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ConnectInfo;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use jiff::tz::TimeZone;
use nightshift_proto::fuzz::{self, Verdict};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::guard::{GuardConfig, Secrets};
use super::server::router;
use super::state::Shared;
use super::tests::{fake_daemon, now};
use crate::config::WorkerConfig;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Requests as text: a request line, `name: value` headers (`peer:` sets the
/// connecting address), a blank line and the body. `{TOKEN}` and `{CSRF}`
/// stand for the real secrets.
const REQUEST_SEEDS: &[&str] = &[
    "GET /\nhost: localhost:7878\n\n",
    "GET /api/v1/status\nhost: 127.0.0.1:7878\n\n",
    "GET /metrics\nhost: [::1]:7878\n\n",
    "POST /api/v1/set-availability\nhost: localhost:7878\norigin: http://localhost:7878\n\
     content-type: application/json\nx-nightshift-csrf: {CSRF}\n\n\
     {\"state\":\"away\",\"for\":\"2h\",\"reason\":\"dentist\"}",
    "POST /api/v1/set-availability\nhost: localhost:7878\nauthorization: Bearer {TOKEN}\n\
     content-type: application/json\n\n{\"state\":\"available\",\"until\":\"19:00\"}",
    "POST /api/v1/set-availability\nhost: localhost\ncontent-type: application/json\n\
     x-nightshift-csrf: {CSRF}\n\n{\"state\":\"auto\"}",
    "POST /api/v1/stop\nhost: localhost:7878\nauthorization: Bearer {TOKEN}\n\
     content-type: application/json\n\n{\"graceful\":true,\"deadline\":\"30m\"}",
    "POST /api/v1/stop\nhost: evil.example:7878\norigin: http://evil.example\n\
     sec-fetch-site: cross-site\npeer: 10.0.0.8:5555\n\n{}",
];

const REQUEST_TOKENS: &[&str] = &[
    "{TOKEN}",
    "{CSRF}",
    "Bearer ",
    "host: ",
    "origin: ",
    "peer: 192.0.2.1:1\n",
    "peer: 127.0.0.1:1\n",
    "localhost",
    "localhost.",
    "a.localhost",
    "127.0.0.2",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "0x7f.1",
    "http://",
    "null",
    "sec-fetch-site: cross-site\n",
    "content-type: application/json\n",
    "transfer-encoding: chunked\n",
    "PUT",
    "DELETE",
    "OPTIONS",
    "/api/v1/",
    "/../",
    "%2e%2e",
    "?x=1",
    "#",
    "\"state\"",
    "\"reluctant\"",
    "\"until\"",
    "\"for\"",
    "\"deadline\"",
    "\"graceful\"",
    "24:00",
    "2026-03-29T02:30",
];

/// One request from its text form, or `None` where the HTTP types refuse it
/// (a client could not send it either).
fn request(text: &str, csrf: &str) -> Option<(Request<axum::body::Body>, SocketAddr)> {
    let text = text.replace("{TOKEN}", TOKEN).replace("{CSRF}", csrf);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let (method, uri) = lines.next()?.split_once(' ')?;
    let mut builder = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).ok()?)
        .uri(uri);
    let mut peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name == "peer" {
            peer = value.trim().parse().ok()?;
        } else {
            builder = builder.header(name, value.trim_start());
        }
    }
    let mut request = builder.body(axum::body::Body::from(body.to_owned())).ok()?;
    request.extensions_mut().insert(ConnectInfo(peer));
    Some((request, peer))
}

#[test]
fn fuzz_control_plane_requests() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let daemon = runtime.block_on(async { fake_daemon() });
    let secrets = Secrets::new(TOKEN.into());
    let csrf = secrets.csrf().to_owned();
    let shared = Shared {
        handle: daemon.handle.clone(),
        clock: Arc::new(now),
        time_zone: TimeZone::get("Europe/Berlin").unwrap(),
        preview: None,
        secrets: secrets.clone(),
        shutdown: CancellationToken::new(),
    };
    let app = router(
        shared,
        GuardConfig {
            secrets,
            allow_remote: false,
        },
    );
    let seeds: Vec<String> = REQUEST_SEEDS.iter().map(|s| (*s).to_owned()).collect();
    fuzz::run("control-plane", &seeds, REQUEST_TOKENS, 3_000, |input| {
        let Some((request, peer)) = request(input, &csrf) else {
            return Verdict::Refused;
        };
        let credentialed = input.contains("{TOKEN}") || input.contains("{CSRF}");
        let before = daemon.commands.load(Ordering::SeqCst);
        let (status, streaming) = runtime.block_on(async {
            let response = app.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            let streaming = response
                .headers()
                .get("content-type")
                .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
            if !streaming {
                // The body must be readable to its end.
                response.into_body().collect().await.expect("a body");
            }
            (status, streaming)
        });
        // Let the fake daemon take whatever reached it.
        runtime.block_on(tokio::task::yield_now());
        let commands = daemon.commands.load(Ordering::SeqCst) - before;
        if status.is_server_error() {
            return Verdict::Violation(format!("answered {status}"));
        }
        if commands > 0 && !credentialed {
            return Verdict::Violation(format!(
                "a request without the token or page token changed state ({status})"
            ));
        }
        if commands > 0 && !peer.ip().is_loopback() && !input.contains("{TOKEN}") {
            return Verdict::Violation("a remote peer changed state without the token".into());
        }
        let _ = streaming;
        if status.is_success() {
            Verdict::Accepted
        } else {
            Verdict::Refused
        }
    });
}

const CONFIG_SEEDS: &[&str] = &[
    r#"name = "lab-3"
master = "wss://ci.example.org:8443"
token = "s3cret"
workdir = "/var/lib/nightshift/work"
state_dir = "/var/lib/nightshift/state"
max_builds = 2

[tls]
pin_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[control]
listen = "127.0.0.1:7878"

[availability]
timezone = "Europe/Berlin"
default = "away"

[[availability.schedule]]
name = "nights"
hours = "19:00-07:00"
days = "mon-fri"

[availability.load]
max_load1 = 2.0
max_cpu_percent = 60
for = "2m"
"#,
    r#"name = "w"
master = "wss://127.0.0.1:1"
token = "t"
[tls]
pin_sha256 = "AB:CD"
[availability]
[[availability.schedule]]
name = "cron"
open = "0 19 * * mon-fri"
close = "0 7 * * tue-sat"
state = "reluctant"
"#,
];

const CONFIG_TOKENS: &[&str] = &[
    "name",
    "master",
    "token",
    "token_file",
    "workdir",
    "state_dir",
    "max_builds",
    "[tls]",
    "[control]",
    "allow_remote = true",
    "listen",
    "0.0.0.0:0",
    "[::]:7878",
    "pin_sha256",
    "ca_file",
    "insecure",
    "[availability]",
    "[[availability.schedule]]",
    "[availability.load]",
    "timezone",
    "default",
    "hours",
    "days",
    "open",
    "close",
    "state",
    "for",
    "max_load1",
    "max_cpu_percent",
    "sample_every",
    "ws://",
    "wss://",
    "Europe/Berlin",
    "mon-fri",
    "sat-mon",
];

#[test]
fn fuzz_worker_toml() {
    let seeds: Vec<String> = CONFIG_SEEDS.iter().map(|s| (*s).to_owned()).collect();
    let path = Path::new("/etc/nightshift/worker.toml");
    fuzz::run(
        "worker.toml",
        &seeds,
        CONFIG_TOKENS,
        2_000,
        |input| match WorkerConfig::parse(path, input, TimeZone::UTC) {
            Ok(_) => Verdict::Accepted,
            Err(errors) => {
                let text = errors.to_string();
                if text.trim().is_empty() {
                    Verdict::Violation("refused without saying why".into())
                } else if !text.contains("worker.toml") {
                    Verdict::Violation(format!("an error that does not name the file: {text}"))
                } else {
                    Verdict::Refused
                }
            }
        },
    );
}
