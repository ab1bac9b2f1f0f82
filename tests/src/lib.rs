//! The end-to-end harness: finds the real `master` and `worker` binaries,
//! starts a farm on loopback in a temporary directory (master.toml, data dir,
//! TLS pin, tokens), starts real agents or raw fake agents, waits on
//! conditions with deadlines, and kills every process it started on drop.
//!
//! A typical test:
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use nightshift_tests::{Farm, WorkerSpec};
//! let mut farm = Farm::builder()
//!     .worker(WorkerSpec::new("w1"))
//!     .builder("app", &["w1"], &[("build", "echo hi")])
//!     .start().await?;
//! farm.start_worker("w1")?;
//! let api = farm.api()?;
//! let id = api.submit("app", Default::default()).await?.build_id;
//! let build = farm.wait_build(id).await?;
//! # Ok(()) }
//! ```
//!
//! Agents get a `NOTIFY_SOCKET` the farm reads, so a test can await an
//! agent's `READY=1` ([`Farm::wait_worker_ready`]), run the `worker` CLI
//! against its worker.toml ([`Farm::worker_cli`], also before it ever ran),
//! stop, kill and restart it with the same config and state
//! ([`Farm::stop_worker`], [`Farm::kill_worker`], [`Farm::restart_worker`]),
//! and reach its control plane ([`Farm::worker_control_url`],
//! [`Farm::worker_control_token`]). [`FarmBuilder::insecure`] runs the farm
//! over plain `ws://`; [`WorkerSpec::added_by_master`] takes a worker's
//! token from `master add-worker`.
//!
//! Everything waits with generous deadlines ([`DEADLINE`]) so a loaded CI
//! machine does not make tests flaky; nothing sleeps to "let things settle".

pub mod fleet;
pub mod soak;
pub mod supervised;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use nightshift_policy::{Presence, PresenceState, Source};
use nightshift_proto::api::{ApiClient, BuildInfo, BuildState, MasterUrl, WorkerInfo};
use nightshift_proto::wire::{AgentMessage, BuildId, MasterMessage, PROTOCOL_VERSION, WS_PATH};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long any "this should happen" wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(45);

/// The directory holding the `master` and `worker` binaries the tests run,
/// built from the sources of this checkout: `NIGHTSHIFT_BIN_DIR`, else the
/// `target/<profile>` directory above this test executable, where they are
/// first built (`cargo build --workspace --bins` for that profile, once per
/// test process). Either way, binaries older than any of their sources are
/// refused: a test never passes against yesterday's code.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    static CHECKED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| find_fresh_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn find_fresh_binaries() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("NIGHTSHIFT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("cannot locate the test executable")?;
            // target/<profile>/deps/<test>-<hash> or target/<profile>/<bin>
            let mut dir = exe
                .parent()
                .context("the test executable has no directory")?
                .to_path_buf();
            if dir.file_name().is_some_and(|name| name == "deps") {
                dir.pop();
            }
            build_binaries(&dir)?;
            dir
        }
    };
    for name in ["master", "worker"] {
        let binary = dir.join(name);
        let built = fs_err::metadata(&binary)
            .and_then(|m| m.modified())
            .with_context(|| {
                format!(
                    "cannot find {}: run `cargo build --workspace --bins` (or set NIGHTSHIFT_BIN_DIR)",
                    binary.display()
                )
            })?;
        let own = if name == "master" { "master" } else { "agent" };
        if let Some((source, changed)) = newest_source(&[own, "proto", "policy"])?
            && changed > built
        {
            bail!(
                "{} is older than {}: it was not built from these sources; run `cargo build \
                 --workspace --bins` (with the profile of the tests) and test again",
                binary.display(),
                source.display()
            );
        }
    }
    Ok(dir)
}

/// `cargo build --workspace --bins` for the profile of `dir`
/// (`target/debug` → dev, `target/release` → release). Cargo that waits for
/// the build directory's lock (another cargo holds it) is not waited for:
/// the freshness check then decides.
fn build_binaries(dir: &std::path::Path) -> anyhow::Result<()> {
    if std::env::var_os("NIGHTSHIFT_TEST_NO_BUILD").is_some() {
        return Ok(());
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(name) => name.to_owned(),
        None => bail!("{} is not a target/<profile> directory", dir.display()),
    };
    let target_dir = dir.parent().context("no target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    // The variables cargo set for this test process describe this package,
    // not the build: passed on, they would make the nested build differ from
    // the developer's `cargo build` and rebuild crates that read them.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
                    | "RUST_RECURSION_COUNT"
            )
        {
            command.env_remove(key);
        }
    }
    let mut child = command
        .args(["build", "--workspace", "--bins", "--profile", &profile])
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cargo:?} build"))?;
    let stderr = child.stderr.take().context("no cargo stderr")?;
    let mut said = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.contains("Blocking waiting for file lock") {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        said.push(line);
    }
    let status = child.wait().context("cannot wait for cargo build")?;
    if !status.success() {
        bail!(
            "`cargo build --workspace --bins --profile {profile}` failed ({status}):\n{}",
            said.join("\n")
        );
    }
    Ok(())
}

