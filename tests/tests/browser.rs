//! The worker's status page in a real headless Chromium: open the page, click
//! "away for 1 hour", see the state change live (no reload), save a
//! screenshot to `target/screenshots/status-page.png`. And the master's
//! build page over TLS: log in with the admin token, watch a live log line
//! arrive, click cancel, see the build cancelled.
//!
//! Needs Debian's `chromium` package (`/usr/bin/chromium`, or the path in
//! `NIGHTSHIFT_CHROMIUM`) and the workspace binaries built
//! (`cargo build --workspace --bins`). Chromium is driven over the Chrome
//! DevTools Protocol on a WebSocket, so no chromedriver is needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nightshift_policy::{PresenceState, Source};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, bin_dir};
use serde_json::{Value, json};

/// A minimal Chrome DevTools Protocol client: one browser, one page session.
mod cdp {
    use std::collections::VecDeque;
    use std::time::Duration;

    use anyhow::{Context, bail};
    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpStream;
    use tokio::process::{Child, Command};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    pub struct Browser {
        _child: Child,
        _profile: tempfile::TempDir,
        socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
        next_id: u64,
        events: VecDeque<Value>,
        session: Option<String>,
    }

    impl Browser {
        /// Starts headless Chromium with a fresh profile and opens one tab.
        pub async fn launch(
            executable: &std::path::Path,
            wait: Duration,
        ) -> anyhow::Result<Browser> {
            let profile = tempfile::tempdir()?;
            let mut child = Command::new(executable)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    // The test master's certificate is self-signed.
                    "--ignore-certificate-errors",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", executable.display()))?;
            let stderr = child.stderr.take().context("chromium's stderr")?;
            let mut lines = BufReader::new(stderr).lines();
            let mut seen = Vec::new();
            let url = tokio::time::timeout(wait, async {
                while let Some(line) = lines.next_line().await? {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        return Ok(url.trim().to_owned());
                    }
                    seen.push(line);
                }
                bail!("chromium exited before it listened:\n{}", seen.join("\n"))
            })
            .await
            .context("chromium did not start its DevTools endpoint in time")??;
            // Keep draining stderr so chromium never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .with_context(|| format!("connecting to {url}"))?;
            let mut browser = Browser {
                _child: child,
                _profile: profile,
                socket,
                next_id: 0,
                events: VecDeque::new(),
                session: None,
            };
            let target = browser
                .browser_call("Target.createTarget", json!({"url": "about:blank"}))
                .await?;
            let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
            let attached = browser
                .browser_call(
                    "Target.attachToTarget",
                    json!({"targetId": target_id, "flatten": true}),
                )
                .await?;
            browser.session = Some(
                attached["sessionId"]
                    .as_str()
                    .context("sessionId")?
                    .to_owned(),
            );
            Ok(browser)
        }

        async fn send(
            &mut self,
            session: Option<String>,
            method: &str,
            params: Value,
        ) -> anyhow::Result<Value> {
            self.next_id += 1;
            let id = self.next_id;
            let mut message = json!({"id": id, "method": method, "params": params});
            if let Some(session) = session {
                message["sessionId"] = Value::String(session);
            }
            self.socket.send(Message::text(message.to_string())).await?;
            loop {
                let reply = self.read().await?;
                if reply["id"].as_u64() == Some(id) {
                    if let Some(error) = reply.get("error") {
                        bail!("{method}: {error}");
                    }
                    return Ok(reply["result"].clone());
                }
                if reply.get("method").is_some() {
                    self.events.push_back(reply);
                }
            }
        }

        async fn read(&mut self) -> anyhow::Result<Value> {
            loop {
                match self.socket.next().await {
                    None => bail!("chromium closed the DevTools connection"),
                    Some(message) => match message? {
                        Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                        Message::Close(_) => bail!("chromium closed the DevTools connection"),
                        _ => continue,
                    },
                }
            }
        }

