//! A small HTML page at `/` for the farm's admin: every worker's state and
//! why (with latent instances), and the latest builds, in the master's local
//! time. Server-rendered, no scripts, no external assets; it refreshes itself
//! every 10 s with a meta refresh. Each build links to its page
//! (`build_page`, with the log); build properties are never shown. A
//! logged-in viewer also gets the `actions` forms (pause/resume, cancel,
//! rebuild).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::PresenceState;
use nightshift_proto::api::{BuildInfo, BuildState, LatentInfo, WorkerPage, WorkerQuery};
use nightshift_proto::html::escape;
use nightshift_proto::when::{short_duration, short_time};
use nightshift_proto::wire::{BuildId, Outcome};
use tokio::sync::oneshot;

use crate::actions;
use crate::config::Admission;
use crate::scheduler::Event;
use crate::session::Viewer;
use crate::state::AppState;
use crate::style::STYLE;

/// How many builds the page lists, newest first.
const LATEST_BUILDS: u32 = 50;
/// How many workers the page lists (in name order; `?state=`, `?name=` and
/// `?offset=` pick others), whatever the size of the farm.
const WORKERS_SHOWN: usize = 200;
/// Seconds between the page's own reloads (meta refresh).
const REFRESH_SECS: u32 = 10;

mod builds;
mod time;
mod workers;

pub use builds::*;
pub use time::*;
pub use workers::*;

/// Unfinished builds counted in the store: the summary line counts all of
/// them, not only those among the latest listed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildCounts {
    pub queued: u64,
    pub running: u64,
}

/// `GET /`: asks the scheduler for one page of workers (the first
/// [`WORKERS_SHOWN`] in name order, or as `?state=&name=&offset=` say) with
/// the counts by state, and for what the listed builds wait, and the store
/// for the latest builds; renders the page in the master's local time zone.
pub async fn page(
    State(state): State<AppState>,
    viewer: Option<axum::Extension<crate::session::Viewer>>,
    query: Result<Query<WorkerQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return (
            StatusCode::BAD_REQUEST,
            "bad query: state=available|reluctant|away|offline, name=TEXT, offset=N",
        )
            .into_response();
    };
    let stopping = || (StatusCode::SERVICE_UNAVAILABLE, "master is stopping").into_response();
    let (reply, answer) = oneshot::channel();
    let ask = Event::WorkersPage {
        query,
        limit: WORKERS_SHOWN,
        reply,
    };
    if state.events.send(ask).is_err() {
        return stopping();
    }
    let Ok(workers) = answer.await else {
        return stopping();
    };
    let builds = match state.store.list_builds(LATEST_BUILDS).await {
        Ok(builds) => builds,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    };
    let (reply, answer) = oneshot::channel();
    let ids = builds
        .iter()
        .filter(|b| b.state != BuildState::Finished)
        .map(|b| b.id)
        .collect();
    if state.events.send(Event::WaitingFor { ids, reply }).is_err() {
        return stopping();
    }
    let Ok(waits) = answer.await else {
        return stopping();
    };
    let counts = match count_unfinished(&state).await {
        Ok(counts) => counts,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    };
    let builds = with_live_waits(builds, &waits.waiting_for, &waits.estimates);
    let builders: Vec<BuilderRow> = state
        .config
        .get()
        .builders
        .iter()
        .map(|def| BuilderRow {
            name: def.name.clone(),
            workers: def.workers.len(),
            admission: def.admission,
            estimate: waits.estimates.get(&def.name).copied(),
        })
        .collect();
    let html = render(
        &workers,
        &builds,
        &builders,
        counts,
        &crate::session::viewer(viewer),
        Timestamp::now(),
        &TimeZone::system(),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

/// Counts the queued and running builds in the store.
async fn count_unfinished(state: &AppState) -> anyhow::Result<BuildCounts> {
    let (queued, running) = state.store.unfinished_counts().await?;
    Ok(BuildCounts { queued, running })
}

/// What each build waits for right now: the scheduler's live word for a
/// queued build (else the stored one), for a running build only the live
/// word (a step waiting for a lock), nothing for a finished build; and the
/// builder's estimated duration while it is not finished.
fn with_live_waits(
    mut builds: Vec<BuildInfo>,
    live: &BTreeMap<BuildId, String>,
    estimates: &BTreeMap<String, SignedDuration>,
) -> Vec<BuildInfo> {
    for build in &mut builds {
        if build.state != BuildState::Finished {
            build.estimate_secs = estimates
                .get(&build.builder)
                .and_then(|took| u64::try_from(took.as_secs()).ok());
        }
        let now = live.get(&build.id).cloned();
        build.waiting_for = match build.state {
            BuildState::Queued => now.or(build.waiting_for.take()),
            BuildState::Running => now,
            BuildState::Finished => None,
        };
    }
    builds
}

/// One builder as the dashboard lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderRow {
    pub name: String,
    /// How many workers it lists.
    pub workers: usize,
    pub admission: Admission,
    /// Its estimated duration (window-aware admission); `None` until known.
    pub estimate: Option<SignedDuration>,
}

