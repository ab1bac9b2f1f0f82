//! End-to-end tests of `worker check` and `worker schedule` through the real binary:
//! a volunteer's night-only worker.toml, a broken file, JSON and human schedules.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory holding the built `worker` binary: `NIGHTSHIFT_BIN_DIR`, or the
/// nearest ancestor of this test executable that contains `worker`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NIGHTSHIFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.join("worker").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "no `worker` binary next to {}; run `cargo build -p nightshift-agent` first or set NIGHTSHIFT_BIN_DIR",
                exe.display()
            )
        })
}

fn worker(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin_dir().join("worker"))
        .args(args)
        .current_dir(dir)
        .env_remove("NIGHTSHIFT_WORKER_CONFIG")
        .env("TZ", "UTC")
        .output()
        .expect("run worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const NIGHT_ONLY: &str = r#"# Lend my desktop to the farm at night only.
name = "anna-desktop"
master = "wss://builds.example.org:8443"
token = "s3cret"

[tls]
pin_sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

[availability]
timezone = "Europe/Berlin"

[[availability.schedule]]
name = "nights"
hours = "19:00-07:00"
"#;

fn dir_with(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("worker.toml"), config).expect("write worker.toml");
    dir
}

#[test]
fn check_explains_a_night_only_config() {
    let dir = dir_with(NIGHT_ONLY);
    // No --config: ./worker.toml is found.
    let out = worker(dir.path(), &["check"]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("worker anna-desktop → master wss://builds.example.org:8443"),
        "{stdout}"
    );
    assert!(
        stdout.contains("nights: available 19:00–07:00 Europe/Berlin, every day\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("default: away outside the schedules"),
        "{stdout}"
    );
    assert!(stdout.contains("right now: "), "{stdout}");
}

#[test]
fn check_reports_every_error_with_line_column_and_key() {
    let broken = r#"name = "anna desktop"
master = "http://builds.example.org"
token = "s3cret"
max_bulds = 2

[availability]
timezone = "Europe/Berln"

[[availability.schedule]]
name = "nights"
hours = "19:00-07:00"
days = "mnd-fri"

[[availability.schedule]]
name = "lunch"
hours = "12:00-13:00"
state = "busy"

[[availability.schedule]]
name = "cron"
open = "0 25 * * *"
close = "0 7 * * *"

[availability.load]
max_load1 = 4.0
for = "two minutes"
"#;
    let dir = dir_with(broken);
    let out = worker(dir.path(), &["check", "--config", "worker.toml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let expected = [
        "worker.toml:1:8: name: ",
        "worker.toml:2:10: master: unsupported scheme \"http\"",
        "worker.toml:4:1: max_bulds: unknown key `max_bulds`",
        "worker.toml:7:12: availability.timezone: unknown time zone \"Europe/Berln\"",
        "worker.toml:12:8: availability.schedule[0].days: unknown day \"mnd\", expected mon..sun",
        "worker.toml:17:9: availability.schedule[1].state: unknown value `busy`",
        "worker.toml:21:8: availability.schedule[2].open: cron expression \"0 25 * * *\": the hour (2nd field",
        "worker.toml:26:7: availability.load.for: invalid duration `two minutes`",
        "8 errors in worker.toml",
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "stderr:\n{stderr}");
    for (line, prefix) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(prefix),
            "expected `{prefix}…`, got `{line}`\nstderr:\n{stderr}"
        );
    }
}

