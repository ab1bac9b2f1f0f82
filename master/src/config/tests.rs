//! Tests of `master.toml` parsing: defaults, every error at once, cross
//! references, the packaged example.

use super::*;
use crate::locks::{Access, Claim};
use nightshift_proto::wire::CheckoutMode;

const HASH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn parse(text: &str) -> Result<MasterConfig, ConfigErrors> {
    MasterConfig::parse(text, Path::new("master.toml"), Path::new("/srv"))
}

#[test]
fn a_full_config_parses_with_defaults() {
    let text = format!(
        r#"
[[worker]]
name = "b1"
token_sha256 = "{HASH}"

[[worker]]
name = "b2"
token_sha256 = "{HASH}"
max_builds = 3
latent = {{ provider = "process", build_wait_timeout = "0s" }}

[[lock]]
name = "compile"
scope = "worker"
max_count = 2
max_count_for = {{ b2 = 4 }}

[[builder]]
name = "app"
workers = ["b1", "b2"]
locks = [{{ name = "compile", access = "counting" }}]
steps = [{{ name = "make", command = "make", timeout = "5m", env = {{ CC = "cc" }} }}]
"#
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:8443");
    assert_eq!(config.data_dir, Path::new("/srv/nightshift-data"));
    assert_eq!(config.tls, TlsMode::SelfSigned);
    assert_eq!(config.missing_timeout, Duration::from_secs(60));
    assert_eq!(config.max_starting, 2);
    assert_eq!(config.worker("b1").unwrap().max_builds, 1);
    let b2 = config.worker("b2").unwrap();
    assert_eq!(
        b2.latent.as_ref().unwrap().build_wait_timeout,
        Secs(Duration::ZERO)
    );
    let app = config.builder("app").unwrap();
    assert_eq!(app.steps[0].timeout, Some(Duration::from_secs(300)));
    assert_eq!(app.locks, vec![Claim::new("compile", Access::Counting)]);
    assert_eq!(config.locks[0].max_count_for_worker["b2"], 4);
    assert_eq!(app.admission, Admission::Fit, "the default");
    assert_eq!(config.agent_limits, super::AgentLimits::default());
}

#[test]
fn agent_limits_are_read_checked_and_named_where_wrong() {
    let config = parse(
        "[agent_limits]\nframes_per_second = 50\nframe_burst = 60\n\
         control_frames_per_second = 5\ncontrol_frame_burst = 7\noutbox_frames = 256\n",
    )
    .unwrap();
    assert_eq!(
        config.agent_limits,
        super::AgentLimits {
            frames_per_second: 50,
            frame_burst: 60,
            control_frames_per_second: 5,
            control_frame_burst: 7,
            outbox_frames: 256,
        }
    );
    // Unset keys keep their defaults.
    let config = parse("[agent_limits]\noutbox_frames = 64\n").unwrap();
    assert_eq!(config.agent_limits.outbox_frames, 64);
    assert_eq!(config.agent_limits.frames_per_second, 500);

    let shown = parse("[agent_limits]\nframes_per_second = 0\noutbox_frames = 2000000\n")
        .unwrap_err()
        .to_string();
    assert!(shown.contains("master.toml:2:"), "{shown}");
    assert!(shown.contains("agent_limits.frames_per_second"), "{shown}");
    assert!(shown.contains("master.toml:3:"), "{shown}");
    assert!(
        shown.contains("agent_limits.outbox_frames") && shown.contains("got 2000000"),
        "{shown}"
    );
    let shown = parse("[agent_limits]\nframes_per_sec = 5\n")
        .unwrap_err()
        .to_string();
    assert!(shown.contains("frames_per_sec"), "{shown}");
    let shown = parse("[agent_limits]\nframe_burst = -1\n")
        .unwrap_err()
        .to_string();
    assert!(shown.contains("master.toml:2:"), "{shown}");
}

#[test]
fn admission_is_fit_or_best_effort() {
    let builder = |admission: &str| {
        format!(
            "[[worker]]\nname = \"b1\"\ntoken_sha256 = \"{HASH}\"\n\n[[builder]]\nname = \"app\"\n\
                 workers = [\"b1\"]\nsteps = [{{ name = \"make\", command = \"make\" }}]\nadmission = {admission}\n"
        )
    };
    let config = parse(&builder("\"best-effort\"")).unwrap();
    assert_eq!(
        config.builder("app").unwrap().admission,
        Admission::BestEffort
    );
    let config = parse(&builder("\"fit\"")).unwrap();
    assert_eq!(config.builder("app").unwrap().admission, Admission::Fit);
    let shown = parse(&builder("\"sometimes\"")).unwrap_err().to_string();
    assert!(shown.starts_with("master.toml:9:"), "{shown}");
    assert!(
        shown.contains("admission") && shown.contains("`fit`") && shown.contains("`best-effort`"),
        "{shown}"
    );
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = format!("[[worker]]\nname = \"b1\"\ntoken_sha256 = \"{HASH}\"\nmax_bulds = 2\n");
    let err = parse(&text).unwrap_err();
    let shown = err.to_string();
    assert!(shown.starts_with("master.toml:4:"), "{shown}");
    assert!(shown.contains("max_bulds"), "{shown}");
}

#[test]
fn a_step_cannot_take_a_lock_its_build_holds_and_latent_workers_need_no_token() {
    let text = r#"
[[lock]]
name = "db"
scope = "master"
max_count = 1

[[worker]]
name = "vm"
latent = { provider = "process" }

[[builder]]
name = "app"
workers = ["vm"]
locks = [{ name = "db", access = "counting" }]
steps = [{ name = "s", command = "true", locks = [{ name = "db", access = "exclusive" }] }]
"#;
    let shown = parse(text).unwrap_err().to_string();
    assert!(
        shown.contains("builder[0].steps[0].locks[0].name")
            && shown.contains("already held by the whole build"),
        "{shown}"
    );
    assert!(!shown.contains("token_sha256"), "{shown}");
    let ordinary = "[[worker]]\nname = \"w\"\n";
    let shown = parse(ordinary).unwrap_err().to_string();
    assert!(
        shown.contains("worker[0].token_sha256") && shown.contains("missing"),
        "{shown}"
    );
}

#[test]
fn cross_references_are_checked_and_all_errors_collected() {
    let text = format!(
        r#"
[[worker]]
name = "b1"
token_sha256 = "{HASH}"

[[builder]]
name = "app"
workers = ["b1", "ghost"]
steps = [{{ name = "s", command = "true", locks = [{{ name = "nolock", access = "exclusive" }}] }}]
"#
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(err.len(), 2, "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("master.toml:8:") && shown.contains("builder[0].workers[1]"),
        "{shown}"
    );
    assert!(shown.contains("unknown worker `ghost`"), "{shown}");
    assert!(shown.contains("unknown lock `nolock`"), "{shown}");
}

#[test]
fn bad_values_are_refused() {
    let text = "listen = \"nowhere\"\nmissing_timeout = \"5 parsecs\"\n";
    let err = parse(text).unwrap_err().to_string();
    assert!(err.contains("missing_timeout"), "{err}");
    let err = parse("listen = \"nowhere\"\n").unwrap_err().to_string();
    assert!(err.contains(": listen: "), "{err}");
    let err = parse("[[worker]]\nname = \"w\"\ntoken_sha256 = \"abc\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("master.toml:3:") && err.contains("token_sha256"),
        "{err}"
    );
}

#[test]
fn master_side_schedules_use_the_worker_toml_forms() {
    let good = format!(
        "[[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\ntimezone = \"Europe/Paris\"\n\
             schedule = [{{ name = \"nights\", hours = \"19:00-07:00\", days = \"mon-fri\" }}]\n"
    );
    let config = parse(&good).unwrap();
    assert_eq!(config.worker("w").unwrap().schedule[0].name, "nights");
    let bad = format!(
        "[[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\n\
             schedule = [{{ name = \"nights\", hours = \"25:00-07:00\" }}]\n"
    );
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("worker[0]") && err.contains("hours"), "{err}");
}

#[test]
fn a_worker_group_takes_a_master_side_schedule_located_when_wrong() {
    let good = format!(
        "[[worker_group]]\nname = \"lab\"\nenroll_token_sha256 = \"{HASH}\"\n\
             timezone = \"Europe/Berlin\"\n\
             schedule = [{{ name = \"nights\", hours = \"19:00-07:00\" }}]\n"
    );
    let config = parse(&good).unwrap();
    let lab = config.worker_group("lab").unwrap();
    assert_eq!(lab.schedule[0].name, "nights");
    assert_eq!(lab.timezone.as_deref(), Some("Europe/Berlin"));
    let bad = format!(
        "[[worker_group]]\nname = \"lab\"\nenroll_token_sha256 = \"{HASH}\"\n\
             timezone = \"Mars/Olympus\"\n\
             schedule = [{{ name = \"nights\", hours = \"25:00-07:00\" }}]\n"
    );
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("master.toml:4:") && err.contains("worker_group[0].timezone"),
        "{err}"
    );
    assert!(
        err.contains("master.toml:5:") && err.contains("worker_group[0].schedule[0].hours"),
        "{err}"
    );
}

