//! The status page's week timeline of coming states, with manual overrides laid over the preview.

use super::*;

/// The week ahead: one bar per day, coloured by state, with the owner's
/// manual choice laid over the policies.
pub(super) fn render_timeline(
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
pub(super) fn overlay(base: Vec<PreviewInterval>, patch: PreviewInterval) -> Vec<PreviewInterval> {
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
