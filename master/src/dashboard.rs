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
use nightshift_proto::wire::{BuildId, Outcome};
use tokio::sync::oneshot;

use crate::actions;
use crate::api::AppState;
use crate::config::Admission;
use crate::scheduler::Event;
use crate::session::Viewer;

/// How many builds the page lists, newest first.
const LATEST_BUILDS: u32 = 50;
/// How many workers the page lists (in name order; `?state=`, `?name=` and
/// `?offset=` pick others), whatever the size of the farm.
const WORKERS_SHOWN: usize = 200;
/// Seconds between the page's own reloads (meta refresh).
const REFRESH_SECS: u32 = 10;
/// The page's styles, inlined into every answer.
pub const STYLE: &str = include_str!("dashboard.css");

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

/// A moment as an admin reads it in `tz`: `14:02` on the day of `now`,
/// `Tue 24 Nov 09:05` on another day of the same year, and
/// `Sun 23 Nov 2025 09:05` in another year.
pub fn short_time(t: Timestamp, now: Timestamp, tz: &TimeZone) -> String {
    let (at, today) = (t.to_zoned(tz.clone()), now.to_zoned(tz.clone()));
    let format = if at.date() == today.date() {
        "%H:%M"
    } else if at.year() == today.year() {
        "%a %-d %b %H:%M"
    } else {
        "%a %-d %b %Y %H:%M"
    };
    at.strftime(format).to_string()
}