/// `1 worker` / `3 workers`.
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The whole page for these workers and builds as of `now`, times in `tz`,
/// with the actions `viewer` may take.
pub fn render(
    workers: &WorkerPage,
    builds: &[BuildInfo],
    builders: &[BuilderRow],
    counts: BuildCounts,
    viewer: &Viewer,
    now: Timestamp,
    tz: &TimeZone,
) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let title = if workers.paused {
        "nightshift master (paused)"
    } else {
        "nightshift master"
    };
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>{title}</title><style>{STYLE}</style></head><body><div class=\"wrap\">"
    );
    render_header(&mut html, workers, counts, viewer, now, tz);
    render_workers(&mut html, workers, now, tz);
    render_builds(&mut html, builds, viewer.csrf.as_deref(), now, tz);
    render_builders(&mut html, builders);
    let zone = tz
        .iana_name()
        .map(str::to_owned)
        .unwrap_or_else(|| now.to_zoned(tz.clone()).strftime("%Z").to_string());
    let _ = write!(
        html,
        "<footer class=\"foot\">{}; refreshes every {REFRESH_SECS} s. Times are the \
         master's local time ({}). A build's number opens its page with the log; \
         build properties need the admin token: <code>master builds</code> or the API.</footer>\
         </div></body></html>",
        if viewer.csrf.is_some() {
            "Logged in"
        } else {
            "Read-only"
        },
        escape(&zone)
    );
    html
}

/// Title, summary line and the paused banner.
fn render_header(
    html: &mut String,
    workers: &WorkerPage,
    counts: BuildCounts,
    viewer: &Viewer,
    now: Timestamp,
    tz: &TimeZone,
) {
    let farm_button = match &viewer.csrf {
        Some(csrf) if workers.paused => {
            actions::button("/farm/resume", "Resume the farm", "resume", "", csrf)
        }
        Some(csrf) => actions::button("/farm/pause", "Pause the farm", "pause", "", csrf),
        None => String::new(),
    };
    let _ = write!(
        html,
        "<header class=\"top\"><h1><span class=\"brand\">nightshift</span> master</h1>\
         <span class=\"asof\" title=\"{}\">as of {}</span><div class=\"controls\">{farm_button}{}</div></header>",
        escape(&full_time(now, tz)),
        escape(&now.to_zoned(tz.clone()).strftime("%H:%M:%S %Z").to_string()),
        actions::account_html(viewer, "/"),
    );
    let count = |state: PresenceState| workers.counts.get(state.as_str()).copied().unwrap_or(0);
    let _ = write!(
        html,
        "<p class=\"summary\"><b>{}</b>: ",
        plural(workers.counts.values().sum(), "worker", "workers")
    );
    for (i, state) in PresenceState::ALL.into_iter().enumerate() {
        let _ = write!(
            html,
            "{}<b class=\"{state}\"><span class=\"n\">{}</span> {state}</b>",
            if i == 0 { "" } else { ", " },
            count(state),
        );
    }
    let _ = write!(
        html,
        "; <b class=\"queued\"><span class=\"n\">{}</span> queued</b>, \
         <b class=\"running\"><span class=\"n\">{}</span> running</b></p>",
        counts.queued, counts.running
    );
    if workers.paused {
        html.push_str(
            "<div class=\"paused\" role=\"status\"><strong>Paused:</strong> no new builds are \
             handed out; running builds go on. <code>master resume</code> to resume.</div>",
        );
    }
}

#[cfg(test)]
mod tests;
