//! `[supervise]` in `worker.toml`: which CI agent the worker runs in place of
//! a nightshift master link, with each preset's signal contract, checked
//! before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightshift_policy::DurationSpec;
use nightshift_proto::diag::ConfigErrors;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// The CI agents with a known graceful-stop contract, plus any command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SupervisedKind {
    /// Buildbot's `buildbot-worker start --nodaemon`: SIGHUP finishes the
    /// running build, disconnects and exits 0 when `buildbot.tac` says
    /// `allow_shutdown = 'signal'`; SIGTERM stops the reactor at once.
    BuildbotWorker,
    /// `gitlab-runner run`: SIGQUIT stops asking for jobs and exits when the
    /// running ones finish; SIGTERM aborts the jobs.
    GitlabRunner,
    /// `buildkite-agent start`: the first SIGTERM finishes the running job
    /// and disconnects; SIGQUIT cancels the job and disconnects.
    BuildkiteAgent,
    /// Any other agent: `command` is required, the signals are configurable.
    Command,
}

impl SupervisedKind {
    pub fn name(self) -> &'static str {
        match self {
            SupervisedKind::BuildbotWorker => "buildbot-worker",
            SupervisedKind::GitlabRunner => "gitlab-runner",
            SupervisedKind::BuildkiteAgent => "buildkite-agent",
            SupervisedKind::Command => "command",
        }
    }

    /// The preset's program and arguments, when `command` is not given.
    fn default_command(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            SupervisedKind::BuildbotWorker => {
                Some(("buildbot-worker", &["start", "--nodaemon", "."]))
            }
            SupervisedKind::GitlabRunner => Some(("gitlab-runner", &["run"])),
            SupervisedKind::BuildkiteAgent => Some(("buildkite-agent", &["start"])),
            SupervisedKind::Command => None,
        }
    }

    /// The preset's (graceful, hard) stop signals.
    fn default_signals(self) -> (Signal, Signal) {
        match self {
            SupervisedKind::BuildbotWorker => (Signal::SIGHUP, Signal::SIGTERM),
            SupervisedKind::GitlabRunner => (Signal::SIGQUIT, Signal::SIGTERM),
            SupervisedKind::BuildkiteAgent => (Signal::SIGTERM, Signal::SIGQUIT),
            SupervisedKind::Command => (Signal::SIGTERM, Signal::SIGKILL),
        }
    }
}

/// What a `reluctant` presence does to the supervised agent: a foreign
/// master has no way to say "use this worker last", so it either serves
/// like `available` or stops like `away`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReluctantAction {
    #[default]
    Run,
    Stop,
}

/// `[supervise]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSuperviseSettings {
    kind: SupervisedKind,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    graceful_signal: Option<String>,
    #[serde(default)]
    hard_signal: Option<String>,
    #[serde(default)]
    stop_timeout: Option<DurationSpec>,
    #[serde(default)]
    workdir: Option<PathBuf>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    reluctant: ReluctantAction,
}

/// The validated `[supervise]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SuperviseSettings {
    pub kind: SupervisedKind,
    /// The program (looked up in `PATH` when it has no `/`).
    pub command: String,
    pub args: Vec<String>,
    /// Sent when the worker turns away or offline: finish the job, then exit.
    pub graceful_signal: Signal,
    /// Sent when the agent ignores the graceful signal for `stop_timeout`,
    /// or at a `worker stop --deadline`; SIGKILL to its process group follows
    /// [`HARD_STOP_GRACE`] later.
    pub hard_signal: Signal,
    /// How long the current job may go on after the graceful signal.
    pub stop_timeout: Duration,
    /// Where the agent runs; default the worker's `workdir`.
    pub workdir: PathBuf,
    /// Run as this user (the worker agent must be root to switch).
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    pub reluctant: ReluctantAction,
}

/// Between the hard-stop signal and SIGKILL to the whole process group.
pub const HARD_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default `stop_timeout`: a job may finish for this long after `away`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

