//! Fuzz targets for what a peer or a file controls and `nightshift-proto`
//! reaches: wire frames in both directions, and the schedule syntax
//! (`hours`, `days`, cron `open`/`close`, durations) through the policy
//! compiler. A short seeded pass runs with the tests; see `proto/src/fuzz.rs`
//! for the long run.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use nightshift_policy::{AvailabilityConfig, Inputs, Policy, Presence, PresenceState, Source};
use nightshift_proto::fuzz::{self, Verdict};
use nightshift_proto::wire::{
    AgentMessage, BuildResult, FrameError, MasterMessage, Outcome, StepResult, StepSpec,
};

/// Inputs per target in the seeded pass that runs with the tests.
const SHORT_RUN: u64 = 5_000;

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn presence() -> Presence {
    Presence {
        state: PresenceState::Away,
        reason: "outside schedule nights".into(),
        source: Source::Schedule("nights".into()),
        since: at("2026-11-30T07:00:00Z"),
        until: Some(at("2026-11-30T19:00:00+01:00")),
    }
}

fn agent_seeds() -> Vec<String> {
    let step = StepResult {
        step: 0,
        outcome: Outcome::Failure,
        exit_code: Some(2),
        signal: None,
        started_at: at("2026-11-30T10:00:00.123456789Z"),
        finished_at: at("2026-11-30T10:00:01Z"),
    };
    [
        AgentMessage::Hello {
            protocol: 1,
            worker: "lab-3".into(),
            agent_version: "0.1.0".into(),
            max_builds: 1,
            presence: presence(),
            running: vec![1, 2, u64::MAX],
            outlook: None,
        },
        AgentMessage::Presence {
            presence: presence(),
            outlook: Some(nightshift_proto::wire::Outlook {
                takes_builds_until: Some(at("2026-11-30T18:00:00Z")),
                reluctant_from: Some(at("2026-11-30T17:00:00Z")),
                next_window: Some(nightshift_proto::wire::Window {
                    from: at("2026-12-01T19:00:00Z"),
                    until: None,
                }),
                overrun_secs: 900,
            }),
        },
        AgentMessage::BuildAccepted { build_id: 7 },
        AgentMessage::BuildRefused {
            build_id: 7,
            reason: "away".into(),
        },
        AgentMessage::StepWaiting {
            build_id: 7,
            step: 1,
        },
        AgentMessage::StepStarted {
            build_id: 7,
            step: 1,
            at: at("2026-11-30T10:00:00Z"),
        },
        AgentMessage::Output {
            build_id: 7,
            step: 1,
            data: "compiling \u{1b}[1mfoo\u{1b}[0m\n\"quoted\"\\".into(),
        },
        AgentMessage::StepFinished {
            build_id: 7,
            result: step.clone(),
        },
        AgentMessage::BuildFinished {
            result: BuildResult {
                build_id: 7,
                outcome: Outcome::Cancelled,
                steps: vec![step],
                reason: Some("cancelled by the owner".into()),
                log: "line 1\nline 2\n".into(),
                finished_at: at("2026-11-30T10:00:02Z"),
            },
        },
        AgentMessage::Goodbye {
            reason: "stopping".into(),
        },
        AgentMessage::Ping { seq: 1 },
        AgentMessage::Pong { seq: 2 },
    ]
    .iter()
    .map(AgentMessage::encode)
    .collect()
}

