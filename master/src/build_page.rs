//! The dashboard's page per build (`/builds/{id}`): builder, source, worker,
//! why it waited, each step with its state and duration, and the log, which
//! streams live over server-sent events (`/builds/{id}/events`) while the
//! build runs and is shown complete after it. Server-rendered; the only
//! script appends pushed log chunks and reloads the page when the build ends.

use std::convert::Infallible;
use std::fmt::Write;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::stream::{self, Stream};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use nightshift_proto::api::{BuildInfo, BuildState};
use nightshift_proto::wire::{BuildId, Outcome};
use tokio::sync::{broadcast, oneshot};

use crate::dashboard::{time_html, wait_phrase, worker_anchor};
use crate::live_log::LiveEvent;
use crate::scheduler::Event;
use crate::state::AppState;
use crate::style::STYLE;
use nightshift_proto::html::escape;
use nightshift_proto::when::short_duration;

/// The most log a page or a new viewer's first event carries: the tail,
/// from a line start; the whole log is `master log ID`.
pub const LOG_TAIL_BYTES: usize = 1 << 20;

/// A step as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    pub name: String,
    /// `success`, `failure`, … for a finished step; `running`, `pending`.
    pub state: String,
    pub duration: Option<String>,
}

/// The steps of `build`: the builder's names (`checkout` first for a builder
/// with a source) merged with the stored results.
pub fn step_rows(build: &BuildInfo, names: &[String], now: Timestamp) -> Vec<StepRow> {
    let count = names.len().max(
        build
            .steps
            .iter()
            .map(|s| s.step as usize + 1)
            .max()
            .unwrap_or(0),
    );
    let mut running_marked = false;
    (0..count)
        .map(|i| {
            let name = names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("step {}", i + 1));
            match build.steps.iter().find(|s| s.step as usize == i) {
                Some(result) => StepRow {
                    name,
                    state: result.outcome.to_string(),
                    duration: Some(short_duration(result.started_at, result.finished_at)),
                },
                None if build.state == BuildState::Running && !running_marked => {
                    running_marked = true;
                    let since = build
                        .steps
                        .iter()
                        .map(|s| s.finished_at)
                        .max()
                        .or(build.started_at);
                    StepRow {
                        name,
                        state: "running".into(),
                        duration: since.map(|t| format!("{} so far", short_duration(t, now))),
                    }
                }
                None if build.state == BuildState::Finished => StepRow {
                    name,
                    state: "skipped".into(),
                    duration: None,
                },
                None => StepRow {
                    name,
                    state: "pending".into(),
                    duration: None,
                },
            }
        })
        .collect()
}