        pub async fn browser_call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
            self.send(None, method, params).await
        }

        /// A command to the page.
        pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
            let session = self.session.clone();
            self.send(session, method, params).await
        }

        /// Forgets the events seen so far (before an action whose own
        /// events are awaited next).
        pub fn clear_events(&mut self) {
            self.events.clear();
        }

        /// Waits for a page event (e.g. `Page.loadEventFired`).
        pub async fn event(&mut self, method: &str) -> anyhow::Result<Value> {
            if let Some(index) = self
                .events
                .iter()
                .position(|event| event["method"] == method)
            {
                return Ok(self.events.remove(index).unwrap_or_default());
            }
            loop {
                let message = self.read().await?;
                if message["method"] == method {
                    return Ok(message);
                }
            }
        }

        /// Evaluates `expression` in the page (awaiting a promise) and
        /// returns its value; a thrown exception is an error.
        pub async fn evaluate(&mut self, expression: &str) -> anyhow::Result<Value> {
            let result = self
                .call(
                    "Runtime.evaluate",
                    json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
                )
                .await?;
            if let Some(details) = result.get("exceptionDetails") {
                bail!(
                    "page script failed: {}",
                    details["exception"]["description"]
                        .as_str()
                        .unwrap_or(&details.to_string())
                );
            }
            Ok(result["result"]["value"].clone())
        }

        /// A real mouse click in the middle of the element `selector`.
        pub async fn click(&mut self, selector: &str) -> anyhow::Result<()> {
            let selector_json = serde_json::to_string(selector)?;
            let rect = self
                .evaluate(&format!(
                    "(() => {{ const el = document.querySelector({selector_json});
                        if (!el) throw new Error('no element ' + {selector_json});
                        el.scrollIntoView({{block: 'center'}});
                        const r = el.getBoundingClientRect();
                        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()"
                ))
                .await?;
            let (x, y) = (
                rect["x"].as_f64().context("x")?,
                rect["y"].as_f64().context("y")?,
            );
            for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
                self.call(
                    "Input.dispatchMouseEvent",
                    json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
                )
                .await?;
            }
            Ok(())
        }

        /// A PNG of the whole page at `width` CSS pixels.
        pub async fn screenshot(&mut self, width: u32) -> anyhow::Result<Vec<u8>> {
            self.evaluate("window.scrollTo(0, 0)").await?;
            let height = self
                .evaluate("Math.ceil(document.documentElement.scrollHeight)")
                .await?
                .as_f64()
                .context("page height")?;
            self.call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height as u32, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await?;
            let shot = self
                .call("Page.captureScreenshot", json!({"format": "png"}))
                .await?;
            let data = shot["data"].as_str().context("screenshot data")?;
            super::base64_decode(data)
        }
    }
}

/// Decodes standard base64 (the screenshot data).
fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    fn value(byte: u8) -> Option<u32> {
        Some(match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let trimmed = bytes
        .strip_suffix(b"==")
        .or_else(|| bytes.strip_suffix(b"="))
        .unwrap_or(&bytes);
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for (index, byte) in chunk.iter().enumerate() {
            acc |= value(*byte).context("invalid base64")? << (18 - 6 * index);
        }
        let produced = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => bail!("truncated base64"),
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + produced]);
    }
    Ok(out)
}

/// Resolves when the page condition `predicate` (a JS expression) holds,
/// re-checking on every DOM change; rejects after `ms`.
fn wait_for_js(predicate: &str, ms: u128) -> String {
    format!(
        "new Promise((resolve, reject) => {{
            const check = () => {{ try {{ return Boolean({predicate}); }} catch (_) {{ return false; }} }};
            if (check()) return resolve(true);
            const observer = new MutationObserver(() => {{
                if (check()) {{ observer.disconnect(); clearTimeout(timer); resolve(true); }}
            }});
            observer.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
            const timer = setTimeout(() => {{
                observer.disconnect();
                reject(new Error('timed out waiting for: ' + {predicate_json} + '; page says: ' + document.body.innerText.slice(0, 400)));
            }}, {ms});
        }})",
        predicate_json = serde_json::to_string(predicate).unwrap_or_default(),
    )
}

fn chromium() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NIGHTSHIFT_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    for candidate in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(candidate).exists() {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!("no Chromium found: install Debian's `chromium` package or set NIGHTSHIFT_CHROMIUM")
}

