//! The dashboard's workers table, with latent instances.

use super::*;

/// The workers card: one page of them, and how to see the others.
pub(super) fn render_workers(html: &mut String, page: &WorkerPage, now: Timestamp, tz: &TimeZone) {
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
            escape(&worker_anchor(&w.name))
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

/// The `id` anchor of a worker's row on the dashboard.
pub fn worker_anchor(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
