//! The verbs that need no running agent: `worker check` (validate worker.toml and say
//! what its policies mean) and `worker schedule` (the coming intervals).

use std::path::{Path, PathBuf};

use nightshift_proto::exit::ExitStatus;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan, Zoned};
use nightshift_policy::{
    Inputs, Interval, MAX_PREVIEW_CHANGES, Policy, PolicyError, format_duration,
};
use nightshift_proto::diag::parse_toml;
use nightshift_proto::when::short_time;
use serde::Serialize;
use serde::de::IgnoredAny;

use crate::cli::ConfigArg;
use crate::config::WorkerConfig;

/// Loads and compiles the config, printing every error for exit code 2.
fn load(config: &ConfigArg) -> Result<(PathBuf, WorkerConfig, Policy), ExitStatus> {
    let (path, worker) = match WorkerConfig::load(config.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            let count = errors.len();
            eprintln!(
                "{count} error{} in {}",
                if count == 1 { "" } else { "s" },
                errors.file().display()
            );
            return Err(ExitStatus::Usage);
        }
    };
    match worker.policy() {
        Ok(policy) => Ok((path, worker, policy)),
        Err(errors) => {
            for error in errors {
                eprintln!("{}: {error}", path.display());
            }
            Err(ExitStatus::Usage)
        }
    }
}

/// `worker check`: exit 0 and one line per policy, or exit 2 and every error.
pub fn check(config: &ConfigArg) -> ExitStatus {
    let (path, worker, policy) = match load(config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    println!("{}: ok", path.display());
    match &worker.supervise {
        Some(supervise) => {
            println!(
                "worker {} supervises {} `{}` in {}",
                worker.name,
                supervise.kind.name(),
                supervise.command_line(),
                supervise.workdir.display()
            );
            println!(
                "available starts it; away or offline sends {} (finish the job, exit), then {} after {}; reluctant {}s it",
                supervise.graceful_signal.as_str(),
                supervise.hard_signal.as_str(),
                nightshift_policy::format_duration(
                    jiff::SignedDuration::try_from(supervise.stop_timeout)
                        .unwrap_or(jiff::SignedDuration::MAX)
                ),
                match supervise.reluctant {
                    crate::supervise::ReluctantAction::Run => "run",
                    crate::supervise::ReluctantAction::Stop => "stop",
                }
            );
        }
        None => {
            println!("worker {} → master {}", worker.name, worker.master);
            println!(
                "builds at most {} at a time in {}",
                worker.max_builds,
                worker.workdir.display()
            );
        }
    }
    for line in policy.describe() {
        println!("{line}");
    }
    for warning in located(&path, policy.warnings()) {
        println!("warning: {warning}");
    }
    let now = Timestamp::now();
    println!("{}", right_now(&policy, now));
    ExitStatus::Ok
}

/// Each warning as `worker.toml:12:8: availability.schedule[0].open: …`.
fn located(path: &Path, warnings: &[PolicyError]) -> Vec<String> {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    warnings
        .iter()
        .map(|warning| {
            let (_, mut place) = parse_toml::<IgnoredAny>(path, &text);
            place.push_at_path(&warning.path, warning.message.clone());
            place
                .errors()
                .last()
                .map_or_else(|| warning.to_string(), |e| e.to_string())
        })
        .collect()
}

/// `right now: away (outside schedule nights …); available from Mon 19:00`.
fn right_now(policy: &Policy, now: Timestamp) -> String {
    let presence = policy.evaluate(now, &Inputs::default());
    let tz = policy.time_zone();
    let mut line = format!("right now: {} — {}", presence.state, presence.reason);
    if presence.state.takes_builds() {
        if let Some(end) = policy
            .preview(now, now + SignedDuration::from_hours(24 * 8))
            .intervals
            .into_iter()
            .find(|i| !i.state.takes_builds())
        {
            line.push_str(&format!("; away from {}", short_time(end.from, now, tz)));
        }
    } else {
        match policy.next_available(now, SignedDuration::from_hours(24 * 8)) {
            Some(at) => line.push_str(&format!("; takes builds from {}", short_time(at, now, tz))),
            None => line.push_str("; no time to take builds in the coming week"),
        }
    }
    line
}

/// `longest build that fits at the start: 1h25m (window ends 07:00, overrun 15m)`.
fn longest_fit_line(policy: &Policy, at: Timestamp, overrun: SignedDuration) -> String {
    let inputs = Inputs::default();
    let outlook = crate::outlook::outlook(policy, at, &inputs, overrun);
    let takes = policy.evaluate(at, &inputs).state.takes_builds();
    let tz = policy.time_zone();
    match (
        crate::outlook::longest_fit(&outlook, takes, at),
        outlook.takes_builds_until,
    ) {
        (None, _) => "longest build that fits at the start: no limit within a week".to_owned(),
        (Some(fit), Some(end)) if takes => format!(
            "longest build that fits at the start: {} (availability ends {}, overrun {})",
            format_duration(fit),
            short_time(end, at, tz),
            format_duration(overrun)
        ),
        (Some(_), _) => "longest build that fits at the start: none (not taking builds)".to_owned(),
    }
}

/// One interval as `--json` prints it.
#[derive(Debug, Serialize)]
struct JsonInterval {
    from: String,
    to: String,
    state: String,
    source: String,
}

fn rfc3339(at: &Zoned) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// Reads `--from`: RFC 3339 with an offset, or a civil date/time in `tz`.
fn parse_from(text: &str, tz: &TimeZone) -> Result<Timestamp, String> {
    let text = text.trim();
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(at);
    }
    if let Ok(zoned) = text.parse::<Zoned>() {
        return Ok(zoned.timestamp());
    }
    let civil = text.parse::<DateTime>().or_else(|_| {
        text.parse::<jiff::civil::Date>()
            .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
    });
    match civil {
        Ok(civil) => civil
            .to_zoned(tz.clone())
            .map(|z| z.timestamp())
            .map_err(|e| format!("--from {text:?}: {e}")),
        Err(_) => Err(format!(
            "--from {text:?} is not a time; write RFC 3339 (2026-12-24T08:00:00+01:00) or a local date/time (2026-12-24T08:00, 2026-12-24)"
        )),
    }
}