/// `GET /builds/{id}`.
pub async fn page(
    State(state): State<AppState>,
    Path(id): Path<String>,
    viewer: Option<axum::Extension<crate::session::Viewer>>,
) -> Response {
    let Ok(id) = id.parse::<BuildId>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("bad build id `{id}`: expected a number"),
        )
            .into_response();
    };
    let build = match state.store.get_build(id).await {
        Ok(Some(build)) => build,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no build {id}")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    };
    let watch = match state.store.watch_log(id, LOG_TAIL_BYTES).await {
        Ok(Some(watch)) => watch,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no build {id}")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    };
    drop(watch.live);
    let mut build = build;
    if build.state != BuildState::Finished {
        let (reply, answer) = oneshot::channel();
        if state.events.send(Event::Snapshot { reply }).is_ok()
            && let Ok(snapshot) = answer.await
        {
            let live = snapshot.waiting_for.get(&id).cloned();
            build.estimate_secs = snapshot
                .estimates
                .get(&build.builder)
                .and_then(|took| u64::try_from(took.as_secs()).ok());
            build.waiting_for = match build.state {
                BuildState::Queued => live.or(build.waiting_for.take()),
                _ => live,
            };
        }
    } else {
        build.waiting_for = None;
    }
    let config = state.config.get();
    let names: Vec<String> = config
        .builder(&build.builder)
        .map(|def| {
            let checkout = def.source.is_some().then(|| "checkout".to_owned());
            let upload =
                (!def.artifacts.is_empty()).then(|| crate::scheduler::ARTIFACT_STEP.to_owned());
            checkout
                .into_iter()
                .chain(def.steps.iter().map(|s| s.name.clone()))
                .chain(upload)
                .collect()
        })
        .unwrap_or_default();
    let controls = crate::actions::build_controls(&build, &crate::session::viewer(viewer));
    let html = render(
        &build,
        &names,
        &controls,
        &watch.log,
        watch.cut,
        Timestamp::now(),
        &TimeZone::system(),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

/// The build page for `build` with its log so far, as of `now`;
/// `controls` is the viewer's actions (`actions::build_controls`).
pub fn render(
    build: &BuildInfo,
    step_names: &[String],
    controls: &str,
    log: &str,
    cut: bool,
    now: Timestamp,
    tz: &TimeZone,
) -> String {
    let mut html = String::with_capacity(8 * 1024 + log.len() * 11 / 10);
    let state = match (build.state, build.outcome) {
        (BuildState::Finished, Some(Outcome::Cancelled)) => "cancelled",
        (state, _) => state.as_str(),
    };
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Build #{id} {builder} ({state}) · nightshift</title><style>{STYLE}</style></head>\
         <body><div class=\"wrap\"><header class=\"top\"><h1><a class=\"brand\" href=\"/\">nightshift</a> \
         build #{id}</h1><span class=\"pill {state}\" id=\"build-state\">{state}</span>{controls}</header>",
        id = build.id,
        builder = escape(&build.builder),
    );
    html.push_str("<section class=\"card\"><h2>Build</h2><dl class=\"facts\">");
    let mut fact = |label: &str, value: String| {
        let _ = write!(html, "<dt>{label}</dt><dd>{value}</dd>");
    };
    fact(
        "Builder",
        format!("<span class=\"name\">{}</span>", escape(&build.builder)),
    );
    if let Some(revision) = &build.revision {
        fact("Revision", format!("<code>{}</code>", escape(revision)));
    }
    if let Some(branch) = &build.branch {
        fact("Branch", escape(branch));
    }
    if let Some(repository) = &build.repository {
        fact("Repository", format!("<code>{}</code>", escape(repository)));
    }
    if let Some(trigger) = &build.trigger {
        fact("Trigger", escape(trigger));
    }
    fact(
        "Worker",
        match &build.worker {
            Some(worker) => format!(
                "<a href=\"/#worker-{0}\">{1}</a>",
                escape(&worker_anchor(worker)),
                escape(worker)
            ),
            None => "<span class=\"none\">—</span>".into(),
        },
    );
    if let Some(outcome) = build.outcome {
        let reason = build
            .reason
            .as_deref()
            .map(|r| format!(" — {}", escape(r)))
            .unwrap_or_default();
        fact(
            "Outcome",
            format!("<span class=\"outcome {outcome}\">{outcome}</span>{reason}"),
        );
    }
    if let Some(into) = build.collapsed_into {
        fact(
            "Collapsed into",
            format!("<a href=\"/builds/{into}\">#{into}</a>"),
        );
    }
    if let Some(waiting) = &build.waiting_for {
        fact(
            "Waiting",
            format!(
                "<span class=\"wait\">{}</span>",
                escape(&wait_phrase(waiting))
            ),
        );
    }
    if build.retries > 0 {
        fact(
            "Retries",
            format!(
                "{} — {}",
                build.retries,
                escape(
                    build
                        .retry_reason
                        .as_deref()
                        .unwrap_or("re-queued after its worker lost it")
                )
            ),
        );
    }
    fact("Submitted", time_html(build.submitted_at, now, tz));
    if let Some(started) = build.started_at {
        let waited = short_duration(build.submitted_at, started);
        fact(
            "Started",
            format!(
                "{} <span class=\"soft\">after waiting {waited}</span>",
                time_html(started, now, tz)
            ),
        );
    }
    if let (Some(secs), true) = (build.estimate_secs, build.state != BuildState::Finished) {
        let ends = build
            .started_at
            .and_then(|started| {
                started
                    .checked_add(jiff::SignedDuration::from_secs(i64::try_from(secs).ok()?))
                    .ok()
            })
            .map(|end| {
                format!(
                    " <span class=\"soft\">ends about {}</span>",
                    time_html(end, now, tz)
                )
            })
            .unwrap_or_default();
        fact(
            "Estimate",
            format!(
                "estimated {}{ends}",
                escape(&crate::dashboard::estimate_words(secs))
            ),
        );
    }
    if let (Some(started), Some(finished)) = (build.started_at, build.finished_at) {
        fact(
            "Finished",
            format!(
                "{} <span class=\"soft\">took {}</span>",
                time_html(finished, now, tz),
                short_duration(started, finished)
            ),
        );
    }
    html.push_str("</dl></section>");

    let steps = step_rows(build, step_names, now);
    html.push_str("<section class=\"card\"><h2>Steps</h2>");
    if steps.is_empty() {
        html.push_str("<p class=\"empty\">No steps known.</p>");
    } else {
        html.push_str(
            "<table><thead><tr><th>#</th><th>Step</th><th>State</th><th>Duration</th></tr></thead><tbody>",
        );
        for (i, step) in steps.iter().enumerate() {
            let _ = write!(
                html,
                "<tr><td class=\"num\">{n}</td><td class=\"name\">{name}</td>\
                 <td><span class=\"outcome {state}\">{state}</span></td><td class=\"num\">{took}</td></tr>",
                n = i + 1,
                name = escape(&step.name),
                state = escape(&step.state),
                took = step
                    .duration
                    .as_deref()
                    .map_or_else(|| "<span class=\"none\">—</span>".to_owned(), escape),
            );
        }
        html.push_str("</tbody></table>");
    }
    html.push_str("</section>");
    crate::artifacts::render_list(&mut html, build);

    let live = build.state != BuildState::Finished;
    let _ = write!(
        html,
        "<section class=\"card\"><h2>Log <span class=\"count\" id=\"log-status\">{}</span></h2>",
        if live { "(live)" } else { "(complete)" }
    );
    if cut {
        let _ = write!(
            html,
            "<p class=\"soft\">Earlier output left out: the whole log is \
             <code>master log {}</code>.</p>",
            build.id
        );
    }
    let _ = write!(
        html,
        "<pre class=\"log\" id=\"log\">{}</pre></section>",
        escape(log)
    );
    if live {
        let _ = write!(
            html,
            "<script>(function(){{var pre=document.getElementById('log');\
             var status=document.getElementById('log-status');\
             var es=new EventSource('/builds/{id}/events');\
             es.addEventListener('reset',function(e){{pre.textContent=JSON.parse(e.data);}});\
             es.addEventListener('log',function(e){{pre.textContent+=JSON.parse(e.data);}});\
             es.addEventListener('skipped',function(e){{pre.textContent+=JSON.parse(e.data);}});\
             es.addEventListener('done',function(){{es.close();status.textContent='(finished)';\
             location.reload();}});}})();</script>",
            id = build.id
        );
    }
    html.push_str(
        "<footer class=\"foot\"><a href=\"/\">Back to the farm</a>. Times are the master's \
         local time.</footer></div></body></html>",
    );
    html
}

/// What the event stream still has to say.
enum Phase {
    Start(crate::store::LogWatch),
    Live(broadcast::Receiver<LiveEvent>),
    Finish,
    Done,
}

/// `GET /builds/{id}/events`: a `reset` event with the log so far, then a
/// `log` event per chunk as it arrives, `skipped` when this viewer fell too
/// far behind, and `done` when the build has finished.
pub async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<BuildId>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("bad build id `{id}`: expected a number"),
        )
            .into_response();
    };
    let watch = match state.store.watch_log(id, LOG_TAIL_BYTES).await {
        Ok(Some(watch)) => watch,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no build {id}")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    };
    let stream = event_stream(watch);
    (
        [(header::CACHE_CONTROL, "no-store")],
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    )
        .into_response()
}

