//! End-to-end: dashboard logins and actions through the real `master` and
//! `worker` binaries, over plain HTTP/1.1 as a browser sends it. With
//! `dashboard = "login"` (the default) pages redirect to the login; the admin
//! token buys a session cookie; cancel, rebuild, pause and resume work from
//! the page's forms; and a post without a session, with a wrong CSRF token,
//! from another origin or from nowhere is refused with 403 and changes
//! nothing. A public dashboard is readable, but its actions still need a
//! login.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use anyhow::Context;
use nightshift_proto::api::{BuildState, SubmitRequest};
use nightshift_proto::wire::Outcome;
use nightshift_tests::{DEADLINE, Farm, WorkerSpec};

/// One answer: status, headers (lowercase names), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over plain TCP, as a browser would send it.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: &str,
) -> anyhow::Result<Answer> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        form.len()
    );
    if !form.is_empty() {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(form);
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// The `name=value` of the session cookie a login answer sets.
fn session_cookie(answer: &Answer) -> anyhow::Result<String> {
    let set = answer
        .header("set-cookie")
        .with_context(|| format!("no Set-Cookie in {answer:?}"))?;
    Ok(set.split(';').next().unwrap_or_default().to_owned())
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> anyhow::Result<String> {
    let at = page
        .find("name=\"csrf\" value=\"")
        .with_context(|| format!("no CSRF field in the page:\n{page}"))?;
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    Ok(rest.split('"').next().unwrap_or_default().to_owned())
}

fn form_value(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_then_cancel_rebuild_pause_and_every_forged_post_is_refused() -> anyhow::Result<()> {
    // No worker connects: the build stays queued until it is cancelled.
    let farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new("w"))
        .builder("app", &["w"], &[("build", "echo hi")])
        .start()
        .await?;
    let port = farm.port;
    let api = farm.api()?;
    let token = farm.admin_token()?;
    let origin = format!("http://127.0.0.1:{port}");
    let id = api
        .submit_request(&SubmitRequest {
            builder: "app".into(),
            properties: BTreeMap::from([("flavour".to_owned(), "lemon".to_owned())]),
            revision: None,
            branch: None,
        })
        .await?
        .build_id;
    let log = || farm.master_log();

    // Login mode (the default): pages go to the login, the stream is 401.
    let answer = http(port, "GET", "/", &[], "")?;
    assert_eq!(answer.status, 303, "{answer:?}");
    assert_eq!(answer.header("location"), Some("/login?next=/"));
    let answer = http(port, "GET", &format!("/builds/{id}"), &[], "")?;
    assert_eq!(
        answer.header("location"),
        Some(format!("/login?next=/builds/{id}").as_str())
    );
    let answer = http(port, "GET", &format!("/builds/{id}/events"), &[], "")?;
    assert_eq!(answer.status, 401, "{answer:?}");
    let answer = http(port, "GET", "/login?next=/builds/1", &[], "")?;
    assert_eq!(answer.status, 200);
    assert!(
        answer.body.contains("name=\"next\" value=\"/builds/1\""),
        "{}",
        answer.body
    );
    // The admin token as a bearer token reads pages (scripts, the API client).
    let (status, _) = api.call_raw("GET", "/", None).await?;
    assert_eq!(status, 200);

    // A wrong token, or the right one from another origin: no session.
    let good_login = format!("token={}&next=%2F", form_value(&token));
    let answer = http(
        port,
        "POST",
        "/login",
        &[("Origin", &origin)],
        "token=guess&next=%2F",
    )?;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(answer.body.contains("wrong admin token"), "{}", answer.body);
    assert!(answer.header("set-cookie").is_none());
    let answer = http(
        port,
        "POST",
        "/login",
        &[("Origin", "http://evil.example")],
        &good_login,
    )?;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(answer.body.contains("cross-origin"), "{}", answer.body);
    assert!(answer.header("set-cookie").is_none());

    // The right token: a session cookie, HttpOnly and SameSite=Strict.
    let answer = http(port, "POST", "/login", &[("Origin", &origin)], &good_login)?;
    assert_eq!(answer.status, 303, "{answer:?}\n{}", log());
    assert_eq!(answer.header("location"), Some("/"));
    let set = answer.header("set-cookie").unwrap_or_default().to_owned();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    assert!(set.contains("Path=/"), "{set}");
    let cookie = session_cookie(&answer)?;
    let page = http(port, "GET", "/", &[("Cookie", &cookie)], "")?;
    assert_eq!(page.status, 200, "{page:?}");
    let csrf = csrf_of(&page.body)?;
    assert!(
        page.body.contains("action=\"/farm/pause\""),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains(&format!("action=\"/builds/{id}/cancel\"")),
        "{}",
        page.body
    );
    let build_page = http(
        port,
        "GET",
        &format!("/builds/{id}"),
        &[("Cookie", &cookie)],
        "",
    )?;
    assert_eq!(csrf_of(&build_page.body)?, csrf, "one token per session");

    // Forged cancels: each refused with its reason, the build untouched.
    let cancel = format!("/builds/{id}/cancel");
    let good_form = format!("csrf={csrf}");
    for (headers, form, reason) in [
        (
            vec![("Origin", origin.as_str())],
            good_form.clone(),
            "no session",
        ),
        (
            vec![("Origin", origin.as_str()), ("Cookie", cookie.as_str())],
            "csrf=0000".to_owned(),
            "CSRF token is not this session's",
        ),
        (
            vec![("Origin", origin.as_str()), ("Cookie", cookie.as_str())],
            String::new(),
            "no CSRF token",
        ),
        (
            vec![
                ("Origin", "http://evil.example"),
                ("Cookie", cookie.as_str()),
            ],
            good_form.clone(),
            "cross-origin",
        ),
        (
            vec![
                ("Referer", "http://evil.example/x"),
                ("Cookie", cookie.as_str()),
            ],
            good_form.clone(),
            "cross-origin",
        ),
        (
            vec![("Cookie", cookie.as_str())],
            good_form.clone(),
            "no Origin or Referer",
        ),
        (
            vec![
                ("Origin", origin.as_str()),
                ("Cookie", cookie.as_str()),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            good_form.clone(),
            "Sec-Fetch-Site",
        ),
    ] {
        let answer = http(port, "POST", &cancel, &headers, &form)?;
        assert_eq!(answer.status, 403, "{headers:?}: {answer:?}");
        assert!(
            answer.body.contains(reason),
            "{headers:?}: `{reason}` in {}",
            answer.body
        );
    }
    // A GET is no action.
    let answer = http(port, "GET", &cancel, &[("Cookie", &cookie)], "")?;
    assert_eq!(answer.status, 405, "{answer:?}");
    let build = api.build(id).await?;
    assert_eq!(
        build.state,
        BuildState::Queued,
        "nothing changed: {build:?}"
    );

    // Forged pauses change nothing either.
    for headers in [
        vec![("Origin", origin.as_str())],
        vec![
            ("Origin", "http://evil.example"),
            ("Cookie", cookie.as_str()),
        ],
    ] {
        let answer = http(port, "POST", "/farm/pause", &headers, &good_form)?;
        assert_eq!(answer.status, 403, "{answer:?}");
    }
    assert!(
        !api.workers().await?.paused,
        "a forged pause paused the farm"
    );

    // The real forms work, through the scheduler's own paths.
    let session = [("Origin", origin.as_str()), ("Cookie", cookie.as_str())];
    let answer = http(port, "POST", "/farm/pause", &session, &good_form)?;
    assert_eq!((answer.status, answer.header("location")), (303, Some("/")));
    assert!(api.workers().await?.paused);
    let page = http(port, "GET", "/", &[("Cookie", &cookie)], "")?;
    assert!(
        page.body.contains("action=\"/farm/resume\""),
        "{}",
        page.body
    );
    let answer = http(port, "POST", "/farm/resume", &session, &good_form)?;
    assert_eq!(answer.status, 303, "{answer:?}");
    assert!(!api.workers().await?.paused);

    let answer = http(port, "POST", &cancel, &session, &good_form)?;
    assert_eq!(answer.status, 303, "{answer:?}\n{}", log());
    assert_eq!(
        answer.header("location"),
        Some(format!("/builds/{id}").as_str())
    );
    let build = farm.wait_build(id).await?;
    assert_eq!(build.outcome, Some(Outcome::Cancelled), "{build:?}");
    assert_eq!(
        build.reason.as_deref(),
        Some("cancelled from the dashboard")
    );
    // Cancelling it again is a clear conflict.
    let answer = http(port, "POST", &cancel, &session, &good_form)?;
    assert_eq!(answer.status, 409, "{answer:?}");

    let answer = http(
        port,
        "POST",
        &format!("/builds/{id}/rebuild"),
        &session,
        &good_form,
    )?;
    assert_eq!(answer.status, 303, "{answer:?}\n{}", log());
    let new_id: u64 = answer
        .header("location")
        .and_then(|l| l.strip_prefix("/builds/"))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{answer:?}"))?;
    assert_ne!(new_id, id);
    let rebuilt = api.build(new_id).await?;
    assert_eq!(rebuilt.builder, "app");
    assert_eq!(rebuilt.properties["flavour"], "lemon");
    assert_eq!(rebuilt.state, BuildState::Queued);
    assert_eq!(
        rebuilt.trigger.as_deref(),
        Some(format!("rebuild of #{id}").as_str())
    );
    let answer = http(port, "POST", "/builds/9999/rebuild", &session, &good_form)?;
    assert_eq!(answer.status, 404, "{answer:?}");

    // Logging out ends the session on the server.
    let answer = http(port, "POST", "/logout", &session, &good_form)?;
    assert_eq!(answer.status, 303, "{answer:?}");
    assert!(
        answer
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "{answer:?}"
    );
    let answer = http(port, "GET", "/", &[("Cookie", &cookie)], "")?;
    assert_eq!(
        answer.status, 303,
        "the old cookie is no session: {answer:?}"
    );
    let answer = http(
        port,
        "POST",
        &format!("/builds/{new_id}/cancel"),
        &session,
        &good_form,
    )?;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(api.build(new_id).await?.state, BuildState::Queued);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_dashboard_is_readable_but_its_actions_still_need_a_login() -> anyhow::Result<()> {
    let farm = Farm::builder()
        .insecure()
        .master_toml("dashboard = \"public\"")
        .worker(WorkerSpec::new("w"))
        .builder("app", &["w"], &[("build", "echo hi")])
        .start()
        .await?;
    let port = farm.port;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let origin = format!("http://127.0.0.1:{port}");

    let page = http(port, "GET", "/", &[], "")?;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("href=\"/login?next=/\""),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<form"), "no actions without a login");
    let build_page = http(port, "GET", &format!("/builds/{id}"), &[], "")?;
    assert_eq!(build_page.status, 200);
    assert!(!build_page.body.contains("/cancel"), "{}", build_page.body);

    for (path, form) in [
        ("/farm/pause", "csrf=x"),
        (&format!("/builds/{id}/cancel") as &str, "csrf=x"),
        ("/logout", "csrf=x"),
    ] {
        let answer = http(port, "POST", path, &[("Origin", &origin)], form)?;
        assert_eq!(answer.status, 403, "{path}: {answer:?}");
        assert!(answer.body.contains("no session"), "{}", answer.body);
    }
    assert!(!api.workers().await?.paused);
    assert_eq!(api.build(id).await?.state, BuildState::Queued);

    // The setting is validated with the file.
    let bad = farm.dir.path().join("bad.toml");
    fs_err::write(
        &bad,
        "listen = \"127.0.0.1:0\"\ninsecure = true\ndashboard = \"everyone\"\n",
    )?;
    let out = std::process::Command::new(farm.master_bin())
        .arg("check")
        .arg("--config")
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("dashboard"), "{err}");
    assert!(err.contains("public") && err.contains("login"), "{err}");
    Ok(())
}