/// `worker schedule`: the intervals the schedules give from `--from` for `--days`.
pub fn schedule(config: &ConfigArg, from: Option<&str>, days: u32, json: bool) -> ExitStatus {
    if !(1..=366).contains(&days) {
        eprintln!("error: --days must be between 1 and 366, got {days}");
        return ExitStatus::Usage;
    }
    let (_, worker, policy) = match load(config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let tz = policy.time_zone().clone();
    let start = match from {
        Some(text) => match parse_from(text, &tz) {
            Ok(at) => at,
            Err(message) => {
                eprintln!("error: {message}");
                return ExitStatus::Usage;
            }
        },
        None => Timestamp::now(),
    };
    let start_zoned = start.to_zoned(tz.clone());
    let end = match start_zoned.checked_add(i64::from(days).days()) {
        Ok(end) => end.timestamp(),
        Err(error) => {
            eprintln!("error: cannot show {days} days from {start_zoned}: {error}");
            return ExitStatus::Usage;
        }
    };
    let preview = policy.preview(start, end);
    let intervals = preview.intervals;
    // A span with more changes than the engine follows is shown up to where
    // it stopped, and said so: exit 1, never a stretched last interval.
    let cut = preview.truncated_at.map(|at| {
        format!(
            "error: the schedules change more than {MAX_PREVIEW_CHANGES} times in these {days} day{}; shown only up to {}, ask for fewer --days",
            if days == 1 { "" } else { "s" },
            rfc3339(&at.to_zoned(tz.clone()))
        )
    });
    let finish = |cut: Option<String>| match cut {
        Some(message) => {
            eprintln!("{message}");
            ExitStatus::Failure
        }
        None => ExitStatus::Ok,
    };
    if json {
        let rows: Vec<JsonInterval> = intervals
            .iter()
            .map(|i| {
                let (from, to) = i.zoned(&tz);
                JsonInterval {
                    from: rfc3339(&from),
                    to: rfc3339(&to),
                    state: i.state.to_string(),
                    source: i.source.to_string(),
                }
            })
            .collect();
        match serde_json::to_string_pretty(&rows) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitStatus::Failure;
            }
        }
        return finish(cut);
    }
    print!("{}", human_table(&worker.name, &policy, &intervals, days));
    if let Some(at) = preview.truncated_at {
        println!(
            "\nCut short at {}: the schedules change too often to follow further.",
            at.to_zoned(tz.clone()).strftime("%a %d %b %H:%M %Z")
        );
    }
    let overrun = worker
        .availability
        .overrun
        .map_or(SignedDuration::ZERO, |o| o.get());
    println!("{}", longest_fit_line(&policy, start, overrun));
    finish(cut)
}

fn human_table(name: &str, policy: &Policy, intervals: &[Interval], days: u32) -> String {
    let tz = policy.time_zone();
    let mut out = format!(
        "Schedule of worker {name} for {days} day{} (times in {}):\n\n",
        if days == 1 { "" } else { "s" },
        policy.zone_name()
    );
    let rows: Vec<[String; 5]> = intervals
        .iter()
        .map(|interval| {
            let (from, to) = interval.zoned(tz);
            let to_text = if to.date() == from.date() {
                to.strftime("%H:%M %Z").to_string()
            } else {
                to.strftime("%a %d %b %H:%M %Z").to_string()
            };
            let seconds = (interval.to.as_second() - interval.from.as_second()).max(0);
            [
                from.strftime("%a %d %b %H:%M %Z").to_string(),
                to_text,
                interval.state.to_string(),
                format_duration(SignedDuration::from_secs((seconds + 30) / 60 * 60)),
                interval.source.to_string(),
            ]
        })
        .collect();
    let width = |column: usize| {
        rows.iter()
            .map(|row| row[column].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
    for [from, to, state, length, source] in &rows {
        out.push_str(&format!(
            "  {from:<w0$} → {to:<w1$}  {state:<w2$}  {length:>w3$}  {source}\n"
        ));
    }
    let taking = intervals
        .iter()
        .filter(|i| i.state.takes_builds())
        .map(|i| i.to.as_second() - i.from.as_second())
        .sum::<i64>();
    out.push_str(&format!(
        "\nTakes builds {} in these {days} day{} (manual and load changes not shown).\n",
        format_duration(SignedDuration::from_secs(taking)),
        if days == 1 { "" } else { "s" }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_accepts_rfc3339_and_local_forms() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let expected: Timestamp = "2026-12-24T07:00:00Z".parse().unwrap();
        for text in [
            "2026-12-24T08:00:00+01:00",
            "2026-12-24T07:00:00Z",
            "2026-12-24T08:00",
            "2026-12-24 08:00",
            "2026-12-24T08:00[Europe/Berlin]",
        ] {
            assert_eq!(parse_from(text, &tz), Ok(expected), "{text}");
        }
        assert_eq!(
            parse_from("2026-12-24", &tz),
            Ok("2026-12-23T23:00:00Z".parse().unwrap())
        );
        assert!(
            parse_from("tomorrow", &tz)
                .unwrap_err()
                .contains("tomorrow")
        );
    }
}
