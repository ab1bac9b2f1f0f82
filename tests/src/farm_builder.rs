//! Describing a farm before it starts: its workers, builders and master settings.

use crate::*;

/// One `[[worker]]` of the farm.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub name: String,
    /// The token master.toml knows (as its hash).
    pub token: String,
    /// The token its worker.toml holds, when not `token` (an impostor).
    pub presented_token: Option<String>,
    pub max_builds: u32,
    /// Extra lines for this worker's worker.toml (e.g. `[availability]`).
    pub worker_toml_extra: String,
    /// A cgroup v2 directory the agent is started in (as systemd's
    /// `Delegate=yes` would), see [`test_cgroup`].
    pub cgroup: Option<PathBuf>,
    /// Extra environment of its `worker run`.
    pub env: Vec<(String, String)>,
    /// A member of a `[[worker_group]]`: not written to master.toml; its
    /// worker.toml has this enrolment token (in `enroll_token_file`) and a
    /// `token_file` the enrolment fills.
    pub enroll_token: Option<String>,
}

impl WorkerSpec {
    pub fn new(name: &str) -> WorkerSpec {
        WorkerSpec {
            name: name.to_owned(),
            token: new_token(),
            presented_token: None,
            max_builds: 1,
            worker_toml_extra: String::new(),
            cgroup: None,
            env: Vec::new(),
            enroll_token: None,
        }
    }

    /// A worker that enrols itself in a `[[worker_group]]` with the group's
    /// `enroll_token` (master.toml has no `[[worker]]` for it).
    pub fn enrolled(name: &str, enroll_token: &str) -> WorkerSpec {
        WorkerSpec {
            enroll_token: Some(enroll_token.to_owned()),
            ..WorkerSpec::new(name)
        }
    }

    /// Starts the agent inside `cgroup` (a delegated subtree of its own).
    pub fn in_cgroup(mut self, cgroup: &Path) -> WorkerSpec {
        self.cgroup = Some(cgroup.to_owned());
        self
    }

    /// Its worker.toml holds `token` instead of the one master.toml knows.
    pub fn presents_token(mut self, token: &str) -> WorkerSpec {
        self.presented_token = Some(token.to_owned());
        self
    }
    /// An environment variable for its `worker run`.
    pub fn env(mut self, key: &str, value: &str) -> WorkerSpec {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
    pub fn max_builds(mut self, n: u32) -> WorkerSpec {
        self.max_builds = n;
        self
    }
    /// Appends raw TOML to the worker's worker.toml.
    pub fn worker_toml(mut self, extra: &str) -> WorkerSpec {
        self.worker_toml_extra.push_str(extra);
        self.worker_toml_extra.push('\n');
        self
    }

    /// A worker registered the way an admin does it: the token comes from
    /// `master add-worker NAME`, whose printed `token_sha256` must be the
    /// hash of the token it prints (the farm writes that hash to master.toml).
    pub fn added_by_master(name: &str) -> anyhow::Result<WorkerSpec> {
        let master = bin_dir()?.join("master");
        let output = Command::new(&master)
            .args(["add-worker", name])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {} add-worker", master.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "`master add-worker {name}` exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let quoted_value = |key: &str| {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(" = "))
                .map(|value| value.trim().trim_matches('"').to_owned())
                .with_context(|| {
                    format!("`master add-worker {name}` printed no `{key}` line:\n{stdout}")
                })
        };
        let token = quoted_value("token")?;
        let hash = quoted_value("token_sha256")?;
        if token.is_empty() || hash != sha256_hex(&token) {
            bail!(
                "`master add-worker {name}` printed token_sha256 {hash:?}, which is not the \
                 SHA-256 of its token:\n{stdout}"
            );
        }
        Ok(WorkerSpec {
            token,
            ..WorkerSpec::new(name)
        })
    }
}

/// Describes a farm before it starts.
#[derive(Debug, Clone, Default)]
pub struct FarmBuilder {
    workers: Vec<WorkerSpec>,
    builders: String,
    extra: String,
    missing_timeout: Option<String>,
    insecure: bool,
    master_env: Vec<(String, String)>,
}

pub(super) fn toml_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

impl FarmBuilder {
    pub fn worker(mut self, spec: WorkerSpec) -> FarmBuilder {
        self.workers.push(spec);
        self
    }

    /// A builder running `steps` (name, shell command) on `workers`.
    pub fn builder(mut self, name: &str, workers: &[&str], steps: &[(&str, &str)]) -> FarmBuilder {
        let workers: Vec<String> = workers.iter().map(|w| toml_str(w)).collect();
        let steps: Vec<String> = steps
            .iter()
            .map(|(n, c)| format!("{{ name = {}, command = {} }}", toml_str(n), toml_str(c)))
            .collect();
        let _ = write!(
            self.builders,
            "\n[[builder]]\nname = {}\nworkers = [{}]\nsteps = [{}]\n",
            toml_str(name),
            workers.join(", "),
            steps.join(", ")
        );
        self
    }

    /// Raw TOML appended to master.toml (e.g. `[[lock]]` sections).
    pub fn master_toml(mut self, extra: &str) -> FarmBuilder {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    /// Plain HTTP and `ws://` instead of TLS: `insecure = true` in
    /// master.toml and in every worker.toml (no certificate pin).
    pub fn insecure(mut self) -> FarmBuilder {
        self.insecure = true;
        self
    }

    /// An environment variable for every start of the master (e.g. a test
    /// hook such as `NIGHTSHIFT_TEST_TRIGGER_CLOCK`).
    pub fn master_env(mut self, key: &str, value: &str) -> FarmBuilder {
        self.master_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `missing_timeout` of master.toml, e.g. `"3s"`.
    pub fn missing_timeout(mut self, timeout: &str) -> FarmBuilder {
        self.missing_timeout = Some(timeout.to_owned());
        self
    }

    /// Writes master.toml and starts the master; returns once it is ready.
    /// The master binds port 0 and reports the port it got on its ready
    /// line, which is then written into master.toml (for the CLI, worker
    /// configs and restarts on the same port).
    pub async fn start(self) -> anyhow::Result<Farm> {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-e2e-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let mut text = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n".to_owned();
        if self.insecure {
            text.push_str("insecure = true\n");
        }
        if let Some(timeout) = &self.missing_timeout {
            let _ = writeln!(text, "missing_timeout = {}", toml_str(timeout));
        }
        text.push_str(&self.extra);
        for w in self.workers.iter().filter(|w| w.enroll_token.is_none()) {
            let _ = write!(
                text,
                "\n[[worker]]\nname = {}\ntoken_sha256 = \"{}\"\nmax_builds = {}\n",
                toml_str(&w.name),
                sha256_hex(&w.token),
                w.max_builds
            );
        }
        text.push_str(&self.builders);
        let config = dir.path().join("master.toml");
        fs_err::write(&config, &text).context("cannot write master.toml")?;
        let mut farm = Farm {
            bin: bin_dir()?,
            config,
            port: 0,
            insecure: self.insecure,
            master_env: self.master_env,
            workers: self.workers,
            master: None,
            agents: BTreeMap::new(),
            configured: std::collections::BTreeSet::new(),
            dir,
        };
        farm.start_master().await?;
        Ok(farm)
    }
}