#[test]
fn check_without_a_config_file_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = worker(dir.path(), &["check", "--config", "missing.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("missing.toml: cannot read the config file"));
}

#[test]
fn schedule_json_is_contiguous_ordered_and_crosses_dst() {
    let dir = dir_with(NIGHT_ONLY);
    let out = worker(
        dir.path(),
        &[
            "schedule",
            "--from",
            "2026-03-28T12:00",
            "--days",
            "2",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("one JSON array");
    let summary: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|row| {
            let field = |key: &str| row[key].as_str().unwrap_or_default().to_owned();
            (field("from"), field("to"), field("state"), field("source"))
        })
        .collect();
    let expected = [
        (
            "2026-03-28T12:00:00+01:00",
            "2026-03-28T19:00:00+01:00",
            "away",
            "default",
        ),
        (
            "2026-03-28T19:00:00+01:00",
            "2026-03-29T07:00:00+02:00",
            "available",
            "schedule:nights",
        ),
        (
            "2026-03-29T07:00:00+02:00",
            "2026-03-29T19:00:00+02:00",
            "away",
            "default",
        ),
        (
            "2026-03-29T19:00:00+02:00",
            "2026-03-30T07:00:00+02:00",
            "available",
            "schedule:nights",
        ),
        (
            "2026-03-30T07:00:00+02:00",
            "2026-03-30T12:00:00+02:00",
            "away",
            "default",
        ),
    ];
    let expected: Vec<(String, String, String, String)> = expected
        .iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
        .collect();
    assert_eq!(summary, expected);
    for pair in rows.windows(2) {
        assert_eq!(pair[0]["to"], pair[1]["from"], "contiguous");
    }
}

#[test]
fn schedule_prints_a_table_in_the_policy_zone() {
    let dir = dir_with(NIGHT_ONLY);
    let out = worker(
        dir.path(),
        &["schedule", "--from", "2026-11-23T12:00:00Z", "--days", "1"],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("(times in Europe/Berlin)"), "{stdout}");
    assert!(
        stdout.contains("Mon 23 Nov 13:00 CET → 19:00 CET"),
        "{stdout}"
    );
    assert!(stdout.contains("available"), "{stdout}");
    assert!(stdout.contains("schedule:nights"), "{stdout}");
    assert!(
        stdout.contains("Takes builds 12h in these 1 day"),
        "{stdout}"
    );
}

#[test]
fn schedule_rejects_bad_flags_with_usage_errors() {
    let dir = dir_with(NIGHT_ONLY);
    let out = worker(dir.path(), &["schedule", "--from", "tomorrowish"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("\"tomorrowish\""),
        "{}",
        text(&out.stderr)
    );
    let out = worker(dir.path(), &["schedule", "--days", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = worker(dir.path(), &["schedule", "--days", "many"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn schedule_on_a_broken_config_exits_2() {
    let dir = dir_with("name = \"w\"\n[availability]\ntimezone = 5\n");
    let out = worker(dir.path(), &["schedule", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("worker.toml:3:12: availability.timezone: invalid type"),
        "{}",
        text(&out.stderr)
    );
}

const WORKER_HEAD: &str = r#"name = "anna-desktop"
master = "wss://builds.example.org:8443"
token = "s3cret"

[tls]
pin_sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

[availability]
"#;

fn with_window(zone: &str, open: &str, close: &str) -> String {
    format!(
        "{WORKER_HEAD}timezone = \"{zone}\"\n\n[[availability.schedule]]\nname = \"w\"\nopen = \"{open}\"\nclose = \"{close}\"\n"
    )
}

#[test]
fn check_rejects_names_in_the_wrong_cron_field_at_line_and_column() {
    for (open, word) in [
        ("0 9 * mon *", "`mon` is a day name"),
        ("0 9 * * jan", "`jan` is a month name"),
        ("mon 9 * * *", "`mon` is a day name"),
        ("0 sat * * *", "`sat` is a day name"),
        ("0 9 dec * *", "`dec` is a month name"),
    ] {
        let dir = dir_with(&with_window("UTC", open, "0 17 * * *"));
        let out = worker(dir.path(), &["check"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{open}: {stderr}");
        assert!(
            stderr.contains("worker.toml:13:8: availability.schedule[0].open:"),
            "{open}: {stderr}"
        );
        assert!(stderr.contains(word), "{open}: {stderr}");
    }
}

#[test]
fn check_warns_where_crontab_reads_the_day_fields_differently() {
    let dir = dir_with(&with_window("UTC", "0 9 */2 * mon", "0 17 * * *"));
    let out = worker(dir.path(), &["check"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("warning: worker.toml:13:8: availability.schedule[0].open:"),
        "{stdout}"
    );
    assert!(stdout.contains("\"0 9 */2 * +mon\""), "{stdout}");
}

#[test]
fn schedule_applies_the_dst_rule_to_every_cron() {
    // A close in New York's spring-forward gap (02:00 on 2026-03-08) closes
    // at the first instant after it, 03:00, not at the next close (14:00).
    let dir = dir_with(&with_window(
        "America/New_York",
        "30 3,15 * * 6",
        "0 2,14 * * 0",
    ));
    let out = worker(
        dir.path(),
        &[
            "schedule",
            "--from",
            "2026-03-07T12:00:00-05:00",
            "--days",
            "2",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let summary: Vec<(String, String, String)> = rows
        .iter()
        .map(|row| {
            let field = |key: &str| row[key].as_str().unwrap_or_default().to_owned();
            (field("from"), field("to"), field("state"))
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "2026-03-07T12:00:00-05:00".to_owned(),
                "2026-03-08T03:00:00-04:00".to_owned(),
                "available".to_owned()
            ),
            (
                "2026-03-08T03:00:00-04:00".to_owned(),
                "2026-03-09T12:00:00-04:00".to_owned(),
                "away".to_owned()
            ),
        ]
    );
}

#[test]
fn schedule_says_when_it_was_cut_short() {
    // Opens on even minutes, closes on odd ones: 1440 changes a day, more
    // than the preview follows in 100 days.
    let dir = dir_with(&with_window("UTC", "*/2 * * * *", "1-59/2 * * * *"));
    for json in [false, true] {
        let mut args = vec![
            "schedule",
            "--from",
            "2026-12-01T00:00:00Z",
            "--days",
            "100",
        ];
        if json {
            args.push("--json");
        }
        let out = worker(dir.path(), &args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "json {json}: {stderr}");
        assert!(
            stderr.contains("change more than 100000 times")
                && stderr.contains("shown only up to 2027-02-08T10:40:00+00:00"),
            "json {json}: {stderr}"
        );
        if json {
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).expect("the exact part as JSON");
            assert_eq!(rows.len(), 100_000);
            assert_eq!(rows[99_999]["to"], "2027-02-08T10:40:00+00:00");
        } else {
            assert!(
                text(&out.stdout).contains("Cut short at"),
                "{}",
                text(&out.stdout)
            );
        }
    }
}

#[test]
fn master_check_rejects_misplaced_names_and_warns_on_day_fields() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |open: &str| {
        let config = format!(
            "listen = \"127.0.0.1:0\"\ninsecure = true\n\n[[worker]]\nname = \"w\"\n\
             token_sha256 = \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n\
             schedule = [\n  {{ name = \"odd\", open = \"{open}\", close = \"0 17 * * *\" }},\n]\n"
        );
        std::fs::write(dir.path().join("master.toml"), config).expect("write master.toml");
    };
    let master = |dir: &Path| {
        Command::new(bin_dir().join("master"))
            .args(["check", "--config", "master.toml"])
            .current_dir(dir)
            .env("TZ", "UTC")
            .output()
            .expect("run master")
    };
    write("0 9 */2 * mon");
    let out = master(dir.path());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("warning: master.toml:8:26: worker[0].schedule[0].open:")
            && stdout.contains("\"0 9 */2 * +mon\""),
        "{stdout}"
    );
    write("0 9 * mon *");
    let out = master(dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("master.toml:8:26: worker[0].schedule[0].open:")
            && stderr.contains("`mon` is a day name"),
        "{stderr}"
    );
}