/// `target/screenshots`, next to the profile dirs.
fn screenshot_dir() -> anyhow::Result<PathBuf> {
    let dir = bin_dir()?
        .parent()
        .context("locating target/")?
        .join("screenshots");
    fs_err::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_away_for_an_hour_updates_live() -> anyhow::Result<()> {
    let chromium = chromium()?;
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::added_by_master("lab-3")?.worker_toml(
            r#"[availability]
default = "available"

[[availability.schedule]]
name = "evenings"
hours = "17:00-23:00"
state = "reluctant"
"#,
        ))
        .start()
        .await?;
    farm.start_worker("lab-3")?;
    farm.wait_worker_ready("lab-3").await?;
    farm.wait_worker("lab-3", "the worker connect", |worker| worker.connected)
        .await?;
    let url = farm.worker_control_url("lab-3")?;
    let mut browser =
        tokio::time::timeout(DEADLINE, cdp::Browser::launch(&chromium, DEADLINE)).await??;
    let ms = DEADLINE.as_millis();

    tokio::time::timeout(DEADLINE, async {
        browser.call("Page.enable", json!({})).await?;
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": 1000, "height": 1400, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await?;
        browser.call("Page.navigate", json!({"url": url})).await?;
        browser.event("Page.loadEventFired").await?;
        anyhow::Ok(())
    })
    .await
    .context("loading the page")??;

    // The live feed connects, and the page shows the policy's state.
    browser
        .evaluate(&wait_for_js(
            "document.getElementById('feed').textContent.includes('live')",
            ms,
        ))
        .await
        .context("the live feed never connected")?;
    let before = browser
        .evaluate("document.getElementById('state-word').textContent")
        .await?;
    assert!(
        before == "Available" || before == "Reluctant",
        "the policy says available or reluctant (evenings), the page says {before}"
    );
    browser.evaluate("window.__sameDocument = true").await?;

    browser.click("button[data-for='1h']").await?;
    browser
        .evaluate(&wait_for_js(
            "document.getElementById('state-word').textContent === 'Away' && document.getElementById('hero').textContent.includes('set by you')",
            ms,
        ))
        .await
        .context("the page did not show the new state")?;
    assert_eq!(
        browser.evaluate("window.__sameDocument === true").await?,
        Value::Bool(true),
        "the page was reloaded instead of updated live"
    );
    assert_eq!(
        browser.evaluate("document.body.dataset.state").await?,
        Value::String("away".into())
    );
    let marked = browser
        .evaluate(
            "document.querySelector('.away-row').classList.contains('current') \
             && document.querySelector('button[data-state=auto]').getAttribute('aria-pressed')",
        )
        .await?;
    assert_eq!(
        marked,
        Value::String("false".into()),
        "the page marks the manual away as the choice in force"
    );
    let hero = browser
        .evaluate("document.getElementById('hero').innerText")
        .await?;
    let hero = hero.as_str().unwrap_or_default();
    assert!(
        hero.contains("until") && (hero.contains("(in 1 h)") || hero.contains("(in 59 min)")),
        "{hero}"
    );
    browser
        .evaluate(&wait_for_js(
            "document.getElementById('message').textContent.includes('away for 1 hour')",
            ms,
        ))
        .await?;

    let png = browser.screenshot(1000).await?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let path = screenshot_dir()?.join("status-page.png");
    fs_err::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("screenshot: {}", path.display());

    // The agent agrees: away, set by hand, for an hour.
    let status = farm.worker_cli_json("lab-3", &["status", "--json"])?;
    assert_eq!(status["presence"]["state"], "away", "{status}");
    assert_eq!(status["presence"]["source"], "manual", "{status}");
    assert_eq!(status["manual"]["state"], "away", "{status}");
    assert!(status["manual"]["until"].is_string(), "{status}");

    // And so does the master.
    farm.wait_worker("lab-3", "the worker go away", |worker| {
        worker.state == PresenceState::Away && worker.source == Some(Source::Manual)
    })
    .await?;

    drop(browser);
    farm.stop_worker("lab-3").await
}