/// The most recently changed source of one binary: any file under the
/// `src/` of `crates` (its own crate, `proto` and `policy`). A change there
/// always makes cargo rebuild that binary, so a binary older than it is stale;
/// the other binary's sources are not its (cargo does not rebuild it for them).
fn newest_source(crates: &[&str]) -> anyhow::Result<Option<(PathBuf, std::time::SystemTime)>> {
    fn visit(
        path: &std::path::Path,
        newest: &mut Option<(PathBuf, std::time::SystemTime)>,
    ) -> std::io::Result<()> {
        let meta = fs_err::metadata(path)?;
        if meta.is_dir() {
            for entry in fs_err::read_dir(path)? {
                visit(&entry?.path(), newest)?;
            }
        } else {
            let modified = meta.modified()?;
            if newest.as_ref().is_none_or(|(_, t)| modified > *t) {
                *newest = Some((path.to_path_buf(), modified));
            }
        }
        Ok(())
    }
    let root = workspace_root();
    let mut newest = None;
    for krate in crates {
        let path = root.join(krate).join("src");
        visit(&path, &mut newest).with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(newest)
}

/// What identifies the binaries under test: each one's `--version`, size,
/// modification time and SHA-256 prefix, and the checkout's commit (with
/// `-dirty` for uncommitted changes). The bench prints it with its figures.
pub fn binaries_description() -> anyhow::Result<String> {
    let dir = bin_dir()?;
    let mut text = String::new();
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown (not a git checkout)".into());
    let _ = writeln!(text, "sources: {} at {commit}", workspace_root().display());
    for name in ["master", "worker"] {
        let path = dir.join(name);
        let version = Command::new(&path)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let bytes =
            fs_err::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let modified = fs_err::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| jiff::Timestamp::try_from(t).ok())
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "{name}: {} ({version}, {} bytes, built {modified}, sha256 {})",
            path.display(),
            bytes.len(),
            &hex::encode(Sha256::digest(&bytes))[..16]
        );
    }
    Ok(text)
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A fresh random token (128 bits from /dev/urandom, hex).
pub fn new_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if let Err(e) = fs_err::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        panic!("cannot read /dev/urandom for a test token: {e}");
    }
    hex::encode(bytes)
}

