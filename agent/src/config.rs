//! `worker.toml`: the agent's settings, loaded with every error located by file,
//! line, column and key, and checked (token, master URL, TLS, policies) before use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use jiff::tz::TimeZone;
use nightshift_policy::{AvailabilityConfig, DurationSpec, Policy, PolicyError};
use nightshift_proto::diag::{ConfigErrors, parse_toml};
use serde::Deserialize;

use crate::build_processes::priority::BuildSettings;
use crate::supervise::{RawSuperviseSettings, SuperviseSettings};

/// Where `worker` looks when `--config` is not given: here first, then /etc.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = ["worker.toml", "/etc/nightshift/worker.toml"];

/// How to trust the master's TLS certificate (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientSettings {
    /// The master's certificate or its CA (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the master's certificate (64 hex digits; `:` allowed), as
    /// printed by `master run`. Normalized to lowercase hex after loading.
    #[serde(default)]
    pub pin_sha256: Option<String>,
}

/// The local control plane (`[control]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    #[serde(
        default = "default_control_listen",
        deserialize_with = "deserialize_listen"
    )]
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` address (token and Origin checks still apply).
    #[serde(default)]
    pub allow_remote: bool,
    /// Where the control token is kept; default `control.token` in `state_dir`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            listen: default_control_listen(),
            allow_remote: false,
            token_file: None,
        }
    }
}

/// The default control-plane address: loopback only, port 7878.
fn default_control_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7878))
}

/// Reads `listen = "127.0.0.1:7878"`, naming the bad text in the error.
fn deserialize_listen<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.trim().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not an IP address and port; write e.g. \"127.0.0.1:7878\" or \"[::1]:7878\""
        ))
    })
}

/// `[git]` in worker.toml: how this worker authenticates to repositories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitAuth {
    /// Private key for ssh:// and `user@host:path` repositories.
    #[serde(default)]
    pub ssh_key: Option<PathBuf>,
    /// File holding an access token for https:// repositories.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// User name sent with the token (default `x-access-token`, which
    /// GitHub, Gitea/Forgejo and GitLab accept for access tokens).
    #[serde(default)]
    pub username: Option<String>,
}

/// `worker.toml` as written (relative paths unresolved, defaults unset).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkerConfig {
    name: String,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    enroll_token_file: Option<PathBuf>,
    #[serde(default)]
    workdir: Option<PathBuf>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default = "one")]
    max_builds: u32,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    tls: TlsClientSettings,
    #[serde(default)]
    control: ControlSettings,
    #[serde(default)]
    availability: AvailabilityConfig,
    #[serde(default)]
    git: GitAuth,
    #[serde(default)]
    builds: BuildSettings,
    #[serde(default)]
    supervise: Option<RawSuperviseSettings>,
}

fn one() -> u32 {
    1
}

/// The agent's validated settings. Relative paths are resolved against the
/// config file's directory.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's name, as the master knows it.
    pub name: String,
    /// The master's URL: `wss://host:port`, or `ws://` with `insecure = true`.
    /// Empty when `[supervise]` runs a CI agent instead.
    pub master: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// A worker group's enrolment token: traded once for this worker's own
    /// token, written to `token_file` (see `worker enroll`).
    pub enroll_token_file: Option<PathBuf>,
    /// Where builds run; default `work` next to the config file.
    pub workdir: PathBuf,
    /// Manual state, spooled results, control token and socket; default
    /// `state` next to the config file.
    pub state_dir: PathBuf,
    /// How many builds may run at once (at least 1).
    pub max_builds: u32,
    /// Allow a plain `ws://` master (tests, trusted networks).
    pub insecure: bool,
    pub tls: TlsClientSettings,
    pub control: ControlSettings,
    pub availability: AvailabilityConfig,
    /// `[git]`: this worker's credentials for checkouts (never sent anywhere).
    pub git: GitAuth,
    /// How builds run beside the owner's work (`[builds]`).
    pub builds: BuildSettings,
    /// How often foreign load is sampled (`[availability.load] sample_every`, default 5s).
    pub load_sample_interval: DurationSpec,
    /// `[supervise]`: the CI agent this worker runs on its owner's terms,
    /// in place of a nightshift master.
    pub supervise: Option<SuperviseSettings>,
}

