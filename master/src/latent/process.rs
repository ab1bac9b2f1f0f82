//! The `process` latent provider: starts a local `worker run` process (the
//! `worker` executable next to the master's own) with a `worker.toml`
//! generated in `<data_dir>/latent/<worker>/`, and stops it with SIGTERM
//! (SIGKILL after a grace period). Used by the tests and for machines that
//! should run agents only while there is work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::{BoxFuture, Health, InstanceInfo, LatentProvider, StartOutcome};

/// `latent = { provider = "process", … }` plus what the master knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSettings {
    /// The `worker` executable; `None` = `worker` in the master executable's
    /// directory.
    pub worker_binary: Option<PathBuf>,
    /// The master's `data_dir`; each instance lives in
    /// `<data_dir>/latent/<worker>/`.
    pub data_dir: PathBuf,
    /// The agent's work directory; `None` = `work` in the instance
    /// directory.
    pub workdir: Option<PathBuf>,
    /// How long a stopped agent may take to exit after SIGTERM.
    pub stop_grace: Duration,
}

pub struct ProcessProvider {
    settings: ProcessSettings,
    children: Mutex<HashMap<String, Child>>,
}

impl ProcessProvider {
    pub fn new(settings: ProcessSettings) -> ProcessProvider {
        ProcessProvider {
            settings,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<String, Child>> {
        self.children
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn worker_binary(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.settings.worker_binary {
            return Ok(path.clone());
        }
        let master = std::env::current_exe()
            .map_err(|e| format!("cannot locate the master executable: {e}"))?;
        let dir = master
            .parent()
            .ok_or_else(|| format!("{} has no parent directory", master.display()))?;
        Ok(dir.join("worker"))
    }

    /// `<data_dir>/latent/<worker>/`
    pub fn instance_dir(&self, worker: &str) -> PathBuf {
        self.settings.data_dir.join("latent").join(worker)
    }

    #[allow(
        unsafe_code,
        reason = "pre_exec sets the parent-death signal between fork and exec"
    )]
    fn spawn(&self, instance: &InstanceInfo) -> Result<Child, String> {
        let binary = self.worker_binary()?;
        if !binary.is_file() {
            return Err(format!("worker executable {} not found", binary.display()));
        }
        let dir = self.instance_dir(&instance.worker);
        let workdir = self
            .settings
            .workdir
            .clone()
            .unwrap_or_else(|| dir.join("work"));
        fs_err::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        fs_err::create_dir_all(&workdir)
            .map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
        let config = dir.join("worker.toml");
        write_private(&config, &render_worker_toml(instance, &dir, &workdir))?;
        let log_path = dir.join("agent.log");
        let log = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map(fs_err::File::into_file)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut command = Command::new(&binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Signals for the master's terminal (Ctrl-C) are the master's;
            // the master stops its instances itself.
            .process_group(0);
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe,
        // between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // An instance must not outlive the master that started it
                // (its token dies with the master). The signal is tied to
                // the forking thread, a runtime worker that lives as long as
                // the master's runtime.
                nix::sys::prctl::set_pdeathsig(Some(Signal::SIGTERM)).map_err(std::io::Error::from)
            });
        }
        command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))
    }
}

/// Writes `text` to `path` readable by the owner only (it holds a token).
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    use std::io::Write;
    let mut file = fs_err::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// TOML string literal (basic string with escapes).
fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The `worker.toml` of one instance.
pub fn render_worker_toml(instance: &InstanceInfo, dir: &Path, workdir: &Path) -> String {
    let mut text = String::from(
        "# Generated by the nightshift master for a latent worker; rewritten at every start.\n",
    );
    text.push_str(&format!("name = {}\n", toml_str(&instance.worker)));
    text.push_str(&format!("master = {}\n", toml_str(&instance.master.url)));
    text.push_str(&format!("token = {}\n", toml_str(&instance.token)));
    text.push_str(&format!(
        "workdir = {}\n",
        toml_str(&workdir.display().to_string())
    ));
    text.push_str(&format!(
        "state_dir = {}\n",
        toml_str(&dir.join("state").display().to_string())
    ));
    text.push_str(&format!("max_builds = {}\n", instance.max_builds));
    if instance.master.insecure {
        text.push_str("insecure = true\n");
    }
    text.push_str("\n[tls]\n");
    if let Some(ca) = &instance.master.ca_file {
        text.push_str(&format!(
            "ca_file = {}\n",
            toml_str(&ca.display().to_string())
        ));
    }
    if let Some(pin) = &instance.master.cert_sha256 {
        text.push_str(&format!("pin_sha256 = {}\n", toml_str(pin)));
    }
    // Several instances share this machine: each control plane takes a free
    // port (the CLI reaches it through the Unix socket in state_dir).
    text.push_str("\n[control]\nlisten = \"127.0.0.1:0\"\n");
    text
}

