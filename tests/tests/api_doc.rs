//! docs/api.md matches the master's router: every route it documents (a
//! `### METHOD /path` heading) answers on a real master — 401 without the
//! admin token, where an unknown route answers 404 — and every route the
//! router declares (`.route("/api/v1/…", get(…).post(…))` in
//! master/src/api.rs) is documented.

use std::collections::BTreeSet;

use nightshift_tests::{Farm, workspace_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (METHOD, /path) of every `### \`METHOD /path\`` heading.
fn documented() -> anyhow::Result<BTreeSet<(String, String)>> {
    let text = fs_err::read_to_string(workspace_root().join("docs/api.md"))?;
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix("### `")?.strip_suffix('`'))
        .filter_map(|route| {
            let (method, path) = route.split_once(' ')?;
            Some((method.to_owned(), path.to_owned()))
        })
        .collect())
}

/// (METHOD, /path) of every `.route(…)` of the admin router's source.
fn routed() -> anyhow::Result<BTreeSet<(String, String)>> {
    let source = fs_err::read_to_string(workspace_root().join("master/src/api.rs"))?;
    let mut routes = BTreeSet::new();
    for call in source.split(".route(\"").skip(1) {
        let Some((path, rest)) = call.split_once('"') else {
            continue;
        };
        // The handlers up to the call's closing parenthesis on this line:
        // `get(a).post(b))`.
        let handlers = rest.lines().next().unwrap_or_default();
        for method in ["get", "post", "put", "delete", "patch"] {
            let needle = format!("{method}(");
            let mut at = 0;
            while let Some(found) = handlers[at..].find(&needle) {
                let index = at + found;
                let before = handlers[..index].chars().last();
                if matches!(before, Some(' ' | '.' | ',')) {
                    routes.insert((method.to_uppercase(), path.to_owned()));
                }
                at = index + needle.len();
            }
        }
    }
    Ok(routes)
}

/// The status code of `METHOD path` without a token, over plain HTTP/1.1.
async fn status_without_token(port: u16, method: &str, path: &str) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_document_lists_exactly_the_routes_the_master_serves() -> anyhow::Result<()> {
    let documented = documented()?;
    let routed = routed()?;
    assert!(
        routed.len() >= 9,
        "the router's source was not read: {routed:?}"
    );
    assert_eq!(
        documented, routed,
        "docs/api.md (left) and the router in master/src/api.rs (right) differ"
    );

    let farm = Farm::builder().insecure().start().await?;
    // The check tells "guarded route" (401) from "no route" (404).
    assert_eq!(
        status_without_token(farm.port, "GET", "/api/v1/no-such-thing").await?,
        404
    );
    for (method, path) in &documented {
        let path = path.replace("{id}", "1");
        let status = status_without_token(farm.port, method, &path).await?;
        assert_eq!(
            status, 401,
            "{method} {path}: documented, but answers {status}"
        );
    }
    Ok(())
}