impl WorkerConfig {
    /// Finds and loads `worker.toml`: `arg` if given, else `./worker.toml`,
    /// else `/etc/nightshift/worker.toml`. Returns the path used and the
    /// config, or every error found (parse and semantic) at once.
    pub fn load(arg: Option<&Path>) -> Result<(PathBuf, WorkerConfig), ConfigErrors> {
        let path = match arg {
            Some(path) => path.to_path_buf(),
            None => match DEFAULT_CONFIG_PATHS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
            {
                Some(path) => path,
                None => {
                    let mut errors = ConfigErrors::new(DEFAULT_CONFIG_PATHS[0]);
                    errors.push(format!(
                        "no config file: tried ./{} and {}; pass --config FILE",
                        DEFAULT_CONFIG_PATHS[0], DEFAULT_CONFIG_PATHS[1]
                    ));
                    return Err(errors);
                }
            },
        };
        let text = match fs_err::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                let mut errors = ConfigErrors::new(&path);
                errors.push(format!("cannot read the config file: {error}"));
                return Err(errors);
            }
        };
        let config = WorkerConfig::parse(&path, &text, TimeZone::system())?;
        Ok((path, config))
    }

    /// Parses and validates config text; `path` names the file in errors and
    /// anchors relative paths; `system_tz` stands in when `timezone` is unset.
    pub fn parse(
        path: &Path,
        text: &str,
        system_tz: TimeZone,
    ) -> Result<WorkerConfig, ConfigErrors> {
        let (raw, mut errors) = parse_toml::<RawWorkerConfig>(path, text);
        let Some(raw) = raw else {
            return Err(errors);
        };
        let base = config_dir(path);
        let supervise = raw.supervise.clone();
        let mut config = resolve(raw, &base);
        config.supervise = supervise
            .map(|raw| crate::supervise::resolve(raw, &base, &config.workdir, &mut errors));
        validate(&mut config, system_tz, &mut errors);
        errors.into_result(config)
    }

    /// The token the worker authenticates with: `token`, or the trimmed
    /// contents of `token_file`.
    pub fn token(&self) -> anyhow::Result<String> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), None) => token.trim().to_owned(),
            (None, Some(file)) => fs_err::read_to_string(file)
                .with_context(|| format!("cannot read token_file {}", file.display()))?
                .trim()
                .to_owned(),
            (Some(_), Some(_)) => bail!("set either `token` or `token_file`, not both"),
            (None, None) => bail!("no token: set `token` or `token_file`"),
        };
        if token.is_empty() {
            bail!("the worker token is empty");
        }
        Ok(token)
    }

    /// The compiled availability policies (validated by `load` already).
    pub fn policy(&self) -> Result<Policy, Vec<PolicyError>> {
        Policy::compile(&self.availability, TimeZone::system())
    }
}

