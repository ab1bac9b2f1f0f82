//! The local status page `/` (server-rendered HTML, no external assets) and
//! its live feed `/events` (server-sent events pushed from the daemon's
//! `watch` channel: each event carries the freshly rendered live section).

use std::convert::Infallible;
use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::Stream;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{PresenceState, Source};
use nightshift_proto::html::escape;

use super::state::{PreviewInterval, Shared};
use super::when::{short_time, span_words};
use crate::daemon::priority::{BuildIsolation, CpuPriority, IoPriority};
use crate::handle::{AgentStatus, SupervisedState, SupervisedStatus};

const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// How many days the timeline shows, today included.
const TIMELINE_DAYS: i64 = 7;

/// `GET /`: the whole page.
pub async fn index(State(shared): State<Shared>) -> Response {
    let status = shared.handle.status.borrow().clone();
    let now = (shared.clock)();
    let preview = preview_window(&shared, now);
    let html = render_page(
        &status,
        now,
        &shared.time_zone,
        preview.as_deref(),
        shared.secrets.csrf(),
    );
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html),
    )
        .into_response()
}

/// The shortest gap between two live events on one connection: a chatty
/// build updates the status many times a second; the watch channel keeps
/// only the latest, so a burst becomes one event per gap.
const MIN_EVENT_GAP: Duration = Duration::from_millis(250);

