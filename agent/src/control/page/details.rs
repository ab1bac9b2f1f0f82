//! The status page's details: policy, load, build isolation and the supervised process.

use super::*;

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