/// The directory relative paths are resolved against (absolute when possible).
fn config_dir(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

fn resolve(raw: RawWorkerConfig, base: &Path) -> WorkerConfig {
    let at_base = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let load_sample_interval = raw
        .availability
        .load
        .as_ref()
        .map_or(DurationSpec::from_secs(5), |load| load.sample_every);
    let mut tls = raw.tls;
    tls.ca_file = tls.ca_file.map(at_base);
    let mut control = raw.control;
    control.token_file = control.token_file.map(at_base);
    WorkerConfig {
        name: raw.name,
        master: raw.master.unwrap_or_default(),
        token: raw.token,
        token_file: raw.token_file.map(at_base),
        enroll_token_file: raw.enroll_token_file.map(at_base),
        workdir: at_base(raw.workdir.unwrap_or_else(|| PathBuf::from("work"))),
        state_dir: at_base(raw.state_dir.unwrap_or_else(|| PathBuf::from("state"))),
        max_builds: raw.max_builds,
        insecure: raw.insecure,
        tls,
        control,
        availability: raw.availability,
        git: GitAuth {
            ssh_key: raw.git.ssh_key.map(at_base),
            token_file: raw.git.token_file.map(at_base),
            username: raw.git.username,
        },
        builds: raw.builds,
        load_sample_interval,
        supervise: None,
    }
}

fn validate(config: &mut WorkerConfig, system_tz: TimeZone, errors: &mut ConfigErrors) {
    validate_name(&config.name, errors);
    if config.supervise.is_some() {
        validate_supervised(config, errors);
    } else {
        validate_master(config, errors);
        validate_token(config, errors);
    }
    for (key, file) in [
        ("git.ssh_key", &config.git.ssh_key),
        ("git.token_file", &config.git.token_file),
    ] {
        if let Some(file) = file
            && let Err(e) = fs_err::metadata(file)
        {
            errors.push_at_path(key, format!("cannot read {}: {e}", file.display()));
        }
    }
    if let Some(name) = &config.git.username
        && (name.is_empty() || name.chars().any(|c| c.is_control() || c == '\n'))
    {
        errors.push_at_path("git.username", "must be a non-empty single line");
    }

    if config.max_builds == 0 {
        errors.push_at_path("max_builds", "max_builds must be at least 1");
    } else if config.max_builds > 1024 {
        errors.push_at_path("max_builds", "max_builds must be at most 1024");
    }
    for (key, problem) in config.builds.problems() {
        errors.push_at_path(key, problem);
    }
    validate_tls_and_control(config, errors);

    if let Err(policy_errors) = Policy::compile(&config.availability, system_tz) {
        for PolicyError { path, message } in policy_errors {
            errors.push_at_path(&path, message);
        }
    }
}

/// A supervising worker talks to no nightshift master: master-link keys
/// would be silently unused, so they are errors.
fn validate_supervised(config: &WorkerConfig, errors: &mut ConfigErrors) {
    let unused = [
        ("master", !config.master.is_empty()),
        ("token", config.token.is_some()),
        ("token_file", config.token_file.is_some()),
        ("enroll_token_file", config.enroll_token_file.is_some()),
    ];
    for (key, set) in unused {
        if set {
            errors.push_at_key(
                key,
                format!("`{key}` is for a nightshift master, but [supervise] runs a CI agent instead (which talks to its own master); remove `{key}`"),
            );
        }
    }
}

fn validate_token(config: &WorkerConfig, errors: &mut ConfigErrors) {
    if let Some(enroll) = &config.enroll_token_file {
        // The token comes from the enrolment, into `token_file`.
        if config.token.is_some() {
            errors.push_at_key(
                "enroll_token_file",
                "`token` and `enroll_token_file` contradict each other: an enrolled worker's token is written to `token_file`",
            );
        } else if config.token_file.is_none() {
            errors.push_at_key(
                "enroll_token_file",
                "also set `token_file`: where the token the enrolment gives this worker is kept",
            );
        }
        match fs_err::read_to_string(enroll) {
            Ok(text) if text.trim().is_empty() => errors.push_at_path(
                "enroll_token_file",
                format!("{} is empty", enroll.display()),
            ),
            Ok(_) => {}
            Err(error) => errors.push_at_path(
                "enroll_token_file",
                format!("cannot read {}: {error}", enroll.display()),
            ),
        }
        return;
    }
    match (&config.token, &config.token_file) {
        (Some(_), Some(_)) => {
            errors.push_at_key("token_file", "set either `token` or `token_file`, not both")
        }
        (None, None) => errors.push_at_path(
            "token",
            "no token: set `token = \"...\"` or `token_file = \"/path/to/token\"` (the master's admin gives you the token)",
        ),
        (Some(token), None) if token.trim().is_empty() => {
            errors.push_at_path("token", "the token is empty")
        }
        (None, Some(file)) => match fs_err::read_to_string(file) {
            Ok(text) if text.trim().is_empty() => {
                errors.push_at_path("token_file", format!("{} is empty", file.display()))
            }
            Ok(_) => {}
            Err(error) => errors.push_at_path(
                "token_file",
                format!("cannot read {}: {error}", file.display()),
            ),
        },
        _ => {}
    }
}

fn validate_tls_and_control(config: &mut WorkerConfig, errors: &mut ConfigErrors) {
    if let Some(pin) = &config.tls.pin_sha256 {
        match nightshift_proto::tls::normalize_pin(pin) {
            Ok(normalized) => config.tls.pin_sha256 = Some(normalized),
            Err(error) => errors.push_at_path("tls.pin_sha256", error.to_string()),
        }
    }
    if let Some(ca) = &config.tls.ca_file
        && !ca.is_file()
    {
        errors.push_at_path(
            "tls.ca_file",
            format!("{} is not a readable file", ca.display()),
        );
    }

    let listen = config.control.listen;
    if !listen.ip().is_loopback() && !config.control.allow_remote {
        errors.push_at_path(
            "control.listen",
            format!(
                "{listen} is not a loopback address; the control plane stays on this machine unless you also set allow_remote = true"
            ),
        );
    } else if !listen.ip().is_loopback() && config.control.token_file.is_none() {
        errors.push_at_path(
            "control.allow_remote",
            format!(
                "other machines may reach {listen} only with a token: also set token_file = \"/path/to/token\" (the token they must send)"
            ),
        );
    }
}

fn validate_name(name: &str, errors: &mut ConfigErrors) {
    if name.is_empty() {
        errors.push_at_path("name", "the worker name is empty");
    } else if name.len() > 64 {
        errors.push_at_path("name", "the worker name is longer than 64 characters");
    } else if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        errors.push_at_path(
            "name",
            format!(
                "the worker name \"{name}\" contains {bad:?}; use letters, digits, `-`, `_` and `.`"
            ),
        );
    }
}