fn master_seeds() -> Vec<String> {
    let mut env = BTreeMap::new();
    env.insert("CC".to_owned(), "clang".to_owned());
    let step = StepSpec {
        name: "compile".into(),
        command: "make -j2".into(),
        timeout_secs: Some(600),
        env,
        workdir: Some("src".into()),
        needs_grant: true,
        checkout: false,
        upload: None,
    };
    let upload = StepSpec {
        name: "artifacts".into(),
        command: "upload artifacts dist/*.tar.gz".into(),
        timeout_secs: None,
        env: BTreeMap::new(),
        workdir: None,
        needs_grant: false,
        checkout: false,
        upload: Some(nightshift_proto::wire::ArtifactUpload {
            patterns: vec!["dist/*.tar.gz".into()],
            max_file_bytes: 1 << 30,
            max_build_bytes: 4 << 30,
        }),
    };
    let start: MasterMessage = serde_json::from_value(serde_json::json!({
        "type": "start_build",
        "build_id": 9,
        "builder": "linux",
        "steps": [step, upload],
        "properties": { "release": "yes" },
    }))
    .expect("the seed StartBuild is valid");
    [
        MasterMessage::Welcome {
            protocol: 1,
            master_version: "0.1.0".into(),
            heartbeat_secs: 5,
            cancel: vec![3],
            missing_timeout_secs: Some(60),
        },
        MasterMessage::Refused {
            reason: "bad token".into(),
        },
        start,
        MasterMessage::StepGranted {
            build_id: 9,
            step: 0,
        },
        MasterMessage::CancelBuild {
            build_id: 9,
            reason: "by admin".into(),
        },
        MasterMessage::ResultStored { build_id: 9 },
        MasterMessage::ResultRefused {
            build_id: 9,
            reason: "it was not handed to it".into(),
        },
        MasterMessage::Released {
            reason: "away and idle".into(),
        },
        MasterMessage::MasterOverride {
            presence: Some(presence()),
        },
        MasterMessage::Ping { seq: 1 },
        MasterMessage::Pong { seq: 1 },
    ]
    .iter()
    .map(MasterMessage::encode)
    .collect()
}

const JSON_TOKENS: &[&str] = &[
    "{\"type\":\"hello\"}",
    "\"type\"",
    "\"build_id\"",
    "\"presence\"",
    "\"state\"",
    "\"available\"",
    "\"reluctant\"",
    "\"offline\"",
    "\"source\"",
    "\"schedule:x\"",
    "\"manual\"",
    "\"until\"",
    "\"2026-03-29T02:30:00+01:00\"",
    "\"-009999-01-01T00:00:00Z\"",
    "\"\\ud800\"",
    "1.5",
    "[]",
    "{}",
];

/// Decoding any frame either succeeds or fails with a message; what decodes
/// re-encodes to the same value.
fn round_trip<T: PartialEq + std::fmt::Debug>(
    input: &str,
    decode: impl Fn(&str) -> Result<T, FrameError>,
    encode: impl Fn(&T) -> String,
) -> Verdict {
    match decode(input) {
        Err(error) if error.to_string().len() <= "bad frame: ".len() => {
            Verdict::Violation("a decode error that names nothing".into())
        }
        Err(_) => Verdict::Refused,
        Ok(value) => match decode(&encode(&value)) {
            Ok(again) if again == value => Verdict::Accepted,
            Ok(again) => Verdict::Violation(format!("round trip changed {value:?} into {again:?}")),
            Err(error) => {
                Verdict::Violation(format!("re-encoded {value:?} does not decode: {error}"))
            }
        },
    }
}

#[test]
fn fuzz_wire_agent_frames() {
    fuzz::run(
        "wire-agent",
        &agent_seeds(),
        JSON_TOKENS,
        SHORT_RUN,
        |input| round_trip(input, AgentMessage::decode, AgentMessage::encode),
    );
}

#[test]
fn fuzz_wire_master_frames() {
    fuzz::run(
        "wire-master",
        &master_seeds(),
        JSON_TOKENS,
        SHORT_RUN,
        |input| round_trip(input, MasterMessage::decode, MasterMessage::encode),
    );
}

