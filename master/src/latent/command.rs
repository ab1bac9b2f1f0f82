//! The `command` latent provider: the admin's own `start` and `stop` scripts
//! (the escape hatch for any VM, cloud or wake-on-LAN setup).
//!
//! Each is a command line run with `sh -c` (a script path, or a path with
//! arguments), and gets in its environment:
//! - `NIGHTSHIFT_WORKER_NAME`: the worker's name,
//! - `NIGHTSHIFT_WORKER_TOKEN`: a token made for this start only,
//! - `NIGHTSHIFT_MASTER_URL`: where the agent connects,
//! - `NIGHTSHIFT_MASTER_CA_FILE` / `NIGHTSHIFT_MASTER_CERT_SHA256`: how the
//!   agent trusts the master (when known), `NIGHTSHIFT_MASTER_INSECURE=1` for
//!   plain TCP,
//! - `NIGHTSHIFT_MAX_BUILDS`.
//!
//! The start script's exit status: 0 = started (the agent will connect),
//! [`EXIT_NOT_NOW`] (75, `EX_TEMPFAIL`) = no capacity now, try another
//! worker; anything else = failed. Its last line of output is the reason.
//! The stop script must succeed when there is nothing to stop.

use std::process::Stdio;

use tokio::process::Command;

use super::{BoxFuture, Health, InstanceInfo, LatentProvider, StartOutcome};

/// Exit status of a start script that means "not now" (`EX_TEMPFAIL`).
pub const EXIT_NOT_NOW: i32 = 75;

/// How much of a script's output is kept for the reason.
const REASON_CHARS: usize = 300;

/// `latent = { provider = "command", start = "…", stop = "…" }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSettings {
    /// Command line that starts the instance.
    pub start: String,
    /// Command line that stops it (and succeeds when nothing is left).
    pub stop: String,
    /// Optional command line: exit 0 = the instance exists, else gone.
    pub health: Option<String>,
}

pub struct CommandProvider {
    settings: CommandSettings,
}

impl CommandProvider {
    pub fn new(settings: CommandSettings) -> CommandProvider {
        CommandProvider { settings }
    }
}

/// The environment every script gets.
pub fn script_env(instance: &InstanceInfo) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NIGHTSHIFT_WORKER_NAME", instance.worker.clone()),
        ("NIGHTSHIFT_WORKER_TOKEN", instance.token.clone()),
        ("NIGHTSHIFT_MASTER_URL", instance.master.url.clone()),
        ("NIGHTSHIFT_MAX_BUILDS", instance.max_builds.to_string()),
    ];
    if let Some(ca) = &instance.master.ca_file {
        env.push(("NIGHTSHIFT_MASTER_CA_FILE", ca.display().to_string()));
    }
    if let Some(pin) = &instance.master.cert_sha256 {
        env.push(("NIGHTSHIFT_MASTER_CERT_SHA256", pin.clone()));
    }
    if instance.master.insecure {
        env.push(("NIGHTSHIFT_MASTER_INSECURE", "1".into()));
    }
    env
}

/// What a script printed, reduced to a one-line reason: the last non-empty
/// line of stderr, else of stdout.
fn last_line(stdout: &[u8], stderr: &[u8]) -> String {
    let pick = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .map(|line| line.chars().take(REASON_CHARS).collect::<String>())
    };
    pick(stderr).or_else(|| pick(stdout)).unwrap_or_default()
}

struct ScriptRun {
    code: Option<i32>,
    reason: String,
}

async fn run_script(script: &str, instance: &InstanceInfo) -> Result<ScriptRun, String> {
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .envs(script_env(instance))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The master drops this future when start_timeout runs out.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| format!("cannot run `{script}`: {error}"))?;
    Ok(ScriptRun {
        code: output.status.code(),
        reason: last_line(&output.stdout, &output.stderr),
    })
}

fn describe(script: &str, run: &ScriptRun) -> String {
    let status = match run.code {
        Some(code) => format!("exited with {code}"),
        None => "was killed by a signal".to_owned(),
    };
    if run.reason.is_empty() {
        format!("`{script}` {status}")
    } else {
        format!("`{script}` {status}: {}", run.reason)
    }
}