#[test]
fn durations_parse_in_the_one_grammar_and_a_bare_number_is_refused() {
    assert_eq!(Secs::parse("90s").unwrap().0, Duration::from_secs(90));
    assert_eq!(Secs::parse("1h30m").unwrap().0, Duration::from_secs(5400));
    assert_eq!(Secs::parse("250ms").unwrap().0, Duration::from_millis(250));
    assert_eq!(Secs::parse("1h 30m").unwrap().0, Duration::from_secs(5400));
    assert_eq!(
        Secs::parse("2d").unwrap().0,
        Duration::from_secs(2 * 86_400)
    );
    assert!(Secs::parse("m").is_err());
    assert!(Secs::parse("-5s").is_err());
    let why = Secs::parse("90").unwrap_err();
    assert!(
        why.contains("needs a unit") && why.contains("\"90s\""),
        "{why}"
    );
    // In the file too, located, as worker.toml's `for = 30` is.
    let shown = parse("missing_timeout = 30\n").unwrap_err().to_string();
    assert!(
        shown.contains("master.toml:1:")
            && shown.contains("missing_timeout")
            && shown.contains("a duration needs a unit: write \"30s\""),
        "{shown}"
    );
}

#[test]
fn embedded_default_is_valid() {
    let text = EMBEDDED_DEFAULT.replace("@LOCAL_TOKEN_SHA256@", HASH);
    let config = parse(&text).unwrap();
    assert!(config.builder("hello").is_some());
    assert!(config.worker("local").is_some());
}