const SCHEDULE_SEEDS: &[&str] = &[
    r#"timezone = "Europe/Berlin"
default = "away"

[[schedule]]
name = "nights"
hours = "19:00-07:00"
days = "mon-fri"

[[schedule]]
name = "weekend"
hours = "00:00-24:00"
days = "sat,sun"
state = "reluctant"

[load]
max_load1 = 2.0
max_cpu_percent = 60
for = "2m"
"#,
    r#"timezone = "America/New_York"
[[schedule]]
name = "cron"
open = "30 3,15 * * 6"
close = "0 2,14 * * 0"
"#,
    r#"timezone = "Australia/Lord_Howe"
default = "available"
[[schedule]]
name = "fold"
open = "15 2,14 */2 * *"
close = "45 2,14 * jan-mar mon-fri"
state = "away"
"#,
    r#"timezone = "UTC"
[[schedule]]
name = "ties"
open = "0 22 1-20 * *"
close = "0 22 * * *"
"#,
];

const SCHEDULE_TOKENS: &[&str] = &[
    "mon",
    "sun",
    "sat",
    "jan",
    "dec",
    "L",
    "W",
    "?",
    "@daily",
    "*/0",
    "*/61",
    "1-",
    "-5",
    "7",
    "31",
    "32",
    "13",
    "00:00",
    "24:00",
    "+7:00",
    "7-19",
    "1h",
    "90m",
    "0s",
    "-1s",
    "2562047h",
    "Europe/Berlin",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",
    "Etc/GMT+14",
    "local",
    "hours",
    "days",
    "open",
    "close",
    "state",
    "name",
    "[[schedule]]",
    "[load]",
    "for",
    "max_load1",
];

/// Instants around the nights where clocks change, and the year's end.
const PROBES: &[&str] = &[
    "2026-03-08T06:59:59Z",
    "2026-03-29T00:30:00Z",
    "2026-04-05T15:30:00Z",
    "2026-10-04T15:45:00Z",
    "2026-10-25T00:59:59Z",
    "2026-11-01T05:30:00Z",
    "2026-12-31T23:59:59Z",
];

#[test]
fn fuzz_schedule_syntax() {
    let seeds: Vec<String> = SCHEDULE_SEEDS.iter().map(|s| (*s).to_owned()).collect();
    fuzz::run(
        "schedule",
        &seeds,
        SCHEDULE_TOKENS,
        SHORT_RUN / 8,
        |input| {
            let Ok(config) = toml::from_str::<AvailabilityConfig>(input) else {
                return Verdict::Refused;
            };
            let policy = match Policy::compile(&config, TimeZone::UTC) {
                Ok(policy) => policy,
                Err(errors) if errors.is_empty() => {
                    return Verdict::Violation("refused without naming an error".into());
                }
                Err(_) => return Verdict::Refused,
            };
            let inputs = Inputs::default();
            for probe in PROBES {
                let now = at(probe);
                let presence = policy.evaluate(now, &inputs);
                if presence.reason.is_empty() {
                    return Verdict::Violation(format!("no reason at {now}"));
                }
                if let Some(next) = policy.next_change(now, &inputs)
                    && next <= now
                {
                    return Verdict::Violation(format!("next change {next} is not after {now}"));
                }
            }
            Verdict::Accepted
        },
    );
}

#[test]
fn fuzz_durations() {
    let seeds: Vec<String> = ["2m", "1h30m", "90s", "2 hours", "1d", "0s"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    fuzz::run("durations", &seeds, SCHEDULE_TOKENS, SHORT_RUN, |input| {
        match nightshift_policy::parse_duration(input) {
            Ok(duration) => {
                let text = nightshift_policy::format_duration(duration);
                match nightshift_policy::parse_duration(&text) {
                    Ok(again) if again == duration => Verdict::Accepted,
                    other => Verdict::Violation(format!(
                        "{duration:?} prints as {text:?}, which reads back as {other:?}"
                    )),
                }
            }
            Err(message) if message.is_empty() => Verdict::Violation("empty error".into()),
            Err(_) => Verdict::Refused,
        }
    });
}