/// Evaluates `wait_for_js(predicate)` until it holds, across the page's own
/// navigations (a form post, a reload when the build ends), which destroy
/// the evaluation; fails after `DEADLINE`.
async fn wait_across_loads(browser: &mut cdp::Browser, predicate: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for {predicate}: {last}");
        }
        match tokio::time::timeout(
            left,
            browser.evaluate(&wait_for_js(predicate, left.as_millis())),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => {
                last = format!("{e:#}");
                // The document went away under the evaluation: wait for the
                // next one to load.
                if last.contains("context") || last.contains("navigat") {
                    let _ = tokio::time::timeout(left, browser.event("Page.loadEventFired")).await;
                } else if last.contains("timed out waiting") {
                    bail!("{last}");
                } else {
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(200),
                        browser.event("Page.loadEventFired"),
                    )
                    .await;
                }
            }
            Err(_) => bail!("timed out waiting for {predicate}: {last}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_page_login_live_log_and_cancel() -> anyhow::Result<()> {
    use nightshift_proto::api::BuildState;
    use nightshift_proto::wire::Outcome;

    let chromium = chromium()?;
    let gate = tempfile::tempdir()?;
    let release = gate.path().join("release");
    let step = format!(
        "echo first-live-line; while [ ! -e '{}' ]; do sleep 0.05; done; \
         echo second-live-line; sleep 600",
        release.display()
    );
    // TLS (the default): the session cookie is `Secure`.
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .builder("app", &["w1"], &[("build", &step)])
        .start()
        .await?;
    farm.start_worker("w1")?;
    let api = farm.api()?;
    let id = api
        .submit("app", std::collections::BTreeMap::new())
        .await?
        .build_id;
    farm.wait_build_state(id, "the build running", |b| b.state == BuildState::Running)
        .await
        .with_context(|| format!("master log:\n{}", farm.master_log()))?;
    let url = format!("https://127.0.0.1:{}/builds/{id}", farm.port);
    let token = farm.admin_token()?;
    let mut browser =
        tokio::time::timeout(DEADLINE, cdp::Browser::launch(&chromium, DEADLINE)).await??;
    let ms = DEADLINE.as_millis();

    // The build page sends a browser without a session to the login.
    tokio::time::timeout(DEADLINE, async {
        browser.call("Page.enable", json!({})).await?;
        browser.call("Network.enable", json!({})).await?;
        browser.clear_events();
        browser.call("Page.navigate", json!({"url": url})).await?;
        browser.event("Page.loadEventFired").await?;
        anyhow::Ok(())
    })
    .await
    .context("loading the page")??;
    let at = browser
        .evaluate("location.pathname + location.search")
        .await?;
    assert_eq!(
        at,
        Value::String(format!("/login?next=/builds/{id}")),
        "not sent to the login"
    );

    // Log in with the admin token: back on the build page, with a session.
    browser
        .evaluate(&format!(
            "document.getElementById('token').value = {}",
            serde_json::to_string(&token)?
        ))
        .await?;
    browser.clear_events();
    browser.click("#login").await?;
    wait_across_loads(
        &mut browser,
        &format!("location.pathname === '/builds/{id}' && document.getElementById('cancel')"),
    )
    .await
    .with_context(|| format!("master log:\n{}", farm.master_log()))?;
    let cookies = browser
        .call("Network.getCookies", json!({"urls": [url]}))
        .await?;
    let session = cookies["cookies"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|c| c["name"] == "__Host-nightshift_session")
        })
        .cloned()
        .with_context(|| format!("no session cookie: {cookies}"))?;
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["secure"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    assert_eq!(
        browser.evaluate("document.cookie").await?,
        Value::String(String::new()),
        "scripts cannot read the session"
    );

    // A live log line arrives without a reload.
    browser
        .evaluate(&wait_for_js(
            "document.getElementById('log').textContent.includes('first-live-line')",
            ms,
        ))
        .await
        .context("the first line never showed")?;
    browser.evaluate("window.__sameDocument = true").await?;
    fs_err::write(&release, "")?;
    browser
        .evaluate(&wait_for_js(
            "document.getElementById('log').textContent.includes('second-live-line')",
            ms,
        ))
        .await
        .with_context(|| {
            format!(
                "the live line never arrived; worker log:\n{}",
                farm.worker_log("w1")
            )
        })?;
    assert_eq!(
        browser.evaluate("window.__sameDocument === true").await?,
        Value::Bool(true),
        "the page was reloaded instead of updated live"
    );
    assert_eq!(
        browser
            .evaluate("document.getElementById('build-state').textContent")
            .await?,
        Value::String("running".into())
    );

    // Cancel: the page comes back showing the build cancelled.
    browser.clear_events();
    browser.click("#cancel").await?;
    wait_across_loads(
        &mut browser,
        "document.getElementById('build-state').textContent === 'cancelled'",
    )
    .await
    .with_context(|| {
        format!(
            "master log:\n{}\nworker log:\n{}",
            farm.master_log(),
            farm.worker_log("w1")
        )
    })?;
    let shown = browser.evaluate("document.body.innerText").await?;
    let shown = shown.as_str().unwrap_or_default();
    assert!(shown.contains("cancelled from the dashboard"), "{shown}");
    assert!(
        shown.contains("Rebuild"),
        "a finished build offers a rebuild: {shown}"
    );
    let build = api.build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Cancelled), "{build:?}");

    let png = browser.screenshot(1000).await?;
    let path = screenshot_dir()?.join("build-page.png");
    fs_err::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("screenshot: {}", path.display());
    drop(browser);
    farm.stop_worker("w1").await
}

#[test]
fn base64_decodes() {
    assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64_decode("aGVsbG8hIQ==").unwrap(), b"hello!!");
    assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
    assert!(base64_decode("a$==").is_err());
}