#[test]
fn every_error_in_the_file_is_reported_at_once() {
    let text = format!(
        r#"listen = "127.0.0.1:8443"
missing_timeout = "5 parsecs"

[[worker]]
name = "b1"
token_sha256 = "{HASH}"
max_bulds = 2

[[lock]]
name = "db"
scope = "planet"

[[builder]]
name = "app"
workers = ["b1", "ghost"]
colour = "blue"
steps = [
  {{ name = "s", command = "true", locks = [{{ name = "db", access = "sometimes" }}] }},
]

[[builder]]
name = "db-user"
workers = ["b1"]
locks = [{{ name = "db", access = "exclusive" }}]
steps = [{{ name = "s", command = "true", timeout = -5 }}]
"#
    );
    let err = MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/srv")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "master.toml:2:19: missing_timeout: invalid duration `5 parsecs`, expected e.g. `30s`, `2m`, `1h30m`, `2h` or `1d`\n\
             master.toml:7:1: worker[0].max_bulds: unknown key `max_bulds`, expected one of `name`, `token_sha256`, `max_builds`, `schedule`, `timezone`, `latent`\n\
             master.toml:11:9: lock[0].scope: unknown value `planet`, expected `master` or `worker`\n\
             master.toml:15:18: builder[0].workers[1]: unknown worker `ghost` (no [[worker]] or [[worker_group]] with that name)\n\
             master.toml:16:1: builder[0].colour: unknown key `colour`, expected one of `name`, `workers`, `steps`, `locks`, `admission`, `source`, `poll`, `schedule`, `only_if_changed`, `collapse`, `artifacts`\n\
             master.toml:18:68: builder[0].steps[0].locks[0].access: unknown value `sometimes`, expected `counting` or `exclusive`\n\
             master.toml:25:52: builder[1].steps[0].timeout: a duration cannot be negative (-5)"
    );
    assert_eq!(err.len(), 7);
    assert!(err.errors().iter().all(|i| i.line_column.is_some()));
}

