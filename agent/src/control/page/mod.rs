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
use super::when::span_words;
use crate::build_processes::priority::{BuildIsolation, CpuPriority, IoPriority};
use crate::handle::{AgentStatus, SupervisedState, SupervisedStatus};
use nightshift_proto::when::short_time;

mod details;
mod timeline;
mod words;

pub use details::*;
use timeline::*;
pub use words::*;

const STYLE: &str = include_str!("../page.css");
const SCRIPT: &str = include_str!("../page.js");

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