impl SuperviseSettings {
    /// The command line, for logs and the status page.
    pub fn command_line(&self) -> String {
        std::iter::once(self.command.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Resolves paths against `base` and the worker's `workdir`, fills in the
/// preset, and reports every problem under `supervise.*`.
pub fn resolve(
    raw: RawSuperviseSettings,
    base: &Path,
    worker_workdir: &Path,
    errors: &mut ConfigErrors,
) -> SuperviseSettings {
    let preset = raw.kind.default_command();
    // `command` replaces the preset's program (e.g. a full path), `args`
    // its arguments; each keeps the preset's value when not given.
    let preset_args = || -> Vec<String> {
        preset
            .map(|(_, args)| args.iter().map(|arg| (*arg).to_owned()).collect())
            .unwrap_or_default()
    };
    let (command, args) = match (raw.command, preset) {
        (Some(command), _) => (command, raw.args.unwrap_or_else(preset_args)),
        (None, Some((command, _))) => (command.to_owned(), raw.args.unwrap_or_else(preset_args)),
        (None, None) => {
            errors.push_at_path(
                "supervise.command",
                "kind = \"command\" needs `command = \"/path/to/agent\"` (and optionally `args = [...]`)",
            );
            (String::new(), raw.args.unwrap_or_default())
        }
    };
    if command.trim().is_empty() && raw.kind != SupervisedKind::Command {
        errors.push_at_path("supervise.command", "the command is empty");
    }
    let (default_graceful, default_hard) = raw.kind.default_signals();
    let graceful_signal = match raw.graceful_signal.as_deref().map(parse_signal) {
        None => default_graceful,
        Some(Ok(Signal::SIGKILL | Signal::SIGSTOP)) => {
            errors.push_at_path(
                "supervise.graceful_signal",
                "SIGKILL and SIGSTOP cannot be handled, so they cannot ask for a graceful stop; use e.g. \"SIGTERM\", \"SIGQUIT\" or \"SIGHUP\"",
            );
            default_graceful
        }
        Some(Ok(signal)) => signal,
        Some(Err(message)) => {
            errors.push_at_path("supervise.graceful_signal", message);
            default_graceful
        }
    };
    let hard_signal = match raw.hard_signal.as_deref().map(parse_signal) {
        None => default_hard,
        Some(Ok(Signal::SIGSTOP)) => {
            errors.push_at_path(
                "supervise.hard_signal",
                "SIGSTOP only pauses the agent; use e.g. \"SIGTERM\" or \"SIGKILL\"",
            );
            default_hard
        }
        Some(Ok(signal)) => signal,
        Some(Err(message)) => {
            errors.push_at_path("supervise.hard_signal", message);
            default_hard
        }
    };
    let stop_timeout = match raw.stop_timeout {
        None => DEFAULT_STOP_TIMEOUT,
        Some(spec) if spec.get() <= jiff::SignedDuration::ZERO => {
            errors.push_at_path(
                "supervise.stop_timeout",
                "stop_timeout must be positive, e.g. \"30m\"",
            );
            DEFAULT_STOP_TIMEOUT
        }
        Some(spec) => spec.to_std(),
    };
    let workdir = match raw.workdir {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => base.join(dir),
        None => worker_workdir.to_path_buf(),
    };
    if let Some(user) = &raw.user {
        match nix::unistd::User::from_name(user) {
            Ok(Some(_)) => {}
            Ok(None) => errors.push_at_path("supervise.user", format!("no user named \"{user}\"")),
            Err(error) => errors.push_at_path(
                "supervise.user",
                format!("cannot look up user \"{user}\": {error}"),
            ),
        }
    }
    for name in raw.env.keys() {
        if name.is_empty() || name.contains(['=', '\0']) {
            errors.push_at_path(
                &format!("supervise.env.{name}"),
                "an environment variable name must be non-empty and contain no `=`",
            );
        }
    }
    if raw.kind == SupervisedKind::BuildbotWorker
        && graceful_signal == Signal::SIGHUP
        && let Ok(tac) = std::fs::read_to_string(workdir.join("buildbot.tac"))
        && !tac.lines().any(|line| {
            line.split('#')
                .next()
                .is_some_and(says_allow_shutdown_signal)
        })
    {
        errors.push_at_path(
            "supervise.kind",
            format!(
                "{} does not set allow_shutdown = 'signal', so buildbot-worker ignores SIGHUP and could only be stopped hard; create the worker with `buildbot-worker create-worker --allow-shutdown=signal ...` or edit that line",
                workdir.join("buildbot.tac").display()
            ),
        );
    }
    SuperviseSettings {
        kind: raw.kind,
        command,
        args,
        graceful_signal,
        hard_signal,
        stop_timeout,
        workdir,
        user: raw.user,
        env: raw.env,
        reluctant: raw.reluctant,
    }
}

/// `allow_shutdown = 'signal'` (either quote, any spacing).
fn says_allow_shutdown_signal(line: &str) -> bool {
    let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    compact == "allow_shutdown='signal'" || compact == "allow_shutdown=\"signal\""
}

/// `"SIGHUP"`, `"HUP"` or `"hup"`.
fn parse_signal(text: &str) -> Result<Signal, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| format!("\"{text}\" is not a signal name; write e.g. \"SIGTERM\", \"SIGQUIT\", \"SIGHUP\" or \"SIGINT\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str, workdir: &Path) -> Result<SuperviseSettings, String> {
        let raw: RawSuperviseSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut errors = ConfigErrors::new("/srv/w/worker.toml");
        let settings = resolve(raw, Path::new("/srv/w"), workdir, &mut errors);
        errors.into_result(settings).map_err(|e| e.to_string())
    }

    #[test]
    fn presets_carry_their_upstream_signal_contracts() {
        let dir = Path::new("/nonexistent/work");
        let venv = resolve_text(
            "kind = \"buildbot-worker\"\ncommand = \"/venv/bin/buildbot-worker\"",
            dir,
        )
        .unwrap();
        assert_eq!(
            venv.command_line(),
            "/venv/bin/buildbot-worker start --nodaemon ."
        );
        let bb = resolve_text("kind = \"buildbot-worker\"", dir).unwrap();
        assert_eq!(bb.command_line(), "buildbot-worker start --nodaemon .");
        assert_eq!(
            (bb.graceful_signal, bb.hard_signal),
            (Signal::SIGHUP, Signal::SIGTERM)
        );
        assert_eq!(bb.workdir, dir);
        assert_eq!(bb.stop_timeout, DEFAULT_STOP_TIMEOUT);
        assert_eq!(bb.reluctant, ReluctantAction::Run);
        let gl = resolve_text("kind = \"gitlab-runner\"", dir).unwrap();
        assert_eq!(gl.command_line(), "gitlab-runner run");
        assert_eq!(
            (gl.graceful_signal, gl.hard_signal),
            (Signal::SIGQUIT, Signal::SIGTERM)
        );
        let bk = resolve_text("kind = \"buildkite-agent\"\nreluctant = \"stop\"", dir).unwrap();
        assert_eq!(bk.command_line(), "buildkite-agent start");
        assert_eq!(
            (bk.graceful_signal, bk.hard_signal),
            (Signal::SIGTERM, Signal::SIGQUIT)
        );
        assert_eq!(bk.reluctant, ReluctantAction::Stop);
    }

    #[test]
    fn command_kind_needs_a_command_and_takes_its_signals() {
        let dir = Path::new("/w");
        let error = resolve_text("kind = \"command\"", dir).unwrap_err();
        assert!(error.contains("supervise.command"), "{error}");
        let cmd = resolve_text(
            "kind = \"command\"\ncommand = \"/opt/agent\"\nargs = [\"-v\"]\ngraceful_signal = \"quit\"\nhard_signal = \"SIGINT\"\nstop_timeout = \"90s\"\nworkdir = \"ci\"\n[env]\nFOO = \"bar\"\n",
            dir,
        )
        .unwrap();
        assert_eq!(cmd.command_line(), "/opt/agent -v");
        assert_eq!(
            (cmd.graceful_signal, cmd.hard_signal),
            (Signal::SIGQUIT, Signal::SIGINT)
        );
        assert_eq!(cmd.stop_timeout, Duration::from_secs(90));
        assert_eq!(cmd.workdir, PathBuf::from("/srv/w/ci"));
        assert_eq!(cmd.env.get("FOO").map(String::as_str), Some("bar"));
    }

    #[test]
    fn bad_values_are_named() {
        let dir = Path::new("/w");
        let error = resolve_text(
            "kind = \"command\"\ncommand = \"x\"\ngraceful_signal = \"SIGKILL\"\nhard_signal = \"SIGNOPE\"\nstop_timeout = \"0s\"\nuser = \"no-such-user-here\"\n",
            dir,
        )
        .unwrap_err();
        for key in [
            "supervise.graceful_signal",
            "supervise.hard_signal",
            "supervise.stop_timeout",
            "supervise.user",
        ] {
            assert!(error.contains(key), "{key} missing in {error}");
        }
        assert!(toml::from_str::<RawSuperviseSettings>("kind = \"jenkins\"").is_err());
    }

    #[test]
    fn buildbot_tac_without_signal_shutdown_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("buildbot.tac"), "allow_shutdown = None\n").unwrap();
        let error = resolve_text("kind = \"buildbot-worker\"", dir.path()).unwrap_err();
        assert!(error.contains("allow_shutdown = 'signal'"), "{error}");
        std::fs::write(
            dir.path().join("buildbot.tac"),
            "umask = None\nallow_shutdown = 'signal'\n",
        )
        .unwrap();
        assert!(resolve_text("kind = \"buildbot-worker\"", dir.path()).is_ok());
    }
}