#[test]
fn the_packaged_example_is_valid_and_its_schedule_does_what_it_says() {
    let text = include_str!("../../../packaging/examples/master.toml");
    let config = parse(text).unwrap();
    let rack = config.worker("rack-1").expect("rack-1 in the example");
    let availability = nightshift_policy::AvailabilityConfig {
        timezone: rack.timezone.clone(),
        default: None,
        schedule: rack.schedule.clone(),
        load: None,
        overrun: None,
    };
    let policy = nightshift_policy::Policy::compile_for_master(
        &availability,
        jiff::tz::TimeZone::UTC,
        "worker[1]",
    )
    .unwrap();
    let state_at = |instant: &str| {
        let now: jiff::Timestamp = instant.parse().unwrap();
        policy
            .evaluate(now, &nightshift_policy::Inputs::default())
            .state
    };
    use nightshift_policy::PresenceState::{Available, Reluctant};
    // Europe/Berlin is UTC+1 in November.
    assert_eq!(state_at("2026-11-23T09:00:00Z"), Reluctant, "Monday 10:00");
    assert_eq!(state_at("2026-11-23T16:59:00Z"), Reluctant, "Monday 17:59");
    assert_eq!(state_at("2026-11-23T17:00:00Z"), Available, "Monday 18:00");
    assert_eq!(
        state_at("2026-11-25T02:00:00Z"),
        Available,
        "Wednesday 03:00"
    );
    assert_eq!(state_at("2026-11-28T11:00:00Z"), Available, "Saturday noon");
    assert_eq!(state_at("2026-11-29T22:00:00Z"), Available, "Sunday 23:00");
    assert_eq!(state_at("2026-11-30T07:00:00Z"), Reluctant, "Monday 08:00");
}