/// `GET /events`: one `status` event now and one after every change.
pub async fn events(
    State(shared): State<Shared>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut receiver = shared.handle.status.clone();
    receiver.mark_changed();
    let start = (shared, receiver, None::<tokio::time::Instant>);
    let stream = futures_util::stream::unfold(start, |(shared, mut receiver, last)| async move {
        if let Some(last) = last {
            tokio::select! {
                () = shared.shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(last + MIN_EVENT_GAP) => {}
            }
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => None,
            changed = receiver.changed() => {
                // The daemon dropped its sender: it is gone, end the stream
                // (the browser reconnects and sees the next agent).
                changed.ok()?;
                let status = receiver.borrow_and_update().clone();
                let now = (shared.clock)();
                let preview = preview_window(&shared, now);
                let parts = render_live(&status, now, &shared.time_zone, preview.as_deref());
                let event = match Event::default().event("status").json_data(&parts) {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(%error, "cannot encode a live update");
                        Event::default().comment("encoding error")
                    }
                };
                Some((Ok(event), (shared, receiver, Some(tokio::time::Instant::now()))))
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn preview_window(shared: &Shared, now: Timestamp) -> Option<Vec<PreviewInterval>> {
    let preview = shared.preview.as_ref()?;
    let (start, end) = timeline_bounds(now, &shared.time_zone);
    Some(preview(start, end))
}

/// The timeline runs from the start of today to the end of the sixth day after.
fn timeline_bounds(now: Timestamp, tz: &TimeZone) -> (Timestamp, Timestamp) {
    let today = now.to_zoned(tz.clone()).date();
    let start = day_start(today, tz).unwrap_or(now);
    let end = today
        .checked_add(jiff::Span::new().days(TIMELINE_DAYS))
        .ok()
        .and_then(|date| day_start(date, tz))
        .unwrap_or_else(|| {
            now.checked_add(SignedDuration::from_hours(24 * TIMELINE_DAYS))
                .unwrap_or(now)
        });
    (start, end)
}

fn day_start(date: jiff::civil::Date, tz: &TimeZone) -> Option<Timestamp> {
    date.to_zoned(tz.clone())
        .ok()
        .and_then(|zoned| zoned.start_of_day().ok())
        .map(|zoned| zoned.timestamp())
}

/// The whole page.
pub fn render_page(
    status: &AgentStatus,
    now: Timestamp,
    tz: &TimeZone,
    preview: Option<&[PreviewInterval]>,
    csrf: &str,
) -> String {
    let state = status.presence.state;
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="nightshift-csrf" content="{csrf}">
<title>{title}</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Ccircle cx='8' cy='8' r='7' fill='%234a6fa5'/%3E%3C/svg%3E">
<style>{STYLE}</style>
</head>
<body data-state="{state}">
<div class="wrap">
<header class="top">
  <span class="brand">nightshift</span>
  <span class="worker">worker <b>{worker}</b></span>
  <span id="feed" class="feed lost" title="This page updates by itself">○ connecting…</span>
</header>
<div id="live-hero">
"#,
        csrf = escape(csrf),
        title = escape(&page_title(status)),
        worker = escape(&status.worker),
    );
    let live = render_live(status, now, tz, preview);
    html.push_str(&live.hero);
    let _ = write!(
        html,
        r#"</div>
<section class="card controls" aria-labelledby="controls-title">
  <h2 id="controls-title">Change it</h2>
  <p class="hint">Your choice wins over the schedules until you go back to automatic.</p>
  <label class="reason-input">Why? <span class="optional">(optional, shown to the build farm's admin)</span>
    <input id="reason" type="text" maxlength="200" placeholder="e.g. gaming tonight" autocomplete="off">
  </label>
  <div class="row">
    <button type="button" class="choice available" data-action="set" data-state="available">Available</button>
    <button type="button" class="choice reluctant" data-action="set" data-state="reluctant">Reluctant</button>
  </div>
  <div class="row away-row">
    <span class="row-label">Away</span>
    <button type="button" class="choice away" data-action="set" data-state="away" data-for="1h">for 1 hour</button>
    <button type="button" class="choice away" data-action="set" data-state="away" data-for="4h">for 4 hours</button>
    <button type="button" class="choice away" data-action="set" data-state="away" data-until="tomorrow">until tomorrow</button>
    <button type="button" class="choice away" data-action="set" data-state="away">until I switch back</button>
  </div>
  <div class="row">
    <button type="button" class="choice auto" data-action="set" data-state="auto">Back to automatic</button>
    <button type="button" class="choice stop" data-action="stop">Stop the agent</button>
  </div>
  <p id="message" class="message" role="status" aria-live="polite"></p>
</section>
<div id="live-details">
{details}</div>
<footer class="foot">nightshift agent {version} · <a href="/metrics">metrics</a> · <a href="/api/v1/status">status as JSON</a></footer>
</div>
<script>{SCRIPT}</script>
</body>
</html>
"#,
        version = escape(&status.agent_version),
        details = live.details,
    );
    html
}

fn page_title(status: &AgentStatus) -> String {
    format!(
        "{} · {} — nightshift",
        status.worker,
        state_word(status.presence.state)
    )
}

/// What one live event carries: the two parts of the page it replaces.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LiveParts {
    /// The state in big words (`#hero`).
    pub hero: String,
    /// Builds, master link and the week ahead (`#details`).
    pub details: String,
}

/// Renders both live parts.
pub fn render_live(
    status: &AgentStatus,
    now: Timestamp,
    tz: &TimeZone,
    preview: Option<&[PreviewInterval]>,
) -> LiveParts {
    LiveParts {
        hero: render_hero(status, now, tz),
        details: render_details(status, now, tz, preview),
    }
}

/// The state, its reason, source, since and until.
pub fn render_hero(status: &AgentStatus, now: Timestamp, tz: &TimeZone) -> String {
    let presence = &status.presence;
    let state = presence.state;
    let mut html = String::with_capacity(8 * 1024);

    // The state, big.
    let mut when = String::new();
    if let Some(until) = presence.until {
        let _ = write!(
            when,
            "until {} <span class=\"soft\">(in {})</span>",
            escape(&short_time(until, now, tz)),
            span_words(until.duration_since(now))
        );
    } else {
        when.push_str("until something changes");
    }
    let _ = write!(
        html,
        r#"<section id="hero" class="hero" data-state="{state}" data-manual="{manual}" data-manual-ends="{manual_ends}" data-title="{title}">
  <p class="lead">This computer is</p>
  <h1 id="state-word">{word}</h1>
  <p class="meaning">{meaning}</p>
  <p class="when">{when} — {source}</p>
  <p class="reason">{reason}<span class="soft">since {since} ({ago} ago)</span></p>
"#,
        title = escape(&page_title(status)),
        manual = status
            .manual
            .as_ref()
            .map_or("auto", |manual| manual.state.as_str()),
        manual_ends = status
            .manual
            .as_ref()
            .is_some_and(|manual| manual.until.is_some()),
        word = state_word(state),
        meaning = state_meaning(state),
        source = escape(&source_words(&presence.source)),
        reason = reason_words(status),
        since = escape(&short_time(presence.since, now, tz)),
        ago = span_words(now.duration_since(presence.since)),
    );
    // Window-aware admission: what the master may still start here.
    if let Some(outlook) = &status.outlook
        && state.takes_builds()
        && !status.stopping
    {
        match crate::outlook::longest_fit(outlook, true, now) {
            Some(fit) => {
                let _ = writeln!(
                    html,
                    "  <p class=\"fits\">The longest build that still fits: <b>{}</b> <span class=\"soft\">(ends {}{})</span></p>",
                    span_words(fit),
                    escape(&outlook.takes_builds_until.map_or_else(String::new, |t| short_time(t, now, tz))),
                    if outlook.overrun_secs > 0 {
                        format!(", with {} overrun", span_words(SignedDuration::from_secs(i64::try_from(outlook.overrun_secs).unwrap_or(i64::MAX))))
                    } else {
                        String::new()
                    }
                );
            }
            None => html.push_str(
                "  <p class=\"fits\">Builds of any length fit: nothing known ends the availability.</p>\n",
            ),
        }
    }
    if status.stopping {
        html.push_str(
            "  <p class=\"banner\">Stopping: the agent takes no new builds and exits when its current build ends.</p>\n",
        );
    } else if let Some(manual) = &status.manual {
        let until = match manual.until {
            Some(until) => format!(" until {}", escape(&short_time(until, now, tz))),
            None => String::new(),
        };
        let _ = writeln!(
            html,
            "  <p class=\"banner\">You chose <b>{}</b>{until}. “Back to automatic” hands the decision back to the schedules.</p>",
            state_word(manual.state).to_lowercase(),
        );
    }
    html.push_str("</section>\n");
    html
}

/// Builds, the master link and the week ahead.
pub fn render_details(
    status: &AgentStatus,
    now: Timestamp,
    tz: &TimeZone,
    preview: Option<&[PreviewInterval]>,
) -> String {
    let mut html = String::with_capacity(8 * 1024);
    if let Some(supervised) = &status.supervised {
        // A supervising worker has no builds or master of its own: its CI
        // agent takes the place of both.
        html.push_str(&render_supervised(supervised, now, tz));
        if let Some(preview) = preview {
            html.push_str(&render_timeline(status, preview, now, tz));
        }
        return html;
    }
    // Builds.
    html.push_str("<section class=\"card\" id=\"builds\">\n  <h2>Builds</h2>\n");
    if status.builds.is_empty() {
        html.push_str("  <p class=\"empty\">Nothing is building right now.</p>\n");
    } else {
        for build in &status.builds {
            let elapsed = now.duration_since(build.started_at);
            let _ = write!(
                html,
                r#"  <article class="build">
    <div class="build-head"><b>{builder}</b> <span class="soft">build #{id}</span>
      <span class="build-step">step {step}: {step_name}</span>
      <span class="elapsed" data-started="{started}">{elapsed}</span></div>
    <pre class="tail">{tail}</pre>
  </article>
"#,
                builder = escape(&build.builder),
                id = build.build_id,
                step = build.step + 1,
                step_name = escape(&build.step_name),
                started = build.started_at,
                elapsed = span_words(elapsed),
                tail = escape(&tail_lines(&build.tail, 12)),
            );
        }
    }
    let totals = match (status.counters.builds_run, status.counters.builds_failed) {
        (0, _) => "No build has finished since the agent started.".to_owned(),
        (run, 0) => format!(
            "{} finished since the agent started, none failed.",
            plural(run, "build", "builds")
        ),
        (run, failed) => format!(
            "{} finished since the agent started, {failed} of them failed.",
            plural(run, "build", "builds")
        ),
    };
    let _ = writeln!(html, "  <p class=\"soft small\">{totals}</p>\n</section>");
    if let Some(isolation) = &status.isolation {
        html.push_str(&render_isolation(isolation));
    }

    // The master link.
    let master = &status.master;
    let link = if master.url.is_empty() {
        "no master configured".to_owned()
    } else {
        format!("<code>{}</code>", escape(&master.url))
    };
    let since = master
        .since
        .map(|since| format!(" since {}", escape(&short_time(since, now, tz))))
        .unwrap_or_default();
    if master.connected {
        let _ = writeln!(
            html,
            "<section class=\"card\" id=\"master\">\n  <h2>Build master</h2>\n  <p><span class=\"dot ok\"></span>Connected to {link}{since}.</p>\n</section>"
        );
    } else {
        let error = master
            .error
            .as_deref()
            .map(|error| format!("<br><span class=\"soft\">{}</span>", escape(error)))
            .unwrap_or_default();
        let _ = writeln!(
            html,
            "<section class=\"card\" id=\"master\">\n  <h2>Build master</h2>\n  <p><span class=\"dot bad\"></span>Not connected to {link}{since}; the agent keeps trying.{error}</p>\n</section>"
        );
    }

    // The week ahead.
    if let Some(preview) = preview {
        html.push_str(&render_timeline(status, preview, now, tz));
    }
    html
}

/// How builds yield to the owner: priorities, cgroup limits, accounting.
fn render_isolation(isolation: &BuildIsolation) -> String {
    let cpu = match isolation.cpu_priority {
        CpuPriority::Idle => "idle (runs only when your programs leave a CPU free)",
        CpuPriority::Low => "low (nice 19)",
        CpuPriority::Normal => "normal (as the agent)",
    };
    let io = match isolation.io_priority {
        IoPriority::Idle => "idle (disk only when nobody else uses it)",
        IoPriority::Low => "low (best effort, lowest level)",
        IoPriority::Normal => "normal (as the agent)",
    };
    let applied = |on: bool| if on { "" } else { " (not applied)" };
    let memory = match isolation.memory_high_bytes {
        Some(bytes) => format!(
            "{:.1} GiB{}",
            bytes as f64 / (1u64 << 30) as f64,
            applied(isolation.memory_high_applied)
        ),
        None => "none".to_owned(),
    };
    let accounting = match &isolation.cgroup_parent {
        Some(parent) => format!("one cgroup per build under <code>{}</code>", escape(parent)),
        None => {
            "by process tree (every process a build started, in any group or session)".to_owned()
        }
    };
    let mut html = format!(
        "<section class=\"card\" id=\"isolation\">\n  <h2>How builds yield to you</h2>\n  <dl class=\"facts\">\n    <dt>CPU priority</dt><dd>{cpu}</dd>\n    <dt>Disk priority</dt><dd>{io}</dd>\n    <dt>CPU weight</dt><dd>{weight}{weight_applied}</dd>\n    <dt>Memory ceiling</dt><dd>{memory}</dd>\n    <dt>Accounting</dt><dd>{accounting}; builds never count as your load</dd>\n  </dl>\n",
        weight = isolation.cpu_weight,
        weight_applied = applied(isolation.cpu_weight_applied),
    );
    for note in &isolation.notes {
        let _ = writeln!(html, "  <p class=\"soft small\">{}</p>", escape(note));
    }
    html.push_str("</section>\n");
    html
}

/// The supervised CI agent: what runs, since when, draining, its last exit.
fn render_supervised(supervised: &SupervisedStatus, now: Timestamp, tz: &TimeZone) -> String {
    let when = |at: Timestamp| escape(&short_time(at, now, tz));
    let (dot, headline) = match supervised.state {
        SupervisedState::Running => (
            "ok",
            format!(
                "Running (pid {}) since {}{}.",
                supervised.pid.unwrap_or(0),
                when(supervised.since),
                match supervised.job_running {
                    Some(true) => ", running a job",
                    Some(false) => ", idle",
                    None => "",
                }
            ),
        ),
        SupervisedState::Draining => (
            "warn",
            format!(
                "Draining (pid {}): asked at {} to finish its job and exit{}{}.",
                supervised.pid.unwrap_or(0),
                when(supervised.draining_since.unwrap_or(supervised.since)),
                match supervised.job_running {
                    Some(true) => "; a job is still running",
                    _ => "",
                },
                supervised
                    .hard_stop_at
                    .map(|at| format!("; stopped hard at {} if still running", when(at)))
                    .unwrap_or_default()
            ),
        ),
        SupervisedState::Restarting => (
            "bad",
            format!(
                "Exited; starting again{}.",
                supervised
                    .restart_at
                    .map(|at| format!(" at {}", when(at)))
                    .unwrap_or_default()
            ),
        ),
        SupervisedState::Stopped => ("bad", format!("Stopped since {}.", when(supervised.since))),
    };
    let mut html = format!(
        "<section class=\"card\" id=\"supervised\">\n  <h2>CI agent ({kind})</h2>\n  <p><span class=\"dot {dot}\"></span>{headline}</p>\n  <p class=\"soft small\"><code>{command}</code> — {wanted}: {why}</p>\n",
        kind = escape(&supervised.kind),
        command = escape(&supervised.command),
        wanted = if supervised.wanted {
            "wanted running"
        } else {
            "wanted stopped"
        },
        why = escape(&supervised.why),
    );
    if let Some(exit) = &supervised.last_exit {
        let _ = writeln!(
            html,
            "  <p class=\"soft small\">Last exit {} ({}){}: {}</p>",
            when(exit.at),
            escape(&exit.status),
            if exit.stopped_hard {
                ", stopped hard"
            } else {
                ""
            },
            escape(&exit.reason)
        );
    }
    if supervised.restarts > 0 {
        let _ = writeln!(
            html,
            "  <p class=\"soft small\">Restarted {} after exiting by itself.</p>",
            plural(supervised.restarts, "time", "times")
        );
    }
    html.push_str("</section>\n");
    html
}

/// The week ahead: one bar per day, coloured by state, with the owner's
/// manual choice laid over the policies.
fn render_timeline(
    status: &AgentStatus,
    preview: &[PreviewInterval],
    now: Timestamp,
    tz: &TimeZone,
) -> String {
    let (start, end) = timeline_bounds(now, tz);
    let mut intervals = preview.to_vec();
    if let Some(manual) = &status.manual {
        let until = manual.until.unwrap_or(end).min(end);
        if until > now {
            intervals = overlay(
                intervals,
                PreviewInterval {
                    from: now,
                    to: until,
                    state: manual.state,
                    source: Source::Manual,
                },
            );
        }
    }
    let mut html = String::from(
        "<section class=\"card\" id=\"week\">\n  <h2>The week ahead</h2>\n  <div class=\"timeline\">\n    <div class=\"day hours\"><span class=\"day-name\"></span><div class=\"ticks\"><span style=\"left:0%\">0:00</span><span style=\"left:25%\">6:00</span><span style=\"left:50%\">12:00</span><span style=\"left:75%\">18:00</span></div></div>\n",
    );
    let today = now.to_zoned(tz.clone()).date();
    for offset in 0..TIMELINE_DAYS {
        let Ok(date) = today.checked_add(jiff::Span::new().days(offset)) else {
            break;
        };
        let (Some(day_from), Some(day_to)) = (
            day_start(date, tz),
            date.tomorrow().ok().and_then(|next| day_start(next, tz)),
        ) else {
            continue;
        };
        let length = day_to.duration_since(day_from).as_secs_f64();
        if length <= 0.0 {
            continue;
        }
        let name = match offset {
            0 => "Today".to_owned(),
            1 => "Tomorrow".to_owned(),
            _ => date.strftime("%a %-d").to_string(),
        };
        let _ = write!(
            html,
            "    <div class=\"day\"><span class=\"day-name\">{name}</span><div class=\"bar\">"
        );
        for interval in &intervals {
            let from = interval.from.max(day_from).max(start);
            let to = interval.to.min(day_to).min(end);
            if from >= to {
                continue;
            }
            let left = from.duration_since(day_from).as_secs_f64() / length * 100.0;
            let width = to.duration_since(from).as_secs_f64() / length * 100.0;
            let title = format!(
                "{} {}–{} · {}",
                state_word(interval.state),
                from.to_zoned(tz.clone()).strftime("%H:%M"),
                if to == day_to {
                    "24:00".to_owned()
                } else {
                    to.to_zoned(tz.clone()).strftime("%H:%M").to_string()
                },
                source_words(&interval.source)
            );
            let _ = write!(
                html,
                "<span class=\"seg {state}\" style=\"left:{left:.3}%;width:{width:.3}%\" title=\"{title}\"></span>",
                state = interval.state,
                title = escape(&title),
            );
        }
        if offset == 0 {
            let left = now.duration_since(day_from).as_secs_f64() / length * 100.0;
            let _ = write!(
                html,
                "<span class=\"now\" style=\"left:{left:.3}%\" title=\"now\"></span>"
            );
        }
        html.push_str("</div></div>\n");
    }
    html.push_str(
        "  </div>\n  <p class=\"legend\"><span class=\"key available\"></span>available <span class=\"key reluctant\"></span>reluctant <span class=\"key away\"></span>away</p>\n</section>\n",
    );
    html
}

/// Lays `patch` over `base`: the parts of `base` it covers are cut out.
fn overlay(base: Vec<PreviewInterval>, patch: PreviewInterval) -> Vec<PreviewInterval> {
    let mut out = Vec::with_capacity(base.len() + 2);
    for interval in base {
        if interval.to <= patch.from || interval.from >= patch.to {
            out.push(interval);
            continue;
        }
        if interval.from < patch.from {
            out.push(PreviewInterval {
                to: patch.from,
                ..interval.clone()
            });
        }
        if interval.to > patch.to {
            out.push(PreviewInterval {
                from: patch.to,
                ..interval
            });
        }
    }
    out.push(patch);
    out.sort_by_key(|interval| interval.from);
    out
}

/// The reason line's text before "since": the owner's own words for a
/// manual state (the source already says "set by you"), else the reason.
fn reason_words(status: &AgentStatus) -> String {
    let reason = match (&status.presence.source, &status.manual) {
        (Source::Manual, Some(manual)) => {
            manual.reason.as_ref().map(|reason| format!("“{reason}”"))
        }
        (Source::Manual, None) => None,
        _ => Some(status.presence.reason.clone()),
    };
    match reason {
        Some(reason) if !reason.trim().is_empty() => format!("{} · ", escape(&reason)),
        _ => String::new(),
    }
}

/// The state in one capitalised word.
pub fn state_word(state: PresenceState) -> &'static str {
    match state {
        PresenceState::Available => "Available",
        PresenceState::Reluctant => "Reluctant",
        PresenceState::Away => "Away",
        PresenceState::Offline => "Offline",
    }
}

/// What the state means, for someone who never read the docs.
pub fn state_meaning(state: PresenceState) -> &'static str {
    match state {
        PresenceState::Available => "Happy to take builds.",
        PresenceState::Reluctant => "Takes a build only when no other computer can.",
        PresenceState::Away => "Takes no new builds. A build already running may finish.",
        PresenceState::Offline => "Not taking any builds.",
    }
}

/// Who decided, in words.
pub fn source_words(source: &Source) -> String {
    match source {
        Source::Schedule(name) => format!("schedule “{name}”"),
        Source::Load => "the computer is busy".into(),
        Source::Manual => "set by you".into(),
        Source::Stopping => "the agent is stopping".into(),
        Source::Master => "the build master".into(),
        Source::Default => "the default setting".into(),
    }
}

fn plural(count: u64, one: &str, many: &str) -> String {
    if count == 1 {
        format!("1 {one}")
    } else {
        format!("{count} {many}")
    }
}

/// The last `max` lines of `text`, with carriage returns read as line ends.
fn tail_lines(text: &str, max: usize) -> String {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::metrics::tests::status_fixture;
    use crate::handle::ManualRequest;

    fn tz() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    #[test]
    fn escapes_what_could_break_out() {
        assert_eq!(
            escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("a\rb\u{1b}[31m"), "a\nb[31m");
    }

    #[test]
    fn a_supervising_worker_shows_its_ci_agent_instead_of_builds_and_master() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let mut status = status_fixture(now);
        status.builds.clear();
        status.supervised = Some(SupervisedStatus {
            kind: "gitlab-runner".into(),
            command: "gitlab-runner run <&>".into(),
            state: SupervisedState::Draining,
            since: now,
            pid: Some(77),
            wanted: false,
            why: "away (manual): lunch".into(),
            job_running: Some(true),
            draining_since: Some(now),
            hard_stop_at: Some("2026-11-23T12:00:00Z".parse().unwrap()),
            restart_at: None,
            restarts: 2,
            last_exit: Some(crate::handle::SupervisedExit {
                at: now,
                status: "exit 0".into(),
                requested: true,
                stopped_hard: false,
                reason: "finished after SIGQUIT and ended with exit 0".into(),
            }),
        });
        let html = render_page(&status, now, &tz(), None, "abc123");
        assert!(html.contains("CI agent (gitlab-runner)"), "{html}");
        assert!(html.contains("Draining (pid 77)"), "{html}");
        assert!(html.contains("a job is still running"), "{html}");
        assert!(
            html.contains("stopped hard at 13:00 if still running"),
            "{html}"
        );
        assert!(html.contains("gitlab-runner run &lt;&amp;&gt;"), "{html}");
        assert!(html.contains("Restarted 2 times"), "{html}");
        assert!(!html.contains("Build master"), "{html}");
        assert!(!html.contains("id=\"builds\""), "{html}");
    }

    #[test]
    fn page_shows_state_reason_builds_and_master() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let mut status = status_fixture(now);
        status.worker = "<lab>".into();
        status.presence.until = Some("2026-11-23T18:00:00Z".parse().unwrap());
        status.builds[0].tail = "one\r\ntwo\n</pre><script>alert(1)</script>".into();
        let html = render_page(&status, now, &tz(), None, "abc123");
        assert!(html.contains("<h1 id=\"state-word\">Away</h1>"));
        assert!(html.contains("until 19:00"), "{html}");
        assert!(
            !html.contains("class=\"fits\""),
            "away: nothing fits: {html}"
        );
        assert!(html.contains("schedule “nights”"));
        assert!(html.contains("&lt;lab&gt;"));
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("content=\"abc123\""));
        assert!(html.contains("wss://master.example:9443"));
        assert!(html.contains("data-started=\"2026-11-23T10:58:30Z\""));
        assert!(!html.contains("id=\"week\""));
        // How builds yield: priorities, what is not applied and why.
        assert!(html.contains("How builds yield to you"), "{html}");
        assert!(html.contains("<dt>CPU priority</dt><dd>idle"), "{html}");
        assert!(html.contains("<dd>1 (not applied)</dd>"), "{html}");
        assert!(html.contains("3.0 GiB (not applied)"), "{html}");
        assert!(html.contains("builds have &lt;no&gt; cgroup"), "{html}");
    }

    #[test]
    fn timeline_overlays_the_manual_choice() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let mut status = status_fixture(now);
        status.manual = Some(ManualRequest {
            state: PresenceState::Away,
            until: Some("2026-11-23T13:00:00Z".parse().unwrap()),
            reason: None,
        });
        let preview = vec![PreviewInterval {
            from: "2026-11-23T00:00:00Z".parse().unwrap(),
            to: "2026-11-30T00:00:00Z".parse().unwrap(),
            state: PresenceState::Available,
            source: Source::Default,
        }];
        let live = render_live(&status, now, &tz(), Some(&preview));
        let html = format!("{}{}", live.hero, live.details);
        assert!(html.contains("id=\"week\""));
        assert_eq!(html.matches("class=\"day\"").count(), 7);
        // 12:00–14:00 Berlin is manual away.
        assert!(html.contains("Away 12:00–14:00 · set by you"), "{html}");
        assert!(html.contains("Available 14:00–24:00"), "{html}");
        assert!(html.contains("You chose <b>away</b> until 14:00"));
    }

    #[test]
    fn the_hero_shows_the_longest_build_that_still_fits() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let mut status = status_fixture(now);
        status.presence.state = PresenceState::Available;
        status.outlook = Some(nightshift_proto::wire::Outlook {
            takes_builds_until: Some("2026-11-23T12:10:00Z".parse().unwrap()),
            reluctant_from: None,
            next_window: None,
            overrun_secs: 900,
        });
        let hero = render_hero(&status, now, &tz());
        assert!(
            hero.contains("The longest build that still fits: <b>1 h 25 min</b> <span class=\"soft\">(ends 13:10, with 15 min overrun)</span>"),
            "{hero}"
        );
        status.outlook = Some(nightshift_proto::wire::Outlook::default());
        let hero = render_hero(&status, now, &tz());
        assert!(hero.contains("Builds of any length fit"), "{hero}");
    }

    #[test]
    fn a_manual_state_shows_the_owners_words() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let mut status = status_fixture(now);
        status.presence.source = Source::Manual;
        status.presence.reason = "set by hand: <lunch>".into();
        status.manual = Some(ManualRequest {
            state: PresenceState::Away,
            until: None,
            reason: Some("<lunch>".into()),
        });
        let hero = render_hero(&status, now, &tz());
        assert!(
            hero.contains("until something changes — set by you"),
            "{hero}"
        );
        assert!(
            hero.contains("<p class=\"reason\">“&lt;lunch&gt;” · <span"),
            "{hero}"
        );
        status.manual.as_mut().unwrap().reason = None;
        let hero = render_hero(&status, now, &tz());
        assert!(
            hero.contains("<p class=\"reason\"><span class=\"soft\">since 12:00"),
            "{hero}"
        );
    }

    #[test]
    fn overlay_cuts_and_keeps_order() {
        let t = |h: i64| Timestamp::UNIX_EPOCH + SignedDuration::from_hours(h);
        let base = vec![
            PreviewInterval {
                from: t(0),
                to: t(5),
                state: PresenceState::Available,
                source: Source::Default,
            },
            PreviewInterval {
                from: t(5),
                to: t(10),
                state: PresenceState::Away,
                source: Source::Load,
            },
        ];
        let patch = PreviewInterval {
            from: t(3),
            to: t(7),
            state: PresenceState::Reluctant,
            source: Source::Manual,
        };
        let out = overlay(base, patch);
        let spans: Vec<_> = out.iter().map(|i| (i.from, i.to, i.state)).collect();
        assert_eq!(
            spans,
            vec![
                (t(0), t(3), PresenceState::Available),
                (t(3), t(7), PresenceState::Reluctant),
                (t(7), t(10), PresenceState::Away),
            ]
        );
    }
}
