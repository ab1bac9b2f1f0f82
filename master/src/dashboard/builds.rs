//! The dashboard's builds and builders tables: states, waits, durations, sources.

use super::*;

/// The latest builds card.
pub(super) fn render_builds(
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
                    escape(&worker_anchor(w)),
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
pub(super) fn render_builders(html: &mut String, builders: &[BuilderRow]) {
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