/// Calls `check` until it returns `Some`, or fails after `deadline` naming
/// `what`. For conditions only visible through the API; builds should be
/// awaited with [`Farm::wait_build`], which long-polls.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > deadline {
            bail!(
                "timed out after {deadline:?} waiting for {what}{}",
                last_error
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh cgroup v2 directory for an agent to run in (as systemd's
/// `Delegate=yes` gives one), removed with everything under it on drop; or a
/// loud failure. The cgroup tests must run where a cgroup can be created (CI
/// runs as root); `NIGHTSHIFT_SKIP_CGROUP_TESTS=1` skips them explicitly
/// (`Ok(None)`).
pub fn test_cgroup(tag: &str) -> anyhow::Result<Option<TestCgroup>> {
    let made = (|| -> anyhow::Result<PathBuf> {
        let mounts = fs_err::read_to_string("/proc/self/mountinfo")?;
        let mount = mounts
            .lines()
            .find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                (after.split_whitespace().next()? == "cgroup2")
                    .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .context("no cgroup2 mount in /proc/self/mountinfo")?;
        let own = fs_err::read_to_string("/proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?
            .trim_start_matches('/')
            .to_owned();
        let dir = mount
            .join(relative)
            .join(format!("nightshift-e2e-{}-{tag}", std::process::id()));
        fs_err::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    })();
    match made {
        Ok(dir) => Ok(Some(TestCgroup(dir))),
        Err(_) if std::env::var("NIGHTSHIFT_SKIP_CGROUP_TESTS").is_ok_and(|v| v == "1") => {
            eprintln!("cgroup test skipped: NIGHTSHIFT_SKIP_CGROUP_TESTS=1");
            Ok(None)
        }
        Err(error) => Err(error.context(
            "cannot create a cgroup v2 for this test; run as root on a cgroup v2 host, or set NIGHTSHIFT_SKIP_CGROUP_TESTS=1 to skip the cgroup tests",
        )),
    }
}

/// A cgroup made by [`test_cgroup`]; removed (children first) on drop, once
/// the processes in it are gone.
#[derive(Debug)]
pub struct TestCgroup(pub PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = fs_err::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        remove(&entry.path());
                    }
                }
            }
            let _ = fs_err::remove_dir(dir);
        }
        for _ in 0..50 {
            remove(&self.0);
            if !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

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

fn toml_str(text: &str) -> String {
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
        for w in &self.workers {
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

/// A real agent process started by the farm.
pub struct AgentProcess {
    pub child: Child,
    pub config: PathBuf,
    /// Every sd_notify message the agent sent on its `NOTIFY_SOCKET`, in
    /// order (`READY=1`, `STATUS=…`, `STOPPING=1`).
    notifications: tokio::sync::watch::Receiver<Vec<String>>,
}

impl AgentProcess {
    /// The sd_notify messages the agent has sent so far.
    pub fn notifications(&self) -> Vec<String> {
        self.notifications.borrow().clone()
    }

    /// The agent's sd_notify messages as they come, to await one.
    pub fn notifications_watch(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.notifications.clone()
    }
}

/// Binds `path` as the agent's `NOTIFY_SOCKET` and reads it on a thread for
/// as long as the returned receiver (or a clone) lives, so the agent never
/// blocks on a full socket queue. Each datagram's lines become messages.
fn listen_for_notifications(
    path: &std::path::Path,
) -> anyhow::Result<tokio::sync::watch::Receiver<Vec<String>>> {
    use std::os::unix::net::UnixDatagram;
    let _ = fs_err::remove_file(path);
    let socket = UnixDatagram::bind(path)
        .with_context(|| format!("cannot bind the notify socket {}", path.display()))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .context("cannot set the notify socket's read timeout")?;
    let (sender, receiver) = tokio::sync::watch::channel(Vec::new());
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 4096];
        // The timeout only lets the thread notice that nobody listens any more.
        while !sender.is_closed() {
            match socket.recv(&mut buffer) {
                Ok(length) => {
                    let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                    sender.send_modify(|seen| seen.extend(text.lines().map(str::to_owned)));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        // The socket file stays: a restarted agent's new socket may already
        // have replaced it at this path.
    });
    Ok(receiver)
}

/// Resolves when process `pid` has exited (a pidfd turns readable), without
/// reaping it, so its `Child` still gets the exit status.
#[allow(unsafe_code, reason = "pidfd_open has no safe wrapper in nix or std")]
async fn process_exited(pid: u32) -> anyhow::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (or -1); it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        bail!(
            "cannot watch process {pid}: pidfd_open: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is a descriptor pidfd_open just opened for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `fd` is an open descriptor the AsyncFd owns (and so keeps
    // open, unchanged) until it is dropped.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow!("cannot register a pidfd with tokio: {e}"))?;
    let _ready = watched.readable().await?;
    Ok(())
}

/// A running master (and its agents), all killed on drop.
pub struct Farm {
    bin: PathBuf,
    /// master.toml.
    pub config: PathBuf,
    pub port: u16,
    /// Plain HTTP/`ws://` ([`FarmBuilder::insecure`]) instead of TLS.
    insecure: bool,
    /// Environment variables for the master ([`FarmBuilder::master_env`]).
    master_env: Vec<(String, String)>,
    workers: Vec<WorkerSpec>,
    master: Option<Spawned>,
    agents: BTreeMap<String, AgentProcess>,
    /// The workers whose worker.toml is written.
    configured: std::collections::BTreeSet<String>,
    /// The farm's directory (master.toml, data/, worker dirs, logs).
    pub dir: tempfile::TempDir,
}

impl Farm {
    pub fn builder() -> FarmBuilder {
        FarmBuilder::default()
    }

    pub fn master_bin(&self) -> PathBuf {
        self.bin.join("master")
    }

    pub fn worker_bin(&self) -> PathBuf {
        self.bin.join("worker")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> MasterUrl {
        MasterUrl {
            tls: !self.insecure,
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// `wss://127.0.0.1:PORT` (`ws://` for an insecure farm).
    pub fn ws_url(&self) -> String {
        let scheme = if self.insecure { "ws" } else { "wss" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Whether the master speaks plain HTTP/`ws://` ([`FarmBuilder::insecure`]).
    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// The master's certificate pin.
    pub fn pin(&self) -> anyhow::Result<String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let path = self
            .data_dir()
            .join("tls")
            .join(nightshift_proto::tls::SELF_SIGNED_CERT_FILE);
        let cert = CertificateDer::from_pem_file(&path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(nightshift_proto::tls::cert_pin_sha256(cert.as_ref()))
    }

    /// The admin token the master generated.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.data_dir().join("admin.token");
        Ok(fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// A client config trusting the master by its pin.
    pub fn tls_client(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        if self.insecure {
            bail!("this farm's master is insecure (plain HTTP): it has no certificate to trust");
        }
        nightshift_proto::tls::install_crypto_provider();
        nightshift_proto::tls::client_config(None, Some(&self.pin()?))
    }

    /// A typed API client with the admin token.
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        let tls = if self.insecure {
            None
        } else {
            Some(self.tls_client()?)
        };
        ApiClient::new(self.url(), self.admin_token()?, tls)
    }

    /// The spec (and token) of a configured worker.
    pub fn worker_spec(&self, name: &str) -> anyhow::Result<&WorkerSpec> {
        self.workers
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| anyhow!("no worker `{name}` in this farm"))
    }

    /// Starts `master run --config` and waits for its ready line
    /// (`nightshift master ready on URL`). Its stderr goes to `master.log`
    /// in the farm dir. The first start learns the port the master bound.
    pub async fn start_master(&mut self) -> anyhow::Result<()> {
        if self.master.is_some() {
            bail!("the master is already running");
        }
        let log = self.dir.path().join("master.log");
        let stderr = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context("cannot open master.log")?
            .into_file();
        // A relative `--config` from the farm's directory, as an admin types
        // it: paths derived from it must still hold for processes the
        // master starts elsewhere (latent instances).
        let config = self
            .config
            .strip_prefix(self.dir.path())
            .unwrap_or(&self.config)
            .to_path_buf();
        let mut command = Command::new(self.master_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(self.dir.path())
            .env("NIGHTSHIFT_LOG", "info")
            .envs(self.master_env.iter().map(|(k, v)| (k, v)))
            .stderr(stderr);
        let master = Spawned::start("master", command)?;
        let ready = master
            .wait_line("the ready line", |line| {
                line.starts_with("nightshift master ready on")
            })
            .await;
        let ready = match ready {
            Ok(line) => line,
            Err(e) => bail!("{e:#}; its log:\n{}", self.master_log()),
        };
        let port = ready
            .rsplit(':')
            .next()
            .and_then(|port| port.trim().parse::<u16>().ok())
            .with_context(|| format!("no port on the master's ready line {ready:?}"))?;
        if self.port == 0 {
            let text = fs_err::read_to_string(&self.config).context("cannot read master.toml")?;
            let text = text.replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{port}\""),
                1,
            );
            fs_err::write(&self.config, text).context("cannot rewrite master.toml")?;
            self.port = port;
        } else if port != self.port {
            bail!("the master came back on port {port}, not {}", self.port);
        }
        self.master = Some(master);
        Ok(())
    }

    /// SIGKILLs the master (no cleanup at all) and reaps it.
    pub async fn kill_master(&mut self) -> anyhow::Result<()> {
        let mut master = self.master.take().context("the master is not running")?;
        master.signal(nix::sys::signal::Signal::SIGKILL)?;
        master.wait_exit(DEADLINE).await?;
        Ok(())
    }

    /// The master's process id, while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Spawned::pid)
    }

    /// SIGTERMs the master and returns its exit code.
    pub async fn stop_master(&mut self) -> anyhow::Result<Option<i32>> {
        let mut master = self.master.take().context("the master is not running")?;
        master.signal(nix::sys::signal::Signal::SIGTERM)?;
        Ok(master.wait_exit(DEADLINE).await?.code())
    }

    /// What the master printed on stdout so far (the ready lines).
    pub fn master_stdout(&self) -> Vec<String> {
        self.master.as_ref().map(Spawned::lines).unwrap_or_default()
    }

    /// The master's log so far.
    pub fn master_log(&self) -> String {
        fs_err::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    /// The directory of worker `name`: its worker.toml, `work/`, `state/`
    /// and `worker.log`.
    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("workers").join(name)
    }

    /// `name`'s worker.toml (written by [`Farm::write_worker_config`] or
    /// [`Farm::start_worker`]).
    pub fn worker_config(&self, name: &str) -> PathBuf {
        self.worker_dir(name).join("worker.toml")
    }

    /// `name`'s `state_dir` (control socket, token and address, manual state).
    pub fn worker_state_dir(&self, name: &str) -> PathBuf {
        self.worker_dir(name).join("state")
    }

    /// Writes `name`'s worker.toml (token, pin or `insecure`, own dirs, a
    /// free control port, the spec's extra TOML) without starting the agent;
    /// returns its path. For CLI tests that need a config but no agent.
    pub fn write_worker_config(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is running; stop it before rewriting its worker.toml");
        }
        let spec = self.worker_spec(name)?.clone();
        let wdir = self.worker_dir(name);
        fs_err::create_dir_all(wdir.join("work"))
            .with_context(|| format!("cannot create {}", wdir.display()))?;
        let trust = if self.insecure {
            "insecure = true\n".to_owned()
        } else {
            format!("\n[tls]\npin_sha256 = \"{}\"\n", self.pin()?)
        };
        // `insecure` is a top-level key, so it must come before any table.
        let (top, tables) = if self.insecure {
            (trust.as_str(), "")
        } else {
            ("", trust.as_str())
        };
        let text = format!(
            "name = {}\nmaster = \"{}\"\ntoken = {}\nworkdir = {}\nstate_dir = {}\nmax_builds = {}\n{top}{}\n[control]\nlisten = \"127.0.0.1:0\"\n{tables}",
            toml_str(&spec.name),
            self.ws_url(),
            toml_str(spec.presented_token.as_deref().unwrap_or(&spec.token)),
            toml_str(&wdir.join("work").display().to_string()),
            toml_str(&self.worker_state_dir(name).display().to_string()),
            spec.max_builds,
            spec.worker_toml_extra,
        );
        let config = self.worker_config(name);
        fs_err::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        self.configured.insert(name.to_owned());
        Ok(config)
    }

    /// Writes `name`'s worker.toml (see [`Farm::write_worker_config`]) and
    /// starts `worker run` for it. Returns at once; await
    /// [`Farm::wait_worker_ready`] or a state on the master as needed.
    pub fn start_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is already running");
        }
        self.write_worker_config(name)?;
        self.spawn_worker(name)
    }

    /// Starts `name`'s agent again with the worker.toml it had before (after
    /// it exited, was stopped or killed): its state dir, manual state and
    /// log carry over. Returns at once, like [`Farm::start_worker`].
    pub fn restart_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if self.agents.contains_key(name) {
            bail!("worker `{name}` is still running");
        }
        if !self.configured.contains(name) {
            bail!("worker `{name}` has no worker.toml yet: start it with `start_worker`");
        }
        self.spawn_worker(name)
    }

    /// Spawns `worker run --config <name's worker.toml>` with stdout and
    /// stderr appended to its `worker.log` and a `NOTIFY_SOCKET` the farm
    /// reads.
    #[allow(
        unsafe_code,
        reason = "moving the agent into its test cgroup between fork and exec has no safe wrapper"
    )]
    fn spawn_worker(&mut self, name: &str) -> anyhow::Result<&mut AgentProcess> {
        if !self.configured.contains(name) {
            bail!("worker `{name}` has no worker.toml yet");
        }
        let wdir = self.worker_dir(name);
        let config = self.worker_config(name);
        let notify_path = wdir.join("notify.sock");
        let notifications = listen_for_notifications(&notify_path)?;
        let log = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(wdir.join("worker.log"))?
            .into_file();
        let spec = self.worker_spec(name)?.clone();
        let mut command = Command::new(self.worker_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(&wdir)
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(cgroup) = &self.worker_spec(name)?.cgroup {
            let procs =
                std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
            // SAFETY: only async-signal-safe calls (open, write, close) on
            // memory prepared before the fork.
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.worker_bin().display()))?;
        Ok(self.agents.entry(name.to_owned()).or_insert(AgentProcess {
            child,
            config,
            notifications,
        }))
    }

    /// Waits until `name`'s agent tells systemd `READY=1` (its control plane
    /// is bound and its first policy evaluation done). Fails at once if the
    /// agent exits first, and after [`DEADLINE`]; errors carry its log.
    pub async fn wait_worker_ready(&self, name: &str) -> anyhow::Result<()> {
        let agent = self
            .agents
            .get(name)
            .with_context(|| format!("worker `{name}` is not running"))?;
        let mut notifications = agent.notifications.clone();
        let pid = agent.child.id();
        let outcome = tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                seen = notifications.wait_for(|seen| seen.iter().any(|m| m == "READY=1")) => {
                    seen.map(|_| ()).map_err(|_| anyhow!("the notify socket reader stopped"))
                }
                exited = process_exited(pid) => {
                    exited?;
                    bail!("`worker run` for `{name}` exited before it was ready")
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("{e:#}; its log:\n{}", self.worker_log(name)),
            Err(_) => bail!(
                "`worker run` for `{name}` did not report READY=1 within {DEADLINE:?}; its log:\n{}",
                self.worker_log(name)
            ),
        }
    }

    /// Runs the `worker` CLI with `args` against `name`'s worker.toml
    /// (`--config` is appended), whether or not its agent runs; returns
    /// (exit code, stdout, stderr), the code -1 if a signal ended it.
    pub fn worker_cli(&self, name: &str, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let config = self.worker_config(name);
        if !config.is_file() {
            bail!(
                "worker `{name}` has no worker.toml yet ({})",
                config.display()
            );
        }
        let output = Command::new(self.worker_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.worker_bin().display()))?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Runs a `worker … --json` read command for `name`; it must exit 0 and
    /// print JSON, which is returned.
    pub fn worker_cli_json(&self, name: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let (code, stdout, stderr) = self.worker_cli(name, args)?;
        if code != 0 {
            bail!(
                "`worker {}` for `{name}` exited {code}: {stderr}",
                args.join(" ")
            );
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("`worker {}` printed no JSON: {stdout}", args.join(" ")))
    }

    /// `worker stop` (immediate: nothing to finish) for `name`, which must
    /// succeed, then waits for its agent to exit with code 0.
    pub async fn stop_worker(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.agents.contains_key(name) {
            bail!("worker `{name}` is not running");
        }
        let (code, _, stderr) = self.worker_cli(name, &["stop"])?;
        if code != 0 {
            bail!("`worker stop` for `{name}` exited {code}: {stderr}");
        }
        let exit = self.wait_worker_exit(name, DEADLINE).await?;
        if exit != Some(0) {
            bail!(
                "`worker run` for `{name}` exited with {exit:?} after `worker stop`; its log:\n{}",
                self.worker_log(name)
            );
        }
        Ok(())
    }

    /// The address `name`'s agent serves its control plane and status page
    /// on, as it wrote it to `state_dir/control.addr`: `http://HOST:PORT/`.
    pub fn worker_control_url(&self, name: &str) -> anyhow::Result<String> {
        let path = self.worker_state_dir(name).join("control.addr");
        let addr = fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(format!("http://{}/", addr.trim()))
    }

    /// The control token `name`'s agent generated into
    /// `state_dir/control.token` (`Authorization: Bearer …` on its control API).
    pub fn worker_control_token(&self, name: &str) -> anyhow::Result<String> {
        let path = self.worker_state_dir(name).join("control.token");
        Ok(fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// The agent process of `name`, if the farm started it.
    pub fn agent(&mut self, name: &str) -> Option<&mut AgentProcess> {
        self.agents.get_mut(name)
    }

    /// SIGKILLs an agent.
    pub fn kill_worker(&mut self, name: &str) -> anyhow::Result<()> {
        let mut agent = self.agents.remove(name).context("no such running worker")?;
        agent.child.kill()?;
        agent.child.wait()?;
        // The machine "died": its builds die with it.
        kill_recorded_builds(&self.worker_state_dir(name));
        Ok(())
    }

    /// Waits for an agent to exit by itself; returns its exit code.
    pub async fn wait_worker_exit(
        &mut self,
        name: &str,
        deadline: Duration,
    ) -> anyhow::Result<Option<i32>> {
        let mut agent = self.agents.remove(name).context("no such running worker")?;
        Ok(wait_child(&mut agent.child, deadline).await?.code())
    }

    /// Sends `signal` to `name`'s agent.
    pub fn signal_worker(
        &self,
        name: &str,
        signal: nix::sys::signal::Signal,
    ) -> anyhow::Result<()> {
        let agent = self
            .agents
            .get(name)
            .with_context(|| format!("worker `{name}` is not running"))?;
        send_signal(agent.child.id(), signal)
    }

    /// The port of `name`'s control plane (its worker.toml says port 0; the
    /// agent writes the bound address to `state_dir/control.addr`).
    pub fn worker_control_port(&self, name: &str) -> anyhow::Result<u16> {
        let path = self.worker_state_dir(name).join("control.addr");
        let addr = fs_err::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let addr: std::net::SocketAddr = addr
            .trim()
            .parse()
            .with_context(|| format!("{} holds no address: {addr:?}", path.display()))?;
        Ok(addr.port())
    }

    /// A worker's log so far.
    pub fn worker_log(&self, name: &str) -> String {
        fs_err::read_to_string(
            self.dir
                .path()
                .join("workers")
                .join(name)
                .join("worker.log"),
        )
        .unwrap_or_default()
    }

    /// Runs the `master` CLI against this farm; returns (exit code, stdout, stderr).
    pub fn master_cli(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let output = Command::new(self.master_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Waits (long-polling the API) until build `id` is finished.
    pub async fn wait_build(&self, id: BuildId) -> anyhow::Result<BuildInfo> {
        let api = self.api()?;
        let start = Instant::now();
        loop {
            let remaining = DEADLINE.saturating_sub(start.elapsed()).as_secs().max(1);
            let build = api.wait(id, remaining.min(30)).await?;
            if build.state == BuildState::Finished {
                return Ok(build);
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "build {id} did not finish within {DEADLINE:?}: {build:?}\nmaster log:\n{}",
                    self.master_log()
                );
            }
        }
    }

    /// Waits until build `id` satisfies `check`.
    pub async fn wait_build_state(
        &self,
        id: BuildId,
        what: &str,
        check: impl Fn(&BuildInfo) -> bool,
    ) -> anyhow::Result<BuildInfo> {
        let api = self.api()?;
        wait_for(what, DEADLINE, || {
            let api = api.clone();
            let check = &check;
            async move {
                let build = api.build(id).await?;
                Ok(check(&build).then_some(build))
            }
        })
        .await
    }

    /// Waits until the master's view of worker `name` (its API) satisfies
    /// `check`; `what` names the awaited condition in the error, which also
    /// shows the last view.
    pub async fn wait_worker(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&WorkerInfo) -> bool,
    ) -> anyhow::Result<WorkerInfo> {
        let api = self.api()?;
        let last = std::sync::Mutex::new(None);
        let found = wait_for(what, DEADLINE, || {
            let api = api.clone();
            let (check, last) = (&check, &last);
            async move {
                let list = api.workers().await?;
                let worker = list.workers.into_iter().find(|w| w.name == name);
                let matched = worker.as_ref().is_some_and(check);
                if let Ok(mut last) = last.lock() {
                    *last = worker.clone();
                }
                Ok(if matched { worker } else { None })
            }
        })
        .await;
        found.with_context(|| {
            let last = last.lock().map(|l| l.clone()).unwrap_or_default();
            format!("the master's last view of `{name}`: {last:?}")
        })
    }

    /// Waits until the master shows worker `name` as `state`.
    pub async fn wait_worker_state(
        &self,
        name: &str,
        state: PresenceState,
    ) -> anyhow::Result<WorkerInfo> {
        let api = self.api()?;
        wait_for(&format!("worker {name} to be {state}"), DEADLINE, || {
            let api = api.clone();
            async move {
                let list = api.workers().await?;
                Ok(list.workers.into_iter().find(|w| {
                    w.name == name
                        && w.state == state
                        && (state == PresenceState::Offline || w.connected)
                }))
            }
        })
        .await
    }

    /// Connects a raw fake agent as `name` with its configured token.
    pub async fn fake_agent(&self, name: &str, state: PresenceState) -> anyhow::Result<FakeAgent> {
        let token = self.worker_spec(name)?.token.clone();
        let mut agent = FakeAgent::connect(self, Some(&token)).await?;
        agent.hello(name, state, 1, vec![]).await?;
        match agent.recv().await? {
            MasterMessage::Welcome { .. } => Ok(agent),
            other => bail!("expected welcome, got {other:?}"),
        }
    }
}

fn send_signal(pid: u32, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .with_context(|| format!("cannot signal process {pid}"))
}

/// Waits (on a pidfd, not by polling) for `child` to exit, then reaps it;
/// kills it after `deadline`.
async fn wait_child(
    child: &mut Child,
    deadline: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    match tokio::time::timeout(deadline, process_exited(child.id())).await {
        Ok(exited) => {
            exited?;
            Ok(child.wait()?)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not exit within {deadline:?}", child.id());
        }
    }
}

/// A process a test started, its stdout read line by line as it comes (a
/// thread per process); killed on drop.
pub struct Spawned {
    name: String,
    child: Option<Child>,
    lines: tokio::sync::watch::Receiver<Vec<String>>,
}

impl Spawned {
    /// Spawns `command` with stdin closed and stdout read here (stderr as
    /// the caller set it).
    pub fn start(name: &str, mut command: Command) -> anyhow::Result<Spawned> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (sender, lines) = tokio::sync::watch::channel(Vec::new());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sender.send_modify(|seen| seen.push(line));
            }
        });
        Ok(Spawned {
            name: name.to_owned(),
            child: Some(child),
            lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.borrow().clone()
    }

    /// Waits for a stdout line matching `matches` and returns it; fails at
    /// once if the process exits (or closes stdout) first, and after
    /// [`DEADLINE`].
    pub async fn wait_line(
        &self,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let find = |seen: &Vec<String>| seen.iter().find(|l| matches(l)).cloned();
        let mut lines = self.lines.clone();
        let pid = self.pid();
        let outcome = tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                seen = lines.wait_for(|seen| find(seen).is_some()) => seen.ok().and_then(|seen| find(&seen)),
                _ = process_exited(pid) => None,
            }
        })
        .await;
        match outcome {
            Ok(Some(line)) => Ok(line),
            // It may have printed the line just before it ended.
            Ok(None) => find(&self.lines.borrow()).with_context(|| {
                format!(
                    "{} ended before it printed {what}; its stdout:\n{}",
                    self.name,
                    self.lines().join("\n")
                )
            }),
            Err(_) => bail!(
                "{} did not print {what} within {DEADLINE:?}; its stdout:\n{}",
                self.name,
                self.lines().join("\n")
            ),
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// Waits for the process to exit and reaps it; kills it after `deadline`.
    pub async fn wait_exit(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} was already reaped", self.name))?;
        wait_child(&mut child, deadline).await
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGKILLs the process groups of the builds an agent recorded as running
/// in `state_dir/running` (first line of each record: the step's process
/// group, or `-`). A SIGKILLed agent leaves its builds running, as a crashed
/// one would; the tests then end them as a dead machine would.
fn kill_recorded_builds(state_dir: &std::path::Path) {
    let Ok(entries) = fs_err::read_dir(state_dir.join("running")) else {
        return;
    };
    for entry in entries.flatten() {
        let pgid = fs_err::read_to_string(entry.path())
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pgid) = pgid.filter(|pgid| *pgid > 1) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        for spec in &self.workers {
            kill_recorded_builds(&self.worker_state_dir(&spec.name));
        }
        // Latent `process` instances the master started.
        if let Ok(entries) = fs_err::read_dir(self.data_dir().join("latent")) {
            for entry in entries.flatten() {
                kill_recorded_builds(&entry.path().join("state"));
            }
        }
        // The master (a `Spawned`) is killed when it drops.
        self.master = None;
        if std::thread::panicking() {
            eprintln!("--- master log ---\n{}", self.master_log());
            for name in self.agents.keys() {
                eprintln!("--- worker {name} log ---\n{}", self.worker_log(name));
            }
        }
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw WebSocket client speaking the agent protocol by hand: for tests of
/// the master alone (bad tokens, garbage frames, races).
/// How the master answered a WebSocket upgrade it did not accept.
#[derive(Debug, Clone)]
pub struct UpgradeRefusal {
    /// HTTP status (401 for a bad token, 503 at the connection limit).
    pub status: u16,
    /// The `error` of the JSON body.
    pub error: String,
    /// Seconds from the `Retry-After` header, when present.
    pub retry_after: Option<u64>,
}

pub struct FakeAgent {
    ws: WsStream,
}

/// A presence for fake agents.
pub fn presence(state: PresenceState) -> Presence {
    Presence {
        state,
        reason: format!("fake agent says {state}"),
        source: Source::Manual,
        since: jiff::Timestamp::now(),
        until: None,
    }
}

impl FakeAgent {
    /// Opens the WebSocket (TLS, pinned) with `token` as the bearer.
    pub async fn connect(farm: &Farm, token: Option<&str>) -> anyhow::Result<FakeAgent> {
        match FakeAgent::try_connect(farm, token).await? {
            Ok(agent) => Ok(agent),
            Err(refusal) => bail!(
                "the master refused the upgrade: {} {}",
                refusal.status,
                refusal.error
            ),
        }
    }

    /// Opens the WebSocket, or returns how the master refused the upgrade
    /// (an HTTP answer instead of `101 Switching Protocols`).
    pub async fn try_connect(
        farm: &Farm,
        token: Option<&str>,
    ) -> anyhow::Result<Result<FakeAgent, UpgradeRefusal>> {
        let mut request = format!("{}{WS_PATH}", farm.ws_url()).into_client_request()?;
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let connector = if farm.is_insecure() {
            None
        } else {
            Some(tokio_tungstenite::Connector::Rustls(farm.tls_client()?))
        };
        match tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector).await
        {
            Ok((ws, _)) => Ok(Ok(FakeAgent { ws })),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                let error = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
                    .unwrap_or(body);
                Ok(Err(UpgradeRefusal {
                    status: response.status().as_u16(),
                    error,
                    retry_after: response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse().ok()),
                }))
            }
            Err(e) => Err(anyhow::Error::new(e).context("websocket connect")),
        }
    }

    /// Sends a hello.
    pub async fn hello(
        &mut self,
        worker: &str,
        state: PresenceState,
        max_builds: u32,
        running: Vec<BuildId>,
    ) -> anyhow::Result<()> {
        self.send(&AgentMessage::Hello {
            protocol: PROTOCOL_VERSION,
            worker: worker.to_owned(),
            agent_version: "fake".into(),
            max_builds,
            presence: presence(state),
            running,
            outlook: None,
        })
        .await
    }

    pub async fn send(&mut self, message: &AgentMessage) -> anyhow::Result<()> {
        self.send_text(&message.encode()).await
    }

    /// Sends any text frame (garbage included).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next protocol message (pings are answered, not returned); errors
    /// when the connection closes or nothing comes within [`DEADLINE`].
    pub async fn recv(&mut self) -> anyhow::Result<MasterMessage> {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame from the master within {DEADLINE:?}"))?;
            match frame {
                None => bail!("connection closed"),
                Some(Err(e)) => bail!("connection error: {e}"),
                Some(Ok(Message::Text(text))) => {
                    let message = MasterMessage::decode(text.as_str())?;
                    if let MasterMessage::Ping { seq } = message {
                        self.send(&AgentMessage::Pong { seq }).await?;
                        continue;
                    }
                    return Ok(message);
                }
                Some(Ok(Message::Close(frame))) => {
                    bail!(
                        "connection closed: {}",
                        frame.map(|f| f.reason.to_string()).unwrap_or_default()
                    )
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits for the next `StartBuild`; returns its build id.
    pub async fn expect_start(&mut self) -> anyhow::Result<BuildId> {
        loop {
            if let MasterMessage::StartBuild { build_id, .. } = self.recv().await? {
                return Ok(build_id);
            }
        }
    }

    /// Waits until the connection is closed by the master; returns every
    /// message received before (e.g. a `Refused`).
    pub async fn expect_closed(&mut self) -> anyhow::Result<Vec<MasterMessage>> {
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Ok(message) => seen.push(message),
                Err(e)
                    if e.to_string().contains("closed")
                        || e.to_string().contains("connection error") =>
                {
                    return Ok(seen);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts, runs (instantly) and finishes a build with `outcome` and `log`.
    pub async fn finish(
        &mut self,
        build_id: BuildId,
        outcome: nightshift_proto::wire::Outcome,
        log: &str,
    ) -> anyhow::Result<()> {
        use nightshift_proto::wire::{BuildResult, StepResult};
        let now = jiff::Timestamp::now();
        self.send(&AgentMessage::BuildAccepted { build_id }).await?;
        self.send(&AgentMessage::Output {
            build_id,
            step: 0,
            data: log.to_owned(),
        })
        .await?;
        self.send(&AgentMessage::BuildFinished {
            result: BuildResult {
                build_id,
                outcome,
                steps: vec![StepResult {
                    step: 0,
                    outcome,
                    exit_code: Some(if outcome == nightshift_proto::wire::Outcome::Success {
                        0
                    } else {
                        1
                    }),
                    signal: None,
                    started_at: now,
                    finished_at: now,
                }],
                reason: None,
                log: log.to_owned(),
                finished_at: now,
            },
        })
        .await
    }

    /// Reads frames WITHOUT answering heartbeats (a hung agent) until the
    /// master drops the connection; returns how long that took.
    pub async fn stay_silent_until_dropped(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let frame =
                tokio::time::timeout(deadline.saturating_sub(start.elapsed()), self.ws.next())
                    .await
                    .map_err(|_| anyhow!("the master kept a silent connection for {deadline:?}"))?;
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(start.elapsed()),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Closes the connection cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
