//! A small read-only HTML page at `/`: every worker's state and why, and the
//! latest builds. Server-rendered, no scripts, no external assets; it shows
//! no build properties or logs (those need the admin token via the API).

use std::fmt::Write;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use tokio::sync::oneshot;

use crate::api::AppState;
use crate::scheduler::Event;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub async fn page(State(state): State<AppState>) -> Response {
    let (reply, answer) = oneshot::channel();
    if state.events.send(Event::Snapshot { reply }).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "master is stopping").into_response();
    }
    let Ok(snapshot) = answer.await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "master is stopping").into_response();
    };
    let builds = match state.store.list_builds(50).await {
        Ok(builds) => builds,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    };
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>nightshift master</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
         .available{color:#080}.reluctant{color:#a60}.away{color:#a00}.offline{color:#777}</style>\
         </head><body><h1>nightshift master</h1>",
    );
    if snapshot.workers.paused {
        html.push_str("<p><strong>Paused:</strong> no new builds are handed out.</p>");
    }
    html.push_str(
        "<h2>Workers</h2><table><tr><th>name</th><th>state</th><th>reason</th>\
         <th>source</th><th>since</th><th>until</th><th>running</th></tr>",
    );
    for w in &snapshot.workers.workers {
        let running: Vec<String> = w.running.iter().map(|id| id.to_string()).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&w.name),
            w.state,
            w.state,
            esc(&w.reason),
            esc(&w.source.as_ref().map(|s| s.to_string()).unwrap_or_default()),
            w.since.map(|t| t.to_string()).unwrap_or_default(),
            w.until.map(|t| t.to_string()).unwrap_or_default(),
            running.join(", "),
        );
    }
    html.push_str(
        "</table><h2>Latest builds</h2><table><tr><th>id</th><th>builder</th><th>state</th>\
         <th>worker</th><th>outcome</th><th>retries</th><th>waiting for</th></tr>",
    );
    for b in &builds {
        let waiting = snapshot
            .waiting_for
            .get(&b.id)
            .cloned()
            .or_else(|| b.waiting_for.clone())
            .unwrap_or_default();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            b.id,
            esc(&b.builder),
            b.state,
            esc(b.worker.as_deref().unwrap_or("")),
            b.outcome.map(|o| o.to_string()).unwrap_or_default(),
            b.retries,
            esc(&waiting),
        );
    }
    html.push_str("</table></body></html>");
    Html(html).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::esc("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }
}