impl LatentProvider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn start<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, StartOutcome> {
        Box::pin(async move {
            // A leftover process of an earlier start goes first.
            let leftover = self.children().remove(&instance.worker);
            if let Some(child) = leftover {
                terminate(child, self.settings.stop_grace).await;
            }
            match self.spawn(instance) {
                Ok(child) => {
                    self.children().insert(instance.worker.clone(), child);
                    StartOutcome::Started
                }
                Err(error) => StartOutcome::Failed(error),
            }
        })
    }

    fn stop<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let child = self.children().remove(&instance.worker);
            if let Some(child) = child {
                terminate(child, self.settings.stop_grace).await;
            }
            Ok(())
        })
    }

    fn health<'a>(&'a self, instance: &'a InstanceInfo) -> BoxFuture<'a, Health> {
        Box::pin(async move {
            let mut children = self.children();
            match children.get_mut(&instance.worker) {
                None => Health::Gone("no process was started".into()),
                Some(child) => match child.try_wait() {
                    Ok(None) => Health::Alive,
                    Ok(Some(status)) => Health::Gone(format!("worker process exited ({status})")),
                    Err(error) => Health::Gone(format!("cannot check the worker process: {error}")),
                },
            }
        })
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
async fn terminate(mut child: Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "latent worker process ignored SIGTERM; killing it"
        );
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latent::MasterAccess;
    use std::os::unix::fs::PermissionsExt;

    fn instance() -> InstanceInfo {
        InstanceInfo {
            worker: "local-1".into(),
            token: "abc\"def".into(),
            master: MasterAccess {
                url: "wss://127.0.0.1:7380".into(),
                ca_file: None,
                cert_sha256: Some("ab12".into()),
                insecure: false,
            },
            max_builds: 1,
        }
    }

    /// A stand-in `worker` that records its arguments and waits for SIGTERM.
    fn fake_worker(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("worker");
        fs_err::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Waits (bounded) until the fake worker has installed its signal
    /// handler and said so with a file: the script's own readiness signal.
    async fn wait_for_file(path: &Path) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn generated_config_escapes_values_and_names_the_instance_dir() {
        let text = render_worker_toml(
            &instance(),
            Path::new("/data/latent/local-1"),
            Path::new("/data/latent/local-1/work"),
        );
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["name"].as_str(), Some("local-1"));
        assert_eq!(parsed["token"].as_str(), Some("abc\"def"));
        assert_eq!(parsed["master"].as_str(), Some("wss://127.0.0.1:7380"));
        assert_eq!(
            parsed["workdir"].as_str(),
            Some("/data/latent/local-1/work")
        );
        assert_eq!(parsed["tls"]["pin_sha256"].as_str(), Some("ab12"));
        assert_eq!(parsed["control"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(
            parsed["state_dir"].as_str(),
            Some("/data/latent/local-1/state")
        );
        assert_eq!(parsed["max_builds"].as_integer(), Some(1));
    }

    #[tokio::test]
    async fn starts_the_worker_with_a_private_config_and_stops_it_with_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("terminated");
        let binary = fake_worker(
            dir.path(),
            &format!(
                "trap 'touch {}; exit 0' TERM\necho \"$@\" > args.txt\nwhile :; do sleep 0.05; done",
                marker.display()
            ),
        );
        let provider = ProcessProvider::new(ProcessSettings {
            worker_binary: Some(binary),
            data_dir: dir.path().join("data"),
            workdir: None,
            stop_grace: Duration::from_secs(30),
        });
        assert_eq!(provider.start(&instance()).await, StartOutcome::Started);
        let instance_dir = provider.instance_dir("local-1");
        wait_for_file(&instance_dir.join("args.txt")).await;
        let config = instance_dir.join("worker.toml");
        let mode = fs_err::metadata(&config).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "worker.toml holds a token");
        assert_eq!(provider.health(&instance()).await, Health::Alive);
        provider.stop(&instance()).await.unwrap();
        assert!(marker.exists(), "the agent got SIGTERM and ran its handler");
        let args = fs_err::read_to_string(instance_dir.join("args.txt")).unwrap();
        assert_eq!(args.trim(), format!("run --config {}", config.display()));
        assert_eq!(
            provider.health(&instance()).await,
            Health::Gone("no process was started".into())
        );
        // Stopping again is harmless.
        provider.stop(&instance()).await.unwrap();
    }

    #[tokio::test]
    async fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let binary = fake_worker(
            dir.path(),
            "trap '' TERM\ntouch ready\nwhile :; do sleep 0.05; done",
        );
        let provider = ProcessProvider::new(ProcessSettings {
            worker_binary: Some(binary),
            data_dir: dir.path().join("data"),
            workdir: None,
            stop_grace: Duration::from_millis(200),
        });
        assert_eq!(provider.start(&instance()).await, StartOutcome::Started);
        wait_for_file(&provider.instance_dir("local-1").join("ready")).await;
        tokio::time::timeout(Duration::from_secs(30), provider.stop(&instance()))
            .await
            .expect("stop returns after SIGKILL")
            .unwrap();
    }

    #[tokio::test]
    async fn a_missing_worker_binary_fails_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let provider = ProcessProvider::new(ProcessSettings {
            worker_binary: Some(dir.path().join("nope")),
            data_dir: dir.path().join("data"),
            workdir: None,
            stop_grace: Duration::from_secs(1),
        });
        match provider.start(&instance()).await {
            StartOutcome::Failed(reason) => assert!(reason.contains("not found"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