#[test]
fn sources_hooks_and_triggers_are_validated_together() {
    let text = format!(
        "timezone = \"Mars/Olympus\"\n\
             [[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\n\
             [[builder]]\nname = \"plain\"\nworkers = [\"w\"]\npoll = \"1m\"\ncollapse = true\n\
             steps = [{{ name = \"s\", command = \"true\" }}]\n\
             [[builder]]\nname = \"app\"\nworkers = [\"w\"]\nschedule = \"0 25 * * *\"\n\
             source = {{ repo = \"-oProxyCommand=x\", branch = \"a..b\", mode = \"fresh\" }}\n\
             steps = [{{ name = \"s\", command = \"true\" }}]\n\
             [[hook]]\nname = \"gh\"\nkind = \"github\"\nbuilders = [\"plain\", \"ghost\"]\n"
    );
    let err = MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/etc"))
        .unwrap_err()
        .to_string();
    for expected in [
        "timezone: unknown time zone `Mars/Olympus`",
        "builder[0].poll: polling needs a `source`",
        "builder[0].collapse:",
        "builder[1].schedule: cron expression",
        "builder[1].source.repo:",
        "builder[1].source.branch: `a..b` is not a valid branch name",
        "hook[0].secret_file: missing",
        "hook[0].builders[0]: builder `plain` has no `source`",
        "hook[0].builders[1]: unknown builder `ghost`",
    ] {
        assert!(err.contains(expected), "{expected}\n{err}");
    }
    let good = format!(
        "timezone = \"Europe/Berlin\"\n\
             [[worker]]\nname = \"w\"\ntoken_sha256 = \"{HASH}\"\n\
             [[builder]]\nname = \"app\"\nworkers = [\"w\"]\npoll = \"2m\"\nschedule = \"0 2 * * *\"\n\
             only_if_changed = true\ncollapse = true\n\
             source = {{ repo = \"git@example.org:acme/app.git\", shallow = true }}\n\
             steps = [{{ name = \"s\", command = \"make\" }}]\n\
             [[hook]]\nname = \"forge\"\nkind = \"forgejo\"\nsecret_file = \"hook.secret\"\n"
    );
    let config = MasterConfig::parse(&good, Path::new("master.toml"), Path::new("/etc")).unwrap();
    let app = config.builder("app").unwrap();
    let source = app.source.as_ref().unwrap();
    assert_eq!(source.branch, "main");
    assert_eq!(source.mode, CheckoutMode::Incremental);
    assert!(source.shallow && app.collapse && app.only_if_changed);
    assert_eq!(app.poll, Some(Duration::from_secs(120)));
    let hook = config.hook("forge").unwrap();
    assert_eq!(hook.kind, HookKind::Gitea);
    assert_eq!(hook.secret_file, Path::new("/etc/hook.secret"));
}