fn validate_master(config: &WorkerConfig, errors: &mut ConfigErrors) {
    if config.master.is_empty() {
        errors.push_at_path(
            "master",
            "no master: set `master = \"wss://host:port\"`, or add a [supervise] section to run a CI agent instead",
        );
        return;
    }
    let url = config.master.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => {
            errors.push_at_path(
                "master",
                format!("\"{url}\" is not a URL; write e.g. \"wss://master.example.org:8443\""),
            );
            return;
        }
    };
    match scheme.as_str() {
        "wss" => {
            if config.tls.ca_file.is_none() && config.tls.pin_sha256.is_none() {
                errors.push_at_path(
                    "master",
                    "a wss:// master needs a way to trust its certificate: set `[tls] ca_file` (its certificate or CA) or `[tls] pin_sha256` (printed by `master run`)",
                );
            }
        }
        "ws" if config.insecure => {}
        "ws" => errors.push_at_path(
            "master",
            "ws:// sends the token unencrypted; use wss://, or set insecure = true (tests and trusted networks only)",
        ),
        other => {
            errors.push_at_path(
                "master",
                format!("unsupported scheme \"{other}\" in \"{url}\"; use wss:// (or ws:// with insecure = true)"),
            );
            return;
        }
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    match url.parse::<hyper::Uri>() {
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) && !authority.contains('@') => {}
        _ => errors.push_at_path(
            "master",
            format!("\"{url}\" has no valid host; write e.g. \"wss://master.example.org:8443\""),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WorkerConfig, String> {
        WorkerConfig::parse(Path::new("/srv/w/worker.toml"), text, TimeZone::UTC)
            .map_err(|e| e.to_string())
    }

    const MINIMAL: &str =
        "name = \"lab-3\"\nmaster = \"ws://127.0.0.1:9000\"\ninsecure = true\ntoken = \"t0k\"\n";

    #[test]
    fn minimal_config_gets_defaults_next_to_the_file() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.workdir, PathBuf::from("/srv/w/work"));
        assert_eq!(config.state_dir, PathBuf::from("/srv/w/state"));
        assert_eq!(config.max_builds, 1);
        assert_eq!(config.control.listen, default_control_listen());
        assert_eq!(config.load_sample_interval, DurationSpec::from_secs(5));
        assert_eq!(config.token().unwrap(), "t0k");
    }

    #[test]
    fn every_error_is_reported_with_place_and_key() {
        let text = "name = \"lab 3\"\nmaster = \"ws://m:1\"\nmax_bulds = 2\n\n[[availability.schedule]]\nname = \"nights\"\nhours = \"19:00-07:00\"\ndays = \"mnd\"\n\n[[availability.schedule]]\nname = \"lunch\"\nhours = \"12:00-13:00\"\ncolour = \"red\"\n\n[availability.load]\nmax_load1 = 4.0\nfor = \"soon\"\n";
        let errors = parse(text).unwrap_err();
        let lines: Vec<&str> = errors.lines().collect();
        assert_eq!(
            lines,
            [
                "/srv/w/worker.toml:1:8: name: the worker name \"lab 3\" contains ' '; use letters, digits, `-`, `_` and `.`",
                "/srv/w/worker.toml:2:10: master: ws:// sends the token unencrypted; use wss://, or set insecure = true (tests and trusted networks only)",
                "/srv/w/worker.toml:3:1: max_bulds: unknown key `max_bulds`, expected one of `name`, `master`, `token`, `token_file`, `enroll_token_file`, `workdir`, `state_dir`, `max_builds`, `insecure`, `tls`, `control`, `availability`, `git`, `builds`, `supervise`",
                "/srv/w/worker.toml:8:8: availability.schedule[0].days: unknown day \"mnd\", expected mon..sun",
                "/srv/w/worker.toml:13:1: availability.schedule[1].colour: unknown key `colour`, expected one of `name`, `hours`, `days`, `open`, `close`, `state`",
                "/srv/w/worker.toml:17:7: availability.load.for: invalid duration `soon`, expected e.g. `30s`, `2m`, `1h30m`, `2h` or `1d`",
                "/srv/w/worker.toml: token: no token: set `token = \"...\"` or `token_file = \"/path/to/token\"` (the master's admin gives you the token)",
            ],
            "{errors}"
        );
    }

    #[test]
    fn missing_token_and_wss_trust_are_reported() {
        let errors = parse("name = \"w\"\nmaster = \"wss://m.example:8443\"\n").unwrap_err();
        assert!(errors.contains("token: no token"), "{errors}");
        assert!(
            errors.contains("master: a wss:// master needs a way to trust"),
            "{errors}"
        );
        let ok = parse(
            "name = \"w\"\nmaster = \"wss://m.example:8443\"\ntoken = \"x\"\n[tls]\npin_sha256 = \"AB:CD\"\n",
        );
        assert!(ok.unwrap_err().contains("tls.pin_sha256"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("tok"), "secret\n").unwrap();
        let path = dir.path().join("worker.toml");
        let text = "name = \"w\"\nmaster = \"ws://m:1\"\ninsecure = true\ntoken_file = \"tok\"\nworkdir = \"/abs/work\"\nstate_dir = \"st\"\n[control]\ntoken_file = \"ctl.token\"\n";
        let config = WorkerConfig::parse(&path, text, TimeZone::UTC).unwrap();
        assert_eq!(config.token().unwrap(), "secret");
        assert_eq!(config.workdir, PathBuf::from("/abs/work"));
        assert_eq!(config.state_dir, dir.path().join("st"));
        assert_eq!(
            config.control.token_file,
            Some(dir.path().join("ctl.token"))
        );
    }

    #[test]
    fn supervise_replaces_the_master_link() {
        let text = "name = \"ci-1\"\n[supervise]\nkind = \"gitlab-runner\"\n";
        let config = parse(text).unwrap();
        let supervise = config.supervise.unwrap();
        assert_eq!(supervise.command_line(), "gitlab-runner run");
        assert_eq!(supervise.workdir, PathBuf::from("/srv/w/work"));
        assert!(config.master.is_empty());

        let errors = parse(&format!(
            "{MINIMAL}[supervise]\nkind = \"buildkite-agent\"\n"
        ))
        .unwrap_err();
        assert!(
            errors.contains("master: `master` is for a nightshift master"),
            "{errors}"
        );
        assert!(
            errors.contains("token: `token` is for a nightshift master"),
            "{errors}"
        );

        let errors = parse("name = \"w\"\ntoken = \"t\"\n").unwrap_err();
        assert!(errors.contains("master: no master"), "{errors}");
        let errors =
            parse("name = \"w\"\n[supervise]\nkind = \"command\"\nstop_timeout = \"-1s\"\n")
                .unwrap_err();
        assert!(
            errors.contains("supervise.command") && errors.contains("supervise.stop_timeout"),
            "{errors}"
        );
    }

    #[test]
    fn remote_control_needs_allow_remote() {
        let text = format!("{MINIMAL}[control]\nlisten = \"0.0.0.0:7878\"\n");
        assert!(parse(&text).unwrap_err().contains("control.listen"));
        let text = format!("{MINIMAL}[control]\nlisten = \"0.0.0.0:7878\"\nallow_remote = true\n");
        let error = parse(&text).unwrap_err();
        assert!(
            error.contains("control.allow_remote") && error.contains("token_file"),
            "{error}"
        );
        let text = format!(
            "{MINIMAL}[control]\nlisten = \"0.0.0.0:7878\"\nallow_remote = true\ntoken_file = \"/etc/nightshift/control.token\"\n"
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn builds_settings_have_owner_friendly_defaults_and_located_errors() {
        use crate::build_processes::priority::{CgroupUse, CpuPriority, IoPriority};
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.builds.cpu_priority, CpuPriority::Idle);
        assert_eq!(config.builds.io_priority, IoPriority::Idle);
        assert_eq!(config.builds.cpu_weight, 1);
        assert_eq!(config.builds.memory_high, None);

        let text = format!(
            "{MINIMAL}[builds]\ncpu_priority = \"low\"\nio_priority = \"normal\"\ncgroups = \"off\"\ncpu_weight = 20\nmemory_high = \"4G\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.builds.cpu_priority, CpuPriority::Low);
        assert_eq!(config.builds.io_priority, IoPriority::Normal);
        assert_eq!(config.builds.cgroups, CgroupUse::Off);
        assert_eq!(config.builds.cpu_weight, 20);
        assert_eq!(config.builds.memory_high_bytes(), Some(4 << 30));

        let text = format!(
            "{MINIMAL}[builds]\ncpu_priority = \"lowest\"\ncpu_weight = 0\nmemory_high = \"lots\"\n"
        );
        let errors = parse(&text).unwrap_err();
        assert!(
            errors.contains(":6:16: builds.cpu_priority: unknown value `lowest`"),
            "{errors}"
        );
        let text = format!("{MINIMAL}[builds]\ncpu_weight = 0\nmemory_high = \"lots\"\n");
        let errors = parse(&text).unwrap_err();
        assert!(
            errors.contains(":6:14: builds.cpu_weight: cpu_weight 0 is out of range"),
            "{errors}"
        );
        assert!(
            errors.contains(":7:15: builds.memory_high: \"lots\" is not a memory size"),
            "{errors}"
        );
    }
}
