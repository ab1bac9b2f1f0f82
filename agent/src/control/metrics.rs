//! `/metrics`: the agent's status in the Prometheus text exposition format.

use std::fmt::Write;

use jiff::Timestamp;
use nightshift_policy::PresenceState;

use crate::handle::{AgentStatus, SupervisedState, SupervisedStatus};

pub use nightshift_proto::prometheus::CONTENT_TYPE;
use nightshift_proto::prometheus::{escape_label, family, number};

/// Renders every metric for `status` as seen at `now`.
pub fn render(status: &AgentStatus, now: Timestamp) -> String {
    let mut out = String::new();
    let worker = escape_label(&status.worker);

    family(
        &mut out,
        "nightshift_worker_state",
        "gauge",
        "Current presence state: 1 for the state the worker is in, 0 for the others.",
    );
    for state in PresenceState::ALL {
        let value = u8::from(status.presence.state == state);
        let _ = writeln!(
            out,
            "nightshift_worker_state{{worker=\"{worker}\",state=\"{state}\"}} {value}"
        );
    }

    family(
        &mut out,
        "nightshift_worker_state_info",
        "gauge",
        "What decided the current state (source) and whether the owner set it by hand.",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_state_info{{worker=\"{worker}\",state=\"{}\",source=\"{}\",manual=\"{}\",stopping=\"{}\"}} 1",
        status.presence.state,
        escape_label(&status.presence.source.to_string()),
        status.manual.is_some(),
        status.stopping,
    );

    family(
        &mut out,
        "nightshift_worker_state_since_timestamp_seconds",
        "gauge",
        "When the current state began (Unix time).",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_state_since_timestamp_seconds{{worker=\"{worker}\"}} {}",
        status.presence.since.as_second()
    );

    counter(
        &mut out,
        "nightshift_worker_builds_run_total",
        "Builds this agent has finished since it started.",
        &worker,
        status.counters.builds_run,
    );
    counter(
        &mut out,
        "nightshift_worker_builds_failed_total",
        "Finished builds that failed.",
        &worker,
        status.counters.builds_failed,
    );
    counter(
        &mut out,
        "nightshift_worker_presence_changes_total",
        "How often the presence state changed.",
        &worker,
        status.counters.presence_changes,
    );

    family(
        &mut out,
        "nightshift_worker_builds_running",
        "gauge",
        "Builds running right now.",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_builds_running{{worker=\"{worker}\"}} {}",
        status.builds.len()
    );

    family(
        &mut out,
        "nightshift_worker_build_seconds",
        "gauge",
        "How long each running build has been running.",
    );
    for build in &status.builds {
        let seconds = now.duration_since(build.started_at).as_secs_f64().max(0.0);
        let _ = writeln!(
            out,
            "nightshift_worker_build_seconds{{worker=\"{worker}\",build_id=\"{}\",builder=\"{}\"}} {}",
            build.build_id,
            escape_label(&build.builder),
            number(seconds)
        );
    }

    family(
        &mut out,
        "nightshift_worker_master_connected",
        "gauge",
        "1 while the agent is connected to its master.",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_master_connected{{worker=\"{worker}\"}} {}",
        u8::from(status.master.connected)
    );

    if let Some(load) = &status.load {
        family(
            &mut out,
            "nightshift_worker_load1",
            "gauge",
            "The latest 1-minute load average not caused by the agent's own builds.",
        );
        let _ = writeln!(
            out,
            "nightshift_worker_load1{{worker=\"{worker}\"}} {}",
            number(load.load1)
        );
        family(
            &mut out,
            "nightshift_worker_cpu_percent",
            "gauge",
            "The latest CPU use (percent of the machine) not caused by the agent's own builds.",
        );
        let _ = writeln!(
            out,
            "nightshift_worker_cpu_percent{{worker=\"{worker}\"}} {}",
            number(load.cpu_percent)
        );
        family(
            &mut out,
            "nightshift_worker_load_sample_timestamp_seconds",
            "gauge",
            "When the latest load sample was taken (Unix time).",
        );
        let _ = writeln!(
            out,
            "nightshift_worker_load_sample_timestamp_seconds{{worker=\"{worker}\"}} {}",
            load.at.as_second()
        );
    }
    if let Some(supervised) = &status.supervised {
        supervised_metrics(&mut out, &worker, supervised);
    }
    out
}

/// The `[supervise]` CI agent: state, pid, draining, job, restarts, last exit.
fn supervised_metrics(out: &mut String, worker: &str, supervised: &SupervisedStatus) {
    family(
        out,
        "nightshift_worker_supervised_state",
        "gauge",
        "The supervised CI agent: 1 for the state it is in, 0 for the others.",
    );
    for state in [
        SupervisedState::Stopped,
        SupervisedState::Running,
        SupervisedState::Draining,
        SupervisedState::Restarting,
    ] {
        let _ = writeln!(
            out,
            "nightshift_worker_supervised_state{{worker=\"{worker}\",kind=\"{}\",state=\"{}\"}} {}",
            supervised.kind,
            state.as_str(),
            u8::from(supervised.state == state)
        );
    }
    family(
        out,
        "nightshift_worker_supervised_state_since_timestamp_seconds",
        "gauge",
        "When the supervised CI agent entered its state (Unix time).",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_supervised_state_since_timestamp_seconds{{worker=\"{worker}\"}} {}",
        supervised.since.as_second()
    );
    family(
        out,
        "nightshift_worker_supervised_pid",
        "gauge",
        "The supervised CI agent's process id (0 when it is not running).",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_supervised_pid{{worker=\"{worker}\"}} {}",
        supervised.pid.unwrap_or(0)
    );
    family(
        out,
        "nightshift_worker_supervised_job_running",
        "gauge",
        "1 while the supervised CI agent has child processes (runs a job), 0 otherwise.",
    );
    let _ = writeln!(
        out,
        "nightshift_worker_supervised_job_running{{worker=\"{worker}\"}} {}",
        u8::from(supervised.job_running == Some(true))
    );
    counter(
        out,
        "nightshift_worker_supervised_restarts_total",
        "Starts of the supervised CI agent after it exited by itself (or failed to start).",
        worker,
        supervised.restarts,
    );
    if let Some(exit) = &supervised.last_exit {
        family(
            out,
            "nightshift_worker_supervised_last_exit_timestamp_seconds",
            "gauge",
            "When the supervised CI agent last ended, with how (status), whether it was asked to and whether it had to be stopped hard.",
        );
        let _ = writeln!(
            out,
            "nightshift_worker_supervised_last_exit_timestamp_seconds{{worker=\"{worker}\",status=\"{}\",requested=\"{}\",stopped_hard=\"{}\"}} {}",
            escape_label(&exit.status),
            exit.requested,
            exit.stopped_hard,
            exit.at.as_second()
        );
    }
}

fn counter(out: &mut String, name: &str, help: &str, worker: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name}{{worker=\"{worker}\"}} {value}");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::handle::{Counters, LoadSnapshot, MasterLink, RunningBuild};
    use nightshift_policy::{Presence, Source};
    use std::collections::{BTreeMap, BTreeSet};

    /// One parsed sample: name, labels, value.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// A strict parser of the text format: every non-comment line must be
    /// `name{label="value",...} number`, every sample's family must have had
    /// a `# TYPE` line before it, and no family may be declared twice.
    pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
        let mut samples = Vec::new();
        let mut typed = BTreeSet::new();
        for (index, line) in text.lines().enumerate() {
            let at = |message: &str| format!("line {}: {message}: {line:?}", index + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().ok_or_else(|| at("TYPE without name"))?;
                let kind = parts.next().ok_or_else(|| at("TYPE without kind"))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(at("unknown metric kind"));
                }
                if !typed.insert(name.to_owned()) {
                    return Err(at("family declared twice"));
                }
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with('#') {
                continue;
            }
            let name_end = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .ok_or_else(|| at("no value"))?;
            let name = &line[..name_end];
            if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(at("bad metric name"));
            }
            if !typed.contains(name) {
                return Err(at("sample before its # TYPE line"));
            }
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(after) = rest.strip_prefix('{') {
                let mut chars = after.char_indices().peekable();
                let consumed;
                loop {
                    let Some(&(start, c)) = chars.peek() else {
                        return Err(at("unterminated labels"));
                    };
                    if c == '}' {
                        consumed = start + 1;
                        break;
                    }
                    let mut key = String::new();
                    while let Some(&(_, c)) = chars.peek() {
                        if c == '=' {
                            break;
                        }
                        if !(c.is_ascii_alphanumeric() || c == '_') {
                            return Err(at("bad label name"));
                        }
                        key.push(c);
                        chars.next();
                    }
                    if chars.next().map(|(_, c)| c) != Some('=')
                        || chars.next().map(|(_, c)| c) != Some('"')
                    {
                        return Err(at("label without =\""));
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(at("unterminated label value")),
                            Some((_, '"')) => break,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, '\\')) => value.push('\\'),
                                Some((_, '"')) => value.push('"'),
                                Some((_, 'n')) => value.push('\n'),
                                _ => return Err(at("bad escape")),
                            },
                            Some((_, c)) => value.push(c),
                        }
                    }
                    if key.is_empty() || labels.insert(key, value).is_some() {
                        return Err(at("empty or repeated label"));
                    }
                    match chars.peek() {
                        Some((_, ',')) => {
                            chars.next();
                        }
                        Some((_, '}')) => {}
                        _ => return Err(at("expected , or }")),
                    }
                }
                rest = &after[consumed..];
            }
            let value_text = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no space before value"))?;
            let value = match value_text {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                text => text
                    .parse::<f64>()
                    .map_err(|_| at("value is not a number"))?,
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Ok(samples)
    }

    pub fn status_fixture(now: Timestamp) -> AgentStatus {
        AgentStatus {
            worker: "lab \"3\"\\".into(),
            agent_version: "0.1.0".into(),
            presence: Presence {
                state: PresenceState::Away,
                reason: "outside schedule nights".into(),
                source: Source::Schedule("nights".into()),
                since: now,
                until: None,
            },
            manual: None,
            stopping: false,
            builds: vec![RunningBuild {
                build_id: 42,
                builder: "linux\nx86".into(),
                started_at: now - jiff::SignedDuration::from_secs(90),
                step: 1,
                step_name: "test".into(),
                tail: "ok".into(),
            }],
            master: MasterLink {
                url: "wss://master.example:9443".into(),
                connected: true,
                since: Some(now),
                error: None,
            },
            counters: Counters {
                builds_run: 7,
                builds_failed: 2,
                presence_changes: 11,
            },
            load: Some(LoadSnapshot {
                at: now,
                load1: 0.5,
                cpu_percent: 12.25,
                build_cpu_percent: 40.0,
            }),
            isolation: Some(crate::build_processes::priority::BuildIsolation {
                accounting: "process-tree".into(),
                cgroup_parent: None,
                cpu_priority: crate::build_processes::priority::CpuPriority::Idle,
                io_priority: crate::build_processes::priority::IoPriority::Idle,
                cpu_weight: 1,
                cpu_weight_applied: false,
                memory_high_bytes: Some(3 << 30),
                memory_high_applied: false,
                notes: vec!["builds have <no> cgroup".into()],
            }),
            supervised: None,
            outlook: None,
        }
    }

    #[test]
    fn output_parses_and_says_what_it_should() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let text = render(&status_fixture(now), now);
        let samples = parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        let value = |name: &str, label: (&str, &str)| {
            samples
                .iter()
                .find(|s| {
                    s.name == name && s.labels.get(label.0).map(String::as_str) == Some(label.1)
                })
                .map(|s| s.value)
        };
        assert_eq!(
            value("nightshift_worker_state", ("state", "away")),
            Some(1.0)
        );
        assert_eq!(
            value("nightshift_worker_state", ("state", "available")),
            Some(0.0)
        );
        assert_eq!(
            value("nightshift_worker_state", ("state", "offline")),
            Some(0.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_builds_run_total",
                ("worker", "lab \"3\"\\")
            ),
            Some(7.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_builds_failed_total",
                ("worker", "lab \"3\"\\")
            ),
            Some(2.0)
        );
        assert_eq!(
            value("nightshift_worker_build_seconds", ("build_id", "42")),
            Some(90.0)
        );
        assert_eq!(
            value("nightshift_worker_build_seconds", ("builder", "linux\nx86")),
            Some(90.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_master_connected",
                ("worker", "lab \"3\"\\")
            ),
            Some(1.0)
        );
        assert_eq!(
            value("nightshift_worker_load1", ("worker", "lab \"3\"\\")),
            Some(0.5)
        );
        assert_eq!(
            value("nightshift_worker_cpu_percent", ("worker", "lab \"3\"\\")),
            Some(12.25)
        );
        assert_eq!(
            value(
                "nightshift_worker_presence_changes_total",
                ("worker", "lab \"3\"\\")
            ),
            Some(11.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_state_info",
                ("source", "schedule:nights")
            ),
            Some(1.0)
        );
    }

    #[test]
    fn supervised_agent_is_shown() {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let mut status = status_fixture(now);
        status.supervised = Some(crate::handle::SupervisedStatus {
            kind: "buildbot-worker".into(),
            command: "buildbot-worker start --nodaemon .".into(),
            state: SupervisedState::Draining,
            since: now,
            pid: Some(4321),
            wanted: false,
            why: "away (manual): lunch".into(),
            job_running: Some(true),
            draining_since: Some(now),
            hard_stop_at: None,
            restart_at: None,
            restarts: 3,
            last_exit: Some(crate::handle::SupervisedExit {
                at: now,
                status: "signal SIGTERM".into(),
                requested: true,
                stopped_hard: true,
                reason: "ignored".into(),
            }),
        });
        let text = render(&status, now);
        let samples = parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        let value = |name: &str, label: (&str, &str)| {
            samples
                .iter()
                .find(|s| {
                    s.name == name && s.labels.get(label.0).map(String::as_str) == Some(label.1)
                })
                .map(|s| s.value)
        };
        assert_eq!(
            value("nightshift_worker_supervised_state", ("state", "draining")),
            Some(1.0)
        );
        assert_eq!(
            value("nightshift_worker_supervised_state", ("state", "running")),
            Some(0.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_supervised_pid",
                ("worker", "lab \"3\"\\")
            ),
            Some(4321.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_supervised_job_running",
                ("worker", "lab \"3\"\\")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_supervised_restarts_total",
                ("worker", "lab \"3\"\\")
            ),
            Some(3.0)
        );
        assert_eq!(
            value(
                "nightshift_worker_supervised_last_exit_timestamp_seconds",
                ("stopped_hard", "true")
            ),
            Some(now.as_second() as f64)
        );
        assert!(!render(&status_fixture(now), now).contains("supervised"));
    }

    #[test]
    fn parser_rejects_malformed_lines() {
        for bad in [
            "# TYPE a gauge\na 1 2 3",
            "# TYPE a gauge\na{b=\"c} 1",
            "# TYPE a gauge\na{b=c} 1",
            "# TYPE a gauge\na x",
            "a 1",
            "# TYPE a gauge\n# TYPE a gauge\na 1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
