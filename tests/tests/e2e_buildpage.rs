//! End-to-end: the dashboard's build page and its live log, through the real
//! `master` and `worker` binaries — a log line arrives over server-sent
//! events while the build still runs, and the page shows the complete log,
//! steps and worker after it.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use nightshift_proto::api::BuildState;
use nightshift_proto::wire::Outcome;
use nightshift_tests::{DEADLINE, Farm, WorkerSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An open `GET` whose body is read as it arrives.
struct Streaming {
    tcp: TcpStream,
    seen: String,
}

impl Streaming {
    /// Opens `path` with the admin token (the dashboard is `login` by
    /// default; the token stands in for a session when reading).
    async fn open(port: u16, path: &str, token: &str) -> anyhow::Result<Streaming> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;
        Ok(Streaming {
            tcp,
            seen: String::new(),
        })
    }

    /// Reads until `text` has arrived; fails at the deadline or on EOF.
    async fn until(&mut self, text: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(text) {
            let n = tokio::time::timeout_at(deadline, self.tcp.read(&mut buf))
                .await
                .with_context(|| format!("no `{text}` in time; got:\n{}", self.seen))??;
            if n == 0 {
                bail!("stream ended without `{text}`; got:\n{}", self.seen);
            }
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_log_line_arrives_over_sse_before_the_build_ends() -> anyhow::Result<()> {
    let gate = tempfile::tempdir()?;
    let release = gate.path().join("release");
    let step = format!(
        "echo 'first <line> & more'; while [ ! -e '{}' ]; do sleep 0.05; done; echo second-line",
        release.display()
    );
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new("w1"))
        .builder("app", &["w1"], &[("build", &step)])
        .start()
        .await?;
    farm.start_worker("w1")?;
    let api = farm.api()?;
    let port = farm.url().port;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    farm.wait_build_state(id, "the build running", |b| b.state == BuildState::Running)
        .await
        .with_context(|| {
            format!(
                "master log:\n{}\nworker log:\n{}",
                farm.master_log(),
                farm.worker_log("w1")
            )
        })?;

    let token = farm.admin_token()?;
    let mut events = Streaming::open(port, &format!("/builds/{id}/events"), &token).await?;
    events.until("text/event-stream").await?;
    // The first line arrives live (in the first `reset` or as a `log` event).
    events.until("first <line> & more").await?;
    assert!(!events.seen.contains("second-line"));
    let build = api.build(id).await?;
    assert_eq!(
        build.state,
        BuildState::Running,
        "the build has not ended yet"
    );

    // The running build's page: state, worker link, the log so far, escaped.
    let (status, page) = api.call_raw("GET", &format!("/builds/{id}"), None).await?;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("<span class=\"pill running\" id=\"build-state\">running</span>"),
        "{page}"
    );
    assert!(page.contains("<a href=\"/#worker-w1\">w1</a>"), "{page}");
    assert!(page.contains("first &lt;line&gt; &amp; more"), "{page}");
    assert!(page.contains(&format!("new EventSource('/builds/{id}/events')")));

    fs_err::write(&release, "")?;
    events.until("second-line").await?;
    // The end is pushed too (the page then reloads with the complete log:
    // output the agent sends with its result is not streamed).
    events.until("event: done").await?;
    let build = farm.wait_build(id).await?;
    assert_eq!(
        build.outcome,
        Some(Outcome::Success),
        "{:?} {}",
        build.steps,
        farm.worker_log("w1")
    );

    // After the build: the complete log, each step with its state and
    // duration, no live script.
    let (status, page) = api.call_raw("GET", &format!("/builds/{id}"), None).await?;
    assert_eq!(status, 200);
    assert!(page.contains("(complete)"), "{page}");
    for line in ["first &lt;line&gt; &amp; more", "second-line"] {
        assert!(page.contains(line), "{line} in {page}");
    }
    assert!(
        page.contains(
            "<td class=\"name\">build</td><td><span class=\"outcome success\">success</span>"
        ),
        "{page}"
    );
    assert!(!page.contains("EventSource"), "{page}");

    // A finished build's stream says all and ends.
    let mut again = Streaming::open(port, &format!("/builds/{id}/events"), &token).await?;
    again.until("event: done").await?;
    assert!(again.seen.contains("second-line"), "{}", again.seen);

    // The farm page links builds and workers both ways.
    let (_, farm_page) = api.call_raw("GET", "/", None).await?;
    assert!(
        farm_page.contains(&format!("<a href=\"/builds/{id}\">#{id}</a>")),
        "{farm_page}"
    );
    assert!(farm_page.contains("<tr id=\"worker-w1\">"), "{farm_page}");

    // Unknown and malformed ids are refused clearly.
    let (status, body) = api.call_raw("GET", "/builds/9999", None).await?;
    assert_eq!((status, body.as_str()), (404, "no build 9999"));
    let (status, body) = api.call_raw("GET", "/builds/x/events", None).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad build id `x`"), "{body}");
    Ok(())
}