#[test]
fn artifacts_patterns_caps_and_retention_are_validated() {
    let with = |top: &str, artifacts: &str| {
        format!(
            "{top}\n[[worker]]\nname = \"b1\"\ntoken_sha256 = \"{HASH}\"\n\n[[builder]]\nname = \"app\"\n\
             workers = [\"b1\"]\nsteps = [{{ name = \"make\", command = \"make\" }}]\nartifacts = {artifacts}\n"
        )
    };
    let config = parse(&with(
        "max_artifact_bytes = 1000\nmax_build_artifact_bytes = 5000\nartifact_retention = \"7d\"\nartifact_keep_builds = 3",
        r#"["dist/*.tar.gz", "out/**/*.zip"]"#,
    ))
    .unwrap();
    assert_eq!(
        config.builder("app").unwrap().artifacts,
        ["dist/*.tar.gz", "out/**/*.zip"]
    );
    assert_eq!(
        config.artifacts,
        ArtifactSettings {
            max_file_bytes: 1000,
            max_build_bytes: 5000,
            retention: Some(Duration::from_secs(7 * 86400)),
            keep_builds: 3,
        }
    );
    let defaults = parse(&with("", "[]")).unwrap();
    assert_eq!(defaults.artifacts, ArtifactSettings::default());
    assert_eq!(
        parse(&with("artifact_retention = \"0s\"", "[]"))
            .unwrap()
            .artifacts
            .retention,
        None
    );

    for (top, artifacts, key, words) in [
        (
            "",
            r#"["/etc/passwd"]"#,
            "builder[0].artifacts[0]",
            "absolute",
        ),
        ("", r#"["dist/../../x"]"#, "builder[0].artifacts[0]", "`..`"),
        (
            "",
            r#"["ok", "[unclosed"]"#,
            "builder[0].artifacts[1]",
            "not a valid glob",
        ),
        ("", r#"[""]"#, "builder[0].artifacts[0]", "empty"),
        (
            "max_artifact_bytes = 0",
            "[]",
            "max_artifact_bytes",
            "at least 1",
        ),
        (
            "max_artifact_bytes = 10\nmax_build_artifact_bytes = 5",
            "[]",
            "max_build_artifact_bytes",
            "less than max_artifact_bytes",
        ),
        (
            "artifact_retention = \"10s\"",
            "[]",
            "artifact_retention",
            "at least 1m",
        ),
    ] {
        let shown = parse(&with(top, artifacts)).unwrap_err().to_string();
        assert!(
            shown.contains(&format!("{key}: ")) && shown.contains(words),
            "{top} {artifacts}: {shown}"
        );
    }
}

#[test]
fn a_command_workers_health_script_reaches_its_provider_and_only_command_may_have_one() {
    let text = r#"
[[worker]]
name = "vm"
latent = { provider = "command", start = "vm-start", stop = "vm-stop", health = "vm-alive" }

[[builder]]
name = "app"
workers = ["vm"]
steps = [{ name = "s", command = "true" }]
"#;
    let config = parse(text).unwrap();
    let settings = crate::latent::settings_from_config(
        config.worker("vm").unwrap(),
        Path::new("/srv/data"),
        Path::new("/srv"),
    )
    .unwrap();
    let crate::latent::ProviderSpec::Command(command) = settings.provider else {
        panic!("a command provider was configured: {settings:?}");
    };
    assert_eq!(command.health.as_deref(), Some("vm-alive"));
    assert_eq!(command.start, "vm-start");

    let without = text.replace(", health = \"vm-alive\"", "");
    let config = parse(&without).unwrap();
    let settings = crate::latent::settings_from_config(
        config.worker("vm").unwrap(),
        Path::new("/d"),
        Path::new("/"),
    )
    .unwrap();
    let crate::latent::ProviderSpec::Command(command) = settings.provider else {
        panic!("a command provider was configured: {settings:?}");
    };
    assert_eq!(command.health, None);

    let process = r#"
[[worker]]
name = "vm"
latent = { provider = "process", health = "vm-alive" }

[[builder]]
name = "app"
workers = ["vm"]
steps = [{ name = "s", command = "true" }]
"#;
    let shown = parse(process).unwrap_err().to_string();
    assert!(
        shown.contains("master.toml:4:")
            && shown.contains("worker[0].latent.health")
            && shown.contains("only provider `command`"),
        "{shown}"
    );
}

#[test]
fn a_client_reads_where_the_master_is_and_skips_the_rest() {
    let reach = |text: &str| MasterReach::parse(text, Path::new("master.toml"), Path::new("/srv"));
    // `[tls]` after the workers, and a worker entry the full check refuses:
    // the client still finds the master (the running one checked its file).
    let text = format!(
        r#"
listen = "0.0.0.0:9443"
data_dir = "state"

[[worker]]
name = "b1"
token_sha256 = "{HASH}"
colour = "blue"

[tls]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"
"#
    );
    assert!(parse(&text).is_err(), "the full check refuses `colour`");
    let got = reach(&text).unwrap();
    assert_eq!(got.listen, "0.0.0.0:9443".parse().unwrap());
    assert_eq!(got.data_dir, Path::new("/srv/state"));
    assert_eq!(
        got.tls,
        TlsMode::Files {
            cert: "/srv/tls/cert.pem".into(),
            key: "/srv/tls/key.pem".into(),
        }
    );
    // The same answer as the full parse of a valid file.
    let valid = format!("insecure = true\n[[worker]]\nname = \"b1\"\ntoken_sha256 = \"{HASH}\"\n");
    assert_eq!(
        reach(&valid).unwrap(),
        MasterReach::from(&parse(&valid).unwrap())
    );
    // What it reads is checked, and the error says where.
    let err = reach("listen = \"nowhere\"\n").unwrap_err().to_string();
    assert!(
        err.contains("listen") && err.contains("not an address"),
        "{err}"
    );
    assert!(err.contains(":1"), "names the line: {err}");
    let err = reach("insecure = true\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("contradict"), "{err}");
    let err = reach("listen = [\n").unwrap_err().to_string();
    assert!(err.contains("master.toml"), "{err}");
}