fn json_event(name: &str, text: &str) -> SseEvent {
    SseEvent::default()
        .event(name)
        .json_data(text)
        .unwrap_or_else(|_| SseEvent::default().event(name))
}

/// The events of one viewer: memory bounded by the tail it starts with and
/// the build's shared broadcast ring.
fn event_stream(watch: crate::store::LogWatch) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Phase::Start(watch), |phase| async move {
        match phase {
            Phase::Start(watch) => {
                let event = json_event("reset", &watch.log);
                let next = match watch.live {
                    Some(rx) if !watch.finished => Phase::Live(rx),
                    _ => Phase::Finish,
                };
                Some((Ok(event), next))
            }
            Phase::Live(mut rx) => match rx.recv().await {
                Ok(LiveEvent::Output { data, .. }) => {
                    Some((Ok(json_event("log", &data)), Phase::Live(rx)))
                }
                Ok(LiveEvent::Finished) | Err(broadcast::error::RecvError::Closed) => Some((
                    Ok(SseEvent::default().event("done").data("finished")),
                    Phase::Done,
                )),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((
                    Ok(json_event(
                        "skipped",
                        &format!(
                            "\n[… {n} chunks of output skipped here; reload for the full log]\n"
                        ),
                    )),
                    Phase::Live(rx),
                )),
            },
            Phase::Finish => Some((
                Ok(SseEvent::default().event("done").data("finished")),
                Phase::Done,
            )),
            Phase::Done => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nightshift_proto::wire::StepResult;

    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn build(state: BuildState) -> BuildInfo {
        BuildInfo {
            id: 12,
            builder: "app<x>".to_owned(),
            properties: BTreeMap::from([("secret".to_owned(), "hunter2".to_owned())]),
            state,
            worker: Some("desk \"1\"".to_owned()),
            outcome: None,
            retries: 0,
            retry_reason: None,
            waiting_for: None,
            estimate_secs: None,
            reason: None,
            submitted_at: at("2026-11-23T13:00:00Z"),
            started_at: Some(at("2026-11-23T13:02:00Z")),
            finished_at: None,
            steps: Vec::new(),
            repository: Some("https://example.com/app.git".to_owned()),
            branch: Some("main".to_owned()),
            revision: Some("0123456789abcdef".to_owned()),
            trigger: Some("webhook gh".to_owned()),
            collapsed_into: None,
            artifacts: Vec::new(),
        }
    }

    fn step(i: u32, outcome: Outcome, start: &str, end: &str) -> StepResult {
        StepResult {
            step: i,
            outcome,
            exit_code: Some(0),
            signal: None,
            started_at: at(start),
            finished_at: at(end),
        }
    }

    fn names() -> Vec<String> {
        ["checkout", "build", "test"].map(str::to_owned).to_vec()
    }

    #[test]
    fn a_running_build_shows_done_running_and_pending_steps_and_streams() {
        let now = at("2026-11-23T13:05:00Z");
        let mut b = build(BuildState::Running);
        b.steps = vec![step(
            0,
            Outcome::Success,
            "2026-11-23T13:02:00Z",
            "2026-11-23T13:02:30Z",
        )];
        b.waiting_for = Some("lock deploy (on desk)".to_owned());
        let rows = step_rows(&b, &names(), now);
        let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["success", "running", "pending"]);
        assert_eq!(rows[0].duration.as_deref(), Some("30s"));
        assert_eq!(rows[1].duration.as_deref(), Some("2m30s so far"));
        assert_eq!(rows[2].duration, None);

        let html = render(
            &b,
            &names(),
            "",
            "<script>x</script>\n",
            false,
            now,
            &TimeZone::UTC,
        );
        assert!(!html.contains("<script>x"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(html.contains("app&lt;x&gt;"));
        assert!(
            html.contains("<a href=\"/#worker-desk__1_\">desk &quot;1&quot;</a>"),
            "{html}"
        );
        assert!(html.contains("<code>0123456789abcdef</code>"));
        assert!(html.contains("<dd>webhook gh</dd>"));
        assert!(html.contains("waiting for lock deploy (on desk)"));
        assert!(html.contains("after waiting 2m00s"));
        assert!(html.contains("new EventSource('/builds/12/events')"));
        assert!(html.contains("(live)"));
        assert!(!html.contains("hunter2"), "properties stay private");
    }

    #[test]
    fn an_unfinished_build_shows_its_builders_estimate() {
        let now = at("2026-11-23T13:05:00Z");
        let mut b = build(BuildState::Running);
        b.estimate_secs = Some(300);
        let html = render(&b, &names(), "", "", false, now, &TimeZone::UTC);
        let started = b.started_at.expect("started");
        let ends = started + jiff::SignedDuration::from_secs(300);
        assert!(
            html.contains("<dt>Estimate</dt><dd>estimated 5 min"),
            "{html}"
        );
        assert!(
            html.contains(&format!(
                "ends about {}",
                time_html(ends, now, &TimeZone::UTC)
            )),
            "{html}"
        );
        // Queued: the estimate, no end yet.
        let mut queued = build(BuildState::Queued);
        queued.started_at = None;
        queued.estimate_secs = Some(4800);
        let html = render(&queued, &names(), "", "", false, now, &TimeZone::UTC);
        assert!(html.contains("<dd>estimated 1 h 20 min</dd>"), "{html}");
        // Finished builds say what they took, not what was expected.
        let mut done = build(BuildState::Finished);
        done.estimate_secs = Some(300);
        let html = render(&done, &names(), "", "", false, now, &TimeZone::UTC);
        assert!(!html.contains("estimated"), "{html}");
    }

    #[test]
    fn a_finished_build_shows_the_complete_log_and_skipped_steps() {
        let now = at("2026-11-23T14:00:00Z");
        let mut b = build(BuildState::Finished);
        b.outcome = Some(Outcome::Failure);
        b.finished_at = Some(at("2026-11-23T13:04:05Z"));
        b.steps = vec![
            step(
                0,
                Outcome::Success,
                "2026-11-23T13:02:00Z",
                "2026-11-23T13:02:30Z",
            ),
            step(
                1,
                Outcome::Failure,
                "2026-11-23T13:02:30Z",
                "2026-11-23T13:04:05Z",
            ),
        ];
        let rows = step_rows(&b, &names(), now);
        let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["success", "failure", "skipped"]);
        let html = render(&b, &names(), "", "tail\n", true, now, &TimeZone::UTC);
        assert!(!html.contains("EventSource"));
        assert!(html.contains("(complete)"));
        assert!(html.contains("took 2m05s"));
        assert!(html.contains("<span class=\"outcome failure\">failure</span>"));
        assert!(html.contains("Earlier output left out"));
        assert!(html.contains("<code>master log 12</code>"));
    }

    #[test]
    fn steps_without_names_still_show() {
        let mut b = build(BuildState::Finished);
        b.steps = vec![step(
            1,
            Outcome::Success,
            "2026-11-23T13:02:00Z",
            "2026-11-23T13:02:01Z",
        )];
        let rows = step_rows(&b, &[], at("2026-11-23T14:00:00Z"));
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["step 1", "step 2"]);
        assert_eq!(rows[0].state, "skipped");
    }
}