/// A moment in full, for a tooltip: `2026-11-23 14:02:11 CET`.
pub fn full_time(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// How long from `start` to `end`: `42s`, `3m05s`, `3h12m`, `2d03h`; a
/// negative span (clocks apart) reads `0s`.
pub fn short_duration(start: Timestamp, end: Timestamp) -> String {
    let secs = end.as_second().saturating_sub(start.as_second()).max(0);
    let (days, hours, minutes, seconds) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

/// A `<time>` element: the short local time, the full one as a tooltip.
pub fn time_html(t: Timestamp, now: Timestamp, tz: &TimeZone) -> String {
    let machine = Timestamp::from_second(t.as_second()).unwrap_or(t);
    format!(
        "<time datetime=\"{}\" title=\"{}\">{}</time>",
        escape(&machine.to_string()),
        escape(&full_time(t, tz)),
        escape(&short_time(t, now, tz)),
    )
}

/// A builder's estimated duration as people say it: `40 s`, `5 min`
/// (rounded up: an estimate is a promise not to take longer), `1 h 20 min`.
pub fn estimate_words(secs: u64) -> String {
    if secs < 60 {
        return format!("{} s", secs.max(1));
    }
    let minutes = secs.div_ceil(60);
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h} h"),
        (h, m) => format!("{h} h {m} min"),
    }
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

/// The workers card: one page of them, and how to see the others.
fn render_workers(html: &mut String, page: &WorkerPage, now: Timestamp, tz: &TimeZone) {
    let workers = page.workers.as_slice();
    let _ = write!(
        html,
        "<section class=\"card\"><h2>Workers <span class=\"count\">({})</span></h2>",
        page.total
    );
    if workers.len() < page.total {
        let _ = write!(
            html,
            "<p class=\"more\">Showing {}–{} of {} (name order). Others: \
             <code>?offset={}</code>, <code>?state=away</code>, <code>?name=lab-</code>; \
             or <code>master workers</code>.</p>",
            page.offset + 1,
            page.offset + workers.len(),
            page.total,
            page.offset + workers.len()
        );
    }
    if workers.is_empty() {
        html.push_str(
            "<p class=\"empty\">No workers: add <code>[[worker]]</code> entries to \
             master.toml and run <code>master reconfig</code>.</p></section>",
        );
        return;
    }
    let any_latent = workers.iter().any(|w| w.latent.is_some());
    html.push_str(
        "<table><thead><tr><th>Worker</th><th>State</th><th>Why</th><th>Since</th>\
         <th>Until</th><th>Builds</th>",
    );
    if any_latent {
        html.push_str("<th>Instance</th>");
    }
    html.push_str("</tr></thead><tbody>");
    for w in workers {
        let _ = write!(
            html,
            "<tr id=\"worker-{}\">",
            escape(&crate::build_page::worker_anchor(&w.name))
        );
        let (dot, link) = if w.connected {
            ("on", "connected")
        } else {
            ("off", "not connected")
        };
        let _ = write!(
            html,
            "<td data-label=\"Worker\"><span class=\"name\">{}</span>\
             <span class=\"sub link\"><span class=\"dot {dot}\"></span>{link}</span></td>",
            escape(&w.name)
        );
        let _ = write!(
            html,
            "<td data-label=\"State\"><span class=\"pill {0}\">{0}</span></td>",
            w.state
        );
        html.push_str("<td data-label=\"Why\">");
        if w.reason.is_empty() {
            html.push_str("<span class=\"none\">—</span>");
        } else {
            html.push_str(&escape(&w.reason));
        }
        if let Some(source) = &w.source {
            let _ = write!(
                html,
                "<span class=\"sub\">source: {}</span>",
                escape(&source.to_string())
            );
        }
        html.push_str("</td><td data-label=\"Since\" class=\"num\">");
        match w.since {
            Some(since) => {
                let _ = write!(
                    html,
                    "{}<span class=\"sub\">for {}</span>",
                    time_html(since, now, tz),
                    short_duration(since, now)
                );
            }
            None => html.push_str("<span class=\"none\">—</span>"),
        }
        html.push_str("</td><td data-label=\"Until\" class=\"num\">");
        match w.until {
            Some(until) if until > now => {
                let _ = write!(
                    html,
                    "{}<span class=\"sub\">in {}</span>",
                    time_html(until, now, tz),
                    short_duration(now, until)
                );
            }
            Some(until) => {
                let _ = write!(
                    html,
                    "{}<span class=\"sub\">due now</span>",
                    time_html(until, now, tz)
                );
            }
            None => html.push_str("<span class=\"none\" title=\"no change is known\">—</span>"),
        }
        html.push_str("</td><td data-label=\"Builds\" class=\"num\">");
        if w.running.is_empty() {
            html.push_str("<span class=\"none\">idle</span>");
        } else {
            let ids: Vec<String> = w
                .running
                .iter()
                .map(|id| format!("<a href=\"/builds/{id}\">#{id}</a>"))
                .collect();
            html.push_str(&ids.join(", "));
        }
        let _ = write!(
            html,
            "<span class=\"sub\">{} of {}</span></td>",
            w.running.len(),
            plural(w.max_builds as usize, "slot", "slots")
        );
        if any_latent {
            html.push_str("<td data-label=\"Instance\">");
            match &w.latent {
                Some(latent) => render_latent(html, latent, now, tz),
                None => html.push_str("<span class=\"none\">—</span>"),
            }
            html.push_str("</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></section>");
}

/// A latent worker's instance: state, why, since when, provider, back-off.
fn render_latent(html: &mut String, latent: &LatentInfo, now: Timestamp, tz: &TimeZone) {
    let class = match latent.state.as_str() {
        "stopped" | "starting" | "running" | "lingering" | "stopping" => latent.state.as_str(),
        _ => "unknown",
    };
    let _ = write!(
        html,
        "<span class=\"inst {class}\">{}</span>",
        escape(&latent.state)
    );
    if !latent.reason.is_empty() {
        let _ = write!(html, " {}", escape(&latent.reason));
    }
    let _ = write!(
        html,
        "<span class=\"sub\">provider {} · since {} (for {})",
        escape(&latent.provider),
        time_html(latent.since, now, tz),
        short_duration(latent.since, now)
    );
    if let Some(retry) = latent.retry_after.filter(|t| *t > now) {
        let _ = write!(html, "; next try at {}", time_html(retry, now, tz));
    }
    html.push_str("</span>");
}

/// The latest builds card.
fn render_builds(
    html: &mut String,
    builds: &[BuildInfo],
    csrf: Option<&str>,
    now: Timestamp,
    tz: &TimeZone,
) {
    let _ = write!(
        html,
        "<section class=\"card\"><h2>Latest builds <span class=\"count\">(newest first, \
         up to {LATEST_BUILDS})</span></h2>"
    );
    if builds.is_empty() {
        html.push_str(
            "<p class=\"empty\">No builds yet: queue one with \
             <code>master submit BUILDER</code>.</p></section>",
        );
        return;
    }
    html.push_str(
        "<table><thead><tr><th>#</th><th>Builder</th><th>Source</th><th>State</th><th>Worker</th>\
         <th>Outcome</th><th>Retries</th><th>Detail</th><th>Submitted</th><th>Duration</th>",
    );
    if csrf.is_some() {
        html.push_str("<th>Action</th>");
    }
    html.push_str("</tr></thead><tbody>");
    for b in builds {
        let state = match (b.state, b.outcome) {
            (BuildState::Finished, Some(Outcome::Cancelled)) => "cancelled",
            (state, _) => state.as_str(),
        };
        let _ = write!(
            html,
            "<tr><td data-label=\"Build\" class=\"num\"><a href=\"/builds/{id}\">#{id}</a></td>\
             <td data-label=\"Builder\" class=\"name\">{builder}</td>\
             <td data-label=\"Source\">{source}</td>\
             <td data-label=\"State\"><span class=\"pill {state}\">{state}</span></td>\
             <td data-label=\"Worker\">{worker}</td>",
            id = b.id,
            builder = escape(&b.builder),
            source = source_cell(b),
            worker = b.worker.as_deref().map_or_else(
                || "<span class=\"none\">—</span>".to_owned(),
                |w| format!(
                    "<a href=\"#worker-{}\">{}</a>",
                    escape(&crate::build_page::worker_anchor(w)),
                    escape(w)
                )
            ),
        );
        html.push_str("<td data-label=\"Outcome\">");
        match (b.outcome, &b.reason) {
            (Some(outcome), Some(reason)) => {
                let _ = write!(
                    html,
                    "<span class=\"outcome {outcome} tip\" title=\"{}\">{outcome}</span>",
                    escape(reason)
                );
            }
            (Some(outcome), None) => {
                let _ = write!(html, "<span class=\"outcome {outcome}\">{outcome}</span>");
            }
            (None, _) => html.push_str("<span class=\"none\">—</span>"),
        }
        html.push_str("</td><td data-label=\"Retries\" class=\"num\">");
        if b.retries == 0 {
            html.push_str("<span class=\"none\">0</span>");
        } else {
            let why = b
                .retry_reason
                .as_deref()
                .unwrap_or("re-queued after its worker lost it");
            let _ = write!(
                html,
                "<span class=\"retried tip\" title=\"{}\">{}</span>",
                escape(why),
                b.retries
            );
        }
        html.push_str("</td><td data-label=\"Detail\">");
        match (&b.waiting_for, &b.reason) {
            (Some(waiting), _) => {
                let _ = write!(
                    html,
                    "<span class=\"wait\">{}</span>",
                    escape(&wait_phrase(waiting))
                );
            }
            (None, Some(reason)) if b.state == BuildState::Finished => {
                html.push_str(&escape(reason));
            }
            _ => {}
        }
        let _ = write!(
            html,
            "</td><td data-label=\"Submitted\" class=\"num\">{}</td>\
             <td data-label=\"Duration\" class=\"num\">{}</td>",
            time_html(b.submitted_at, now, tz),
            build_duration(b, now),
        );
        if let Some(csrf) = csrf {
            html.push_str("<td data-label=\"Action\">");
            html.push_str(&if b.state == BuildState::Finished {
                actions::button(
                    &format!("/builds/{}/rebuild", b.id),
                    "Rebuild",
                    &format!("rebuild-{}", b.id),
                    "small",
                    csrf,
                )
            } else {
                actions::button(
                    &format!("/builds/{}/cancel", b.id),
                    "Cancel",
                    &format!("cancel-{}", b.id),
                    "small danger",
                    csrf,
                )
            });
            html.push_str("</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></section>");
}

/// The builders card: each builder's estimated duration, which window-aware
/// admission holds against the workers' windows.
fn render_builders(html: &mut String, builders: &[BuilderRow]) {
    if builders.is_empty() {
        return;
    }
    let _ = write!(
        html,
        "<section class=\"card\"><h2>Builders <span class=\"count\">({})</span></h2>\
         <table><thead><tr><th>Builder</th><th>Workers</th><th>Estimated duration</th>\
         <th>Admission</th></tr></thead><tbody>",
        builders.len()
    );
    for b in builders {
        let estimate = match b.estimate {
            Some(took) => format!(
                "<span class=\"tip\" title=\"at most: the longest of its last {} successful builds plus a margin\">{}</span>",
                crate::scheduler::estimate::WINDOW,
                escape(&estimate_words(u64::try_from(took.as_secs()).unwrap_or(0)))
            ),
            None => format!(
                "<span class=\"none\">unknown until {} successful builds</span>",
                crate::scheduler::estimate::MIN_SAMPLES
            ),
        };
        let admission = match b.admission {
            Admission::Fit => "fit: waits for a window that fits",
            Admission::BestEffort => "best-effort: starts where the window lasts longest",
        };
        let _ = write!(
            html,
            "<tr><td data-label=\"Builder\" class=\"name\">{}</td>\
             <td data-label=\"Workers\" class=\"num\">{}</td>\
             <td data-label=\"Estimated duration\">{estimate}</td>\
             <td data-label=\"Admission\">{admission}</td></tr>",
            escape(&b.name),
            b.workers,
        );
    }
    html.push_str("</tbody></table></section>");
}

/// The scheduler's word for what a build waits for, as a phrase: its words
/// read after "waiting for" (`lock deploy (on b1)`, `a worker: b1 away`),
/// except a pause or a builder gone from master.toml, which say themselves.
pub fn wait_phrase(waiting: &str) -> String {
    if waiting == "master is paused" {
        "held: the master is paused".to_owned()
    } else if waiting.starts_with("builder ") {
        waiting.to_owned()
    } else {
        format!("waiting for {waiting}")
    }
}

/// How long a build has waited, has run so far, or took (with the
/// builder's estimate while it is not finished).
fn build_duration(b: &BuildInfo, now: Timestamp) -> String {
    let estimate = b.estimate_secs.map(estimate_words);
    match (b.state, b.started_at, b.finished_at) {
        (BuildState::Queued, _, _) => format!(
            "<span class=\"soft\">queued {}{}</span>",
            short_duration(b.submitted_at, now),
            estimate
                .map(|e| format!("; estimated {e}"))
                .unwrap_or_default()
        ),
        (BuildState::Running, Some(start), _) => {
            format!(
                "{} <span class=\"soft\">so far{}</span>",
                short_duration(start, now),
                estimate
                    .map(|e| format!(" of an estimated {e}"))
                    .unwrap_or_default()
            )
        }
        (BuildState::Finished, Some(start), Some(end)) => {
            format!(
                "<span class=\"soft\">took</span> {}",
                short_duration(start, end)
            )
        }
        _ => "<span class=\"none\">—</span>".to_owned(),
    }
}

/// `branch@short-revision`, the whole revision and repository as a tooltip.
fn source_cell(b: &BuildInfo) -> String {
    let Some(revision) = b.revision.as_deref() else {
        return "<span class=\"none\">—</span>".to_owned();
    };
    let short = revision.get(..10).unwrap_or(revision);
    let label = match b.branch.as_deref() {
        Some(branch) if !branch.is_empty() => format!("{branch}@{short}"),
        _ => short.to_owned(),
    };
    format!(
        "<code class=\"tip\" title=\"{} {}\">{}</code>",
        escape(b.repository.as_deref().unwrap_or("")),
        escape(revision),
        escape(&label)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_proto::api::{WorkerInfo, WorkerList};

    /// All of `list` as one page, with its counts by state.
    fn page(list: WorkerList) -> WorkerPage {
        let mut counts = BTreeMap::new();
        for w in &list.workers {
            *counts.entry(w.state.as_str().to_owned()).or_insert(0) += 1;
        }
        WorkerPage {
            paused: list.paused,
            total: list.workers.len(),
            offset: 0,
            workers: list.workers,
            counts,
        }
    }
    use nightshift_policy::Source;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn short_times_read_as_local_clock() {
        // Central Europe with its DST rule, no tz database needed.
        let cet = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let utc = TimeZone::UTC;
        let now = at("2026-11-23T13:30:00Z"); // Monday 14:30 CET
        let check = |t: &str, tz: &TimeZone, expect: &str| {
            assert_eq!(short_time(at(t), now, tz), expect, "{t}");
        };
        check("2026-11-23T13:02:59.123456789Z", &cet, "14:02"); // same day
        check("2026-11-22T23:10:00Z", &cet, "00:10"); // Sunday in UTC, Monday in CET
        check("2026-11-22T23:10:00Z", &utc, "Sun 22 Nov 23:10");
        check("2026-11-24T07:05:00Z", &cet, "Tue 24 Nov 08:05"); // tomorrow
        check("2026-11-23T23:30:00Z", &cet, "Tue 24 Nov 00:30"); // after local midnight
        check("2026-07-01T10:00:00Z", &cet, "Wed 1 Jul 12:00"); // summer time
        check("2025-11-23T09:05:00Z", &cet, "Sun 23 Nov 2025 10:05"); // other year
        assert_eq!(
            full_time(at("2026-07-01T10:00:00.5Z"), &cet),
            "2026-07-01 12:00:00 CEST"
        );
    }

    #[test]
    fn durations_read_short() {
        let start = at("2026-11-23T10:00:00Z");
        let check = |end: &str, expect: &str| {
            assert_eq!(short_duration(start, at(end)), expect, "{end}");
        };
        check("2026-11-23T10:00:00Z", "0s");
        check("2026-11-23T10:00:42.9Z", "42s");
        check("2026-11-23T10:01:00Z", "1m00s");
        check("2026-11-23T10:03:05Z", "3m05s");
        check("2026-11-23T11:02:00Z", "1h02m");
        check("2026-11-23T13:12:59Z", "3h12m");
        check("2026-11-24T09:59:59Z", "23h59m");
        check("2026-11-25T13:00:00Z", "2d03h");
        check("2026-11-23T09:00:00Z", "0s"); // end before start
    }

    fn worker(name: &str, state: PresenceState, reason: &str) -> WorkerInfo {
        WorkerInfo {
            name: name.to_owned(),
            state,
            reason: reason.to_owned(),
            source: Some(Source::Manual),
            since: Some(at("2026-11-23T10:18:00Z")),
            until: None,
            connected: true,
            max_builds: 2,
            running: Vec::new(),
            latent: None,
        }
    }

    fn build(id: BuildId, state: BuildState) -> BuildInfo {
        BuildInfo {
            id,
            builder: "hello".to_owned(),
            properties: BTreeMap::from([("secret".to_owned(), "hunter2".to_owned())]),
            state,
            worker: None,
            outcome: None,
            retries: 0,
            retry_reason: None,
            waiting_for: None,
            reason: None,
            submitted_at: at("2026-11-23T13:00:00Z"),
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
            estimate_secs: None,
            repository: None,
            branch: None,
            revision: None,
            trigger: None,
            collapsed_into: None,
            artifacts: Vec::new(),
        }
    }

    #[test]
    fn page_shows_workers_builds_and_the_pause_escaped() {
        let now = at("2026-11-23T13:30:00Z");
        let tz = TimeZone::UTC;
        let mut desk = worker("desk<1>", PresenceState::Away, "<script>alert(1)</script>");
        desk.until = Some(at("2026-11-23T19:00:00Z"));
        desk.running = vec![7];
        let mut cloud = worker("cloud", PresenceState::Offline, "no instance running");
        cloud.connected = false;
        cloud.source = Some(Source::Master);
        cloud.latent = Some(LatentInfo {
            state: "lingering".to_owned(),
            reason: "idle; stops at 13:40".to_owned(),
            since: at("2026-11-23T13:25:00Z"),
            retry_after: None,
            provider: "command".to_owned(),
        });
        let workers = WorkerList {
            paused: true,
            workers: vec![
                desk,
                cloud,
                worker("lab", PresenceState::Available, "night hours"),
            ],
        };
        let mut queued = build(9, BuildState::Queued);
        queued.waiting_for = Some("lock deploy".to_owned());
        queued.retries = 1;
        queued.retry_reason = Some("worker desk went away \"at once\"".to_owned());
        let mut running = build(7, BuildState::Running);
        running.worker = Some("desk<1>".to_owned());
        running.started_at = Some(at("2026-11-23T13:27:55Z"));
        let mut done = build(6, BuildState::Finished);
        done.outcome = Some(Outcome::Success);
        done.submitted_at = at("2026-11-22T07:59:00Z");
        done.started_at = Some(at("2026-11-22T08:00:00Z"));
        done.finished_at = Some(at("2026-11-22T08:01:05Z"));
        let mut cancelled = build(5, BuildState::Finished);
        cancelled.outcome = Some(Outcome::Cancelled);
        cancelled.reason = Some("cancelled by the admin".to_owned());
        let builds = vec![queued, running, done, cancelled];
        let counts = BuildCounts {
            queued: 1,
            running: 1,
        };

        let html = render(
            &page(workers),
            &builds,
            &[],
            counts,
            &Viewer::default(),
            now,
            &tz,
        );

        // Escaped, never raw.
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("desk&lt;1&gt;"));
        assert!(html.contains("title=\"worker desk went away &quot;at once&quot;\""));
        // Header, summary and the paused banner.
        assert!(html.contains("<title>nightshift master (paused)</title>"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
        assert!(html.contains("refreshes every 10 s"));
        let text = strip_tags(&html);
        assert!(
            text.contains(
                "3 workers: 1 available, 0 reluctant, 1 away, 1 offline; 1 queued, 1 running"
            ),
            "{text}"
        );
        assert!(text.contains(
            "Paused: no new builds are handed out; running builds go on. master resume to resume."
        ));
        // Workers: pills, times, durations, latent instance.
        assert!(html.contains("<span class=\"pill away\">away</span>"));
        assert!(text.contains("10:18for 3h12m"), "{text}");
        assert!(text.contains("19:00in 5h30m"), "{text}");
        assert!(text.contains("#71 of 2 slots"), "{text}");
        assert!(html.contains("<span class=\"inst lingering\">lingering</span>"));
        assert!(text.contains("idle; stops at 13:40"));
        assert!(
            text.contains("provider command · since 13:25 (for 5m00s)"),
            "{text}"
        );
        assert!(text.contains("not connected"));
        // Builds: states, outcomes, waits, durations; no properties.
        assert!(text.contains("waiting for lock deploy"));
        assert!(text.contains("2m05s so far"), "{text}");
        assert!(text.contains("took 1m05s"), "{text}");
        assert!(text.contains("Sun 22 Nov 07:59"), "{text}");
        assert!(html.contains("<span class=\"pill cancelled\">cancelled</span>"));
        assert!(html.contains("<span class=\"outcome success\">success</span>"));
        assert!(text.contains("cancelled by the admin"));
        assert!(!html.contains("hunter2"), "build properties must not show");
    }

    #[test]
    fn a_session_gets_forms_with_its_csrf_token_and_nobody_else_does() {
        let now = at("2026-11-23T13:30:00Z");
        let mut workers = WorkerList {
            paused: false,
            workers: Vec::new(),
        };
        let mut done = build(6, BuildState::Finished);
        done.outcome = Some(Outcome::Success);
        let builds = vec![build(7, BuildState::Queued), done];
        let session = Viewer {
            authenticated: true,
            csrf: Some("c5rf".to_owned()),
        };
        let html = render(
            &page(workers.clone()),
            &builds,
            &[],
            BuildCounts::default(),
            &session,
            now,
            &TimeZone::UTC,
        );
        assert!(html.contains("action=\"/farm/pause\""), "{html}");
        assert!(html.contains("action=\"/builds/7/cancel\""), "{html}");
        assert!(html.contains("action=\"/builds/6/rebuild\""), "{html}");
        assert!(!html.contains("/builds/6/cancel"), "{html}");
        assert!(html.contains("action=\"/logout\""), "{html}");
        assert_eq!(
            html.matches("name=\"csrf\" value=\"c5rf\"").count(),
            html.matches("<form").count(),
            "every form carries the token"
        );
        workers.paused = true;
        let paused = render(
            &page(workers.clone()),
            &builds,
            &[],
            BuildCounts::default(),
            &session,
            now,
            &TimeZone::UTC,
        );
        assert!(paused.contains("action=\"/farm/resume\""), "{paused}");
        assert!(!paused.contains("/farm/pause"), "{paused}");

        let anonymous = render(
            &page(workers.clone()),
            &builds,
            &[],
            BuildCounts::default(),
            &Viewer::default(),
            now,
            &TimeZone::UTC,
        );
        assert!(!anonymous.contains("<form"), "{anonymous}");
        assert!(anonymous.contains("href=\"/login?next=/\""), "{anonymous}");
    }

    #[test]
    fn an_unpaused_empty_farm_says_what_to_do() {
        let now = at("2026-11-23T13:30:00Z");
        let workers = WorkerList {
            paused: false,
            workers: Vec::new(),
        };
        let html = render(
            &page(workers),
            &[],
            &[],
            BuildCounts::default(),
            &Viewer::default(),
            now,
            &TimeZone::UTC,
        );
        let text = strip_tags(&html);
        assert!(!text.contains("Paused"), "{text}");
        assert!(text.contains("0 workers: 0 available"), "{text}");
        assert!(text.contains("No workers: add [[worker]] entries"));
        assert!(text.contains("No builds yet: queue one with master submit BUILDER."));
    }

    #[test]
    fn waits_read_as_phrases() {
        let check = |waiting: &str, expect: &str| assert_eq!(wait_phrase(waiting), expect);
        check("lock deploy (on b1)", "waiting for lock deploy (on b1)");
        check(
            "a worker: b1 away, b2 offline",
            "waiting for a worker: b1 away, b2 offline",
        );
        check(
            "latent worker cloud to start",
            "waiting for latent worker cloud to start",
        );
        check("master is paused", "held: the master is paused");
        check(
            "builder `app` is not in master.toml",
            "builder `app` is not in master.toml",
        );
    }

    #[test]
    fn waits_come_from_the_live_view_and_finished_builds_wait_for_nothing() {
        let mut queued_stored = build(1, BuildState::Queued);
        queued_stored.waiting_for = Some("no available worker".to_owned());
        let mut running_stale = build(2, BuildState::Running);
        running_stale.waiting_for = Some("stale word".to_owned());
        let running_lock = build(3, BuildState::Running);
        let mut finished = build(4, BuildState::Finished);
        finished.waiting_for = Some("stale word".to_owned());
        let live = BTreeMap::from([(3, "lock deploy".to_owned())]);
        let estimates = BTreeMap::from([("hello".to_owned(), SignedDuration::from_secs(300))]);
        let builds = with_live_waits(
            vec![queued_stored, running_stale, running_lock, finished],
            &live,
            &estimates,
        );
        let waits: Vec<Option<&str>> = builds.iter().map(|b| b.waiting_for.as_deref()).collect();
        assert_eq!(
            waits,
            vec![Some("no available worker"), None, Some("lock deploy"), None]
        );
        // The estimate goes with unfinished builds only.
        let estimates: Vec<Option<u64>> = builds.iter().map(|b| b.estimate_secs).collect();
        assert_eq!(estimates, vec![Some(300), Some(300), Some(300), None]);
    }

    #[test]
    fn estimates_read_in_minutes_rounded_up() {
        for (secs, words) in [
            (0, "1 s"),
            (42, "42 s"),
            (60, "1 min"),
            (61, "2 min"),
            (300, "5 min"),
            (3600, "1 h"),
            (4800, "1 h 20 min"),
            (4801, "1 h 21 min"),
        ] {
            assert_eq!(estimate_words(secs), words, "{secs} s");
        }
    }

    #[test]
    fn builders_and_unfinished_builds_show_the_estimate() {
        let now = at("2026-11-23T13:30:00Z");
        let workers = WorkerList {
            paused: false,
            workers: vec![worker("lab", PresenceState::Available, "night hours")],
        };
        let builders = vec![
            BuilderRow {
                name: "app<x>".to_owned(),
                workers: 3,
                admission: Admission::Fit,
                estimate: Some(SignedDuration::from_secs(4800)),
            },
            BuilderRow {
                name: "docs".to_owned(),
                workers: 1,
                admission: Admission::BestEffort,
                estimate: None,
            },
        ];
        let mut queued = build(9, BuildState::Queued);
        queued.estimate_secs = Some(300);
        let mut running = build(7, BuildState::Running);
        running.started_at = Some(at("2026-11-23T13:28:00Z"));
        running.estimate_secs = Some(300);
        let html = render(
            &page(workers),
            &[queued, running],
            &builders,
            BuildCounts::default(),
            &Viewer::default(),
            now,
            &TimeZone::UTC,
        );
        let text = strip_tags(&html);
        assert!(html.contains("app&lt;x&gt;"), "{html}");
        assert!(
            text.contains("app<x>31 h 20 minfit: waits for a window that fits"),
            "{text}"
        );
        assert!(
            text.contains("docs1unknown until 3 successful buildsbest-effort"),
            "{text}"
        );
        assert!(text.contains("queued 30m00s; estimated 5 min"), "{text}");
        assert!(
            text.contains("2m00s so far of an estimated 5 min"),
            "{text}"
        );
    }

    /// The page's text without tags, entities decoded for the few used here.
    fn strip_tags(html: &str) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&")
    }
}