impl LatentProvider for CommandProvider {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn start<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, StartOutcome> {
        Box::pin(async move {
            let script = &self.settings.start;
            match run_script(script, instance).await {
                Err(error) => StartOutcome::Failed(error),
                Ok(run) if run.code == Some(0) => StartOutcome::Started,
                Ok(run) if run.code == Some(EXIT_NOT_NOW) => {
                    StartOutcome::NotNow(if run.reason.is_empty() {
                        format!("`{script}` exited with {EXIT_NOT_NOW} (not now)")
                    } else {
                        run.reason
                    })
                }
                Ok(run) => StartOutcome::Failed(describe(script, &run)),
            }
        })
    }

    fn stop<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let script = &self.settings.stop;
            let run = run_script(script, instance).await?;
            if run.code == Some(0) {
                Ok(())
            } else {
                Err(describe(script, &run))
            }
        })
    }

    fn health<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Health> {
        Box::pin(async move {
            let Some(script) = &self.settings.health else {
                return Health::Unknown;
            };
            match run_script(script, instance).await {
                Err(error) => Health::Gone(error),
                Ok(run) if run.code == Some(0) => Health::Alive,
                Ok(run) => Health::Gone(describe(script, &run)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latent::MasterAccess;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        fs_err::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn instance() -> InstanceInfo {
        InstanceInfo {
            worker: "vm1".into(),
            token: "t0k3n".into(),
            master: MasterAccess {
                url: "wss://master.example:7380".into(),
                ca_file: Some("/etc/nightshift/ca.pem".into()),
                cert_sha256: None,
                insecure: false,
            },
            max_builds: 2,
        }
    }

    #[tokio::test]
    async fn start_script_gets_name_token_and_url_and_exit_0_means_started() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env.txt");
        let start = script(
            dir.path(),
            "start",
            &format!(
                "echo \"$NIGHTSHIFT_WORKER_NAME $NIGHTSHIFT_WORKER_TOKEN $NIGHTSHIFT_MASTER_URL $NIGHTSHIFT_MASTER_CA_FILE $NIGHTSHIFT_MAX_BUILDS\" > {}",
                out.display()
            ),
        );
        let stop = script(dir.path(), "stop", "exit 0");
        let provider = CommandProvider::new(CommandSettings {
            start,
            stop,
            health: None,
        });
        assert_eq!(provider.start(&instance()).await, StartOutcome::Started);
        assert_eq!(
            fs_err::read_to_string(&out).unwrap().trim(),
            "vm1 t0k3n wss://master.example:7380 /etc/nightshift/ca.pem 2"
        );
        assert_eq!(provider.stop(&instance()).await, Ok(()));
        assert_eq!(provider.health(&instance()).await, Health::Unknown);
    }

    #[tokio::test]
    async fn exit_75_means_not_now_with_the_scripts_reason() {
        let dir = tempfile::tempdir().unwrap();
        let start = script(
            dir.path(),
            "start",
            "echo 'quota reached: 8 of 8 VMs' >&2; exit 75",
        );
        let stop = script(dir.path(), "stop", "echo 'no such vm' >&2; exit 3");
        let provider = CommandProvider::new(CommandSettings {
            start,
            stop: stop.clone(),
            health: None,
        });
        assert_eq!(
            provider.start(&instance()).await,
            StartOutcome::NotNow("quota reached: 8 of 8 VMs".into())
        );
        assert_eq!(
            provider.stop(&instance()).await,
            Err(format!("`{stop}` exited with 3: no such vm"))
        );
    }

    #[tokio::test]
    async fn other_exit_codes_and_missing_scripts_fail_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let start = script(
            dir.path(),
            "start",
            "echo booting; echo 'image not found'; exit 1",
        );
        let health = script(dir.path(), "health", "exit 0");
        let provider = CommandProvider::new(CommandSettings {
            start: start.clone(),
            stop: dir.path().join("missing-stop").display().to_string(),
            health: Some(health),
        });
        assert_eq!(
            provider.start(&instance()).await,
            StartOutcome::Failed(format!("`{start}` exited with 1: image not found"))
        );
        let err = provider.stop(&instance()).await.unwrap_err();
        assert!(
            err.contains("missing-stop") && err.contains("exited with 127"),
            "{err}"
        );
        assert_eq!(provider.health(&instance()).await, Health::Alive);
    }
}
