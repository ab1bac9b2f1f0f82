//! End-to-end tests of the worker agent against a real master: both binaries
//! started on loopback over TLS, driven through their CLIs and signals.
//!
//! Build steps wait for "gate" files the test creates, so a test decides
//! exactly when a build may finish. Waiting is on log lines the binaries
//! print (read as they arrive) or on process exits, with generous timeouts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nightshift_proto::api::{BuildInfo, BuildList, BuildState, WorkerList};
use nightshift_proto::wire::Outcome;
use sha2::{Digest, Sha256};

/// Long enough for a loaded two-core CI machine.
const PATIENCE: Duration = Duration::from_secs(90);

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NIGHTSHIFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/e2e_agent-… → target/<profile>
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    dir.to_owned()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (or set NIGHTSHIFT_BIN_DIR)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running binary whose stdout and stderr lines are collected as they come.
struct Proc {
    name: String,
    child: Option<Child>,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Proc {
    fn spawn(name: &str, mut command: Command) -> Proc {
        command
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (store, ready) = &*lines;
                    store.lock().unwrap().push(strip_ansi(&line));
                    ready.notify_all();
                }
            });
        }
        Proc {
            name: name.to_owned(),
            child: Some(child),
            lines,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |child| child.id() as i32)
    }

    fn log(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// Waits for an output line containing `needle`, counting only lines
    /// after the first `skip`; returns the index after the match.
    fn wait_line_from(&self, skip: usize, needle: &str) -> usize {
        let (store, ready) = &*self.lines;
        let deadline = Instant::now() + PATIENCE;
        let mut lines = store.lock().unwrap();
        loop {
            if let Some(index) = lines
                .iter()
                .skip(skip)
                .position(|line| line.contains(needle))
            {
                return skip + index + 1;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{} never printed `{needle}`; its output:\n{}",
                self.name,
                lines.join("\n")
            );
            lines = ready.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    fn wait_line(&self, needle: &str) -> usize {
        self.wait_line_from(0, needle)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .unwrap_or_else(|error| panic!("cannot signal {}: {error}", self.name));
    }

    /// Waits for the process to exit (without polling: a thread waits).
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the process was started");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((status, child));
        });
        match rx.recv_timeout(PATIENCE) {
            Ok((status, _)) => status.expect("wait works"),
            Err(_) => panic!("{} did not exit; its output:\n{}", self.name, self.log()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn token_of(worker: &str) -> String {
    format!("token-of-{worker}-0123456789")
}

/// A test farm: one master (restartable on the same port and data dir) and
/// its directory of gate files.
struct Farm {
    dir: tempfile::TempDir,
    port: u16,
    master: Option<Proc>,
    pin: String,
}

impl Farm {
    /// A master with workers `names` and a builder `gated` on all of them
    /// whose one step waits for the gate file of its build id.
    fn start(names: &[&str]) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("gates")).unwrap();
        let port = free_port();
        let mut toml = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\nmissing_timeout = \"2s\"\n\n"
        );
        for name in names {
            toml += &format!(
                "[[worker]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nmax_builds = 1\n\n",
                sha256_hex(&token_of(name))
            );
        }
        let gates = dir.path().join("gates");
        let workers: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
        toml += &format!(
            "[[builder]]\nname = \"gated\"\nworkers = [{}]\nsteps = [\n  {{ name = \"wait\", command = \"n=0; while [ ! -e {gates}/$NIGHTSHIFT_BUILD_ID ]; do n=$((n+1)); [ $n -gt 2400 ] && exit 9; sleep 0.05; done; echo done-$NIGHTSHIFT_BUILD_ID\" }},\n]\n",
            workers.join(", "),
            gates = gates.display()
        );
        toml += &format!(
            "\n[[builder]]\nname = \"env\"\nworkers = [{}]\nsteps = [\n  {{ name = \"env\", command = \"echo notify=${{NOTIFY_SOCKET-unset}} watchdog=${{WATCHDOG_USEC-unset}}\" }},\n]\n",
            workers.join(", ")
        );
        std::fs::write(dir.path().join("master.toml"), toml).unwrap();
        let mut farm = Farm {
            dir,
            port,
            master: None,
            pin: String::new(),
        };
        farm.start_master();
        farm
    }

    fn start_master(&mut self) {
        let mut command = Command::new(binary("master"));
        command
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("master.toml"))
            .current_dir(self.dir.path());
        let master = Proc::spawn("master", command);
        master.wait_line("nightshift master ready");
        let after = master.wait_line("pin_sha256 = ");
        let lines = master.lines.0.lock().unwrap().clone();
        let pin = lines[after - 1]
            .split('"')
            .nth(1)
            .expect("the pin is quoted")
            .to_owned();
        self.pin = pin;
        self.master = Some(master);
    }

    fn master(&self) -> &Proc {
        self.master.as_ref().expect("the master runs")
    }

    fn master_cli(&self, args: &[&str]) -> String {
        let output = Command::new(binary("master"))
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("master.toml"))
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "master {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn submit(&self) -> u64 {
        self.submit_to("gated")
    }

    fn submit_to(&self, builder: &str) -> u64 {
        let out = self.master_cli(&["submit", builder]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("`master submit` printed {out:?}, not a build id"))
    }

    fn open_gate(&self, build_id: u64) {
        std::fs::write(
            self.dir.path().join("gates").join(build_id.to_string()),
            b"",
        )
        .unwrap();
    }

    fn build(&self, build_id: u64) -> BuildInfo {
        let list: BuildList = serde_json::from_str(&self.master_cli(&["builds", "--json"]))
            .expect("`master builds --json` is a build list");
        list.builds
            .into_iter()
            .find(|build| build.id == build_id)
            .unwrap_or_else(|| panic!("build {build_id} is not listed"))
    }

    fn workers(&self) -> WorkerList {
        serde_json::from_str(&self.master_cli(&["workers", "--json"]))
            .expect("`master workers --json` is a worker list")
    }

    /// Waits until the master logs that `build_id` finished, then returns it.
    fn wait_finished(&self, build_id: u64) -> BuildInfo {
        self.master()
            .wait_line(&format!("build {build_id} finished on"));
        let build = self.build(build_id);
        assert_eq!(build.state, BuildState::Finished, "{build:?}");
        build
    }

    fn start_worker(&self, name: &str, availability: &str) -> Worker {
        let mut worker = self.worker(name, availability, &token_of(name));
        worker.start();
        worker
    }

    /// A worker's config, not started yet.
    fn worker(&self, name: &str, availability: &str, token: &str) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "name = \"{name}\"\nmaster = \"wss://127.0.0.1:{port}\"\ntoken = \"{token}\"\n\
             workdir = \"work\"\nstate_dir = \"state\"\nmax_builds = 1\n\n\
             [tls]\npin_sha256 = \"{pin}\"\n\n[control]\nlisten = \"127.0.0.1:0\"\n\n\
             [availability]\ntimezone = \"UTC\"\n{availability}\n",
            port = self.port,
            pin = self.pin,
        );
        let config = dir.path().join("worker.toml");
        std::fs::write(&config, toml).unwrap();
        Worker {
            name: name.to_owned(),
            config,
            dir,
            env: Vec::new(),
            proc: None,
        }
    }
}

struct Worker {
    name: String,
    config: PathBuf,
    dir: tempfile::TempDir,
    env: Vec<(String, PathBuf)>,
    proc: Option<Proc>,
}

impl Worker {
    /// Starts the agent and waits until the master welcomed it.
    fn start(&mut self) {
        self.spawn();
        self.proc().wait_line("connected to the master");
    }

    /// Starts the agent without waiting for anything.
    fn spawn(&mut self) {
        let mut command = Command::new(binary("worker"));
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(key, value)| (key, value)));
        let proc = Proc::spawn(&self.name, command);
        self.proc = Some(proc);
    }

    fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("the worker runs")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("worker"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    fn wait_started(&self, build_id: u64) {
        self.proc()
            .wait_line(&format!("starting build {build_id} "));
    }
}

/// Builds handed to the same worker would run there; builds here gate on
/// files, so a test opens each gate when it wants the build to end.
#[test]
fn a_worker_turned_away_mid_build_finishes_it_and_gets_no_new_one() {
    let farm = Farm::start(&["w1", "w2"]);
    let w1 = farm.start_worker("w1", "default = \"available\"");
    let first = farm.submit();
    w1.wait_started(first);

    let output = w1.cli(&["set-availability", "away", "--reason", "owner is back"]);
    assert!(
        output.status.success(),
        "set-availability failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    farm.master().wait_line("worker w1 is away");
    let w2 = farm.start_worker("w2", "default = \"available\"");
    let second = farm.submit();
    let third = farm.submit();
    w2.wait_started(second);
    farm.open_gate(second);
    farm.open_gate(third);
    assert_eq!(farm.wait_finished(second).worker.as_deref(), Some("w2"));
    assert_eq!(farm.wait_finished(third).worker.as_deref(), Some("w2"));

    // The away worker's own build was never disturbed.
    let running = farm.build(first);
    assert_eq!(running.state, BuildState::Running, "{running:?}");
    assert_eq!(running.worker.as_deref(), Some("w1"));
    let workers = farm.workers();
    let w1_info = workers
        .workers
        .iter()
        .find(|worker| worker.name == "w1")
        .expect("w1 is listed");
    assert_eq!(w1_info.state.as_str(), "away");
    assert_eq!(w1_info.running, vec![first]);

    farm.open_gate(first);
    let first = farm.wait_finished(first);
    assert_eq!(first.worker.as_deref(), Some("w1"));
    assert_eq!(first.outcome, Some(Outcome::Success));
    assert!(
        !w1.proc()
            .log()
            .contains(&format!("starting build {second} "))
    );
    assert!(
        !w1.proc()
            .log()
            .contains(&format!("starting build {third} "))
    );
}

#[test]
fn a_graceful_stop_exits_zero_after_its_build_and_the_queued_request_runs_elsewhere() {
    let farm = Farm::start(&["w1", "w2"]);
    let mut w1 = farm.start_worker("w1", "default = \"available\"");
    let first = farm.submit();
    w1.wait_started(first);

    let output = w1.cli(&["stop", "--graceful"]);
    assert!(
        output.status.success(),
        "worker stop --graceful failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    w1.proc().wait_line("stopping gracefully");
    let second = farm.submit();
    let w2 = farm.start_worker("w2", "default = \"available\"");
    w2.wait_started(second);
    farm.open_gate(second);
    assert_eq!(farm.wait_finished(second).worker.as_deref(), Some("w2"));

    farm.open_gate(first);
    let status = w1.proc.as_mut().expect("w1 runs").wait_exit();
    assert_eq!(status.code(), Some(0), "{}", w1.proc().log());
    let first = farm.wait_finished(first);
    assert_eq!(first.worker.as_deref(), Some("w1"));
    assert_eq!(first.outcome, Some(Outcome::Success));
}

#[test]
fn sigterm_is_a_graceful_stop_and_a_second_one_cancels_the_build_for_requeueing() {
    let farm = Farm::start(&["w1", "w2"]);
    let mut w1 = farm.start_worker("w1", "default = \"available\"");
    let first = farm.submit();
    w1.wait_started(first);

    w1.proc().signal(nix::sys::signal::Signal::SIGTERM);
    w1.proc().wait_line("stopping gracefully (SIGTERM)");
    w1.proc().signal(nix::sys::signal::Signal::SIGTERM);
    let status = w1.proc.as_mut().expect("w1 runs").wait_exit();
    assert_eq!(status.code(), Some(0), "{}", w1.proc().log());
    assert!(
        w1.proc()
            .log()
            .contains(&format!("build {first} finished: cancelled"))
    );

    // The cancelled build is re-queued and runs on the next worker.
    farm.open_gate(first);
    let w2 = farm.start_worker("w2", "default = \"available\"");
    w2.wait_started(first);
    let build = farm.wait_finished(first);
    assert_eq!(build.worker.as_deref(), Some("w2"));
    assert_eq!(build.outcome, Some(Outcome::Success));
}

#[test]
fn a_worker_killed_mid_build_has_its_build_requeued_and_finished_elsewhere() {
    let farm = Farm::start(&["w1", "w2"]);
    let mut w1 = farm.start_worker("w1", "default = \"available\"");
    let first = farm.submit();
    w1.wait_started(first);
    w1.proc().signal(nix::sys::signal::Signal::SIGKILL);
    w1.proc.as_mut().expect("w1 runs").wait_exit();

    let w2 = farm.start_worker("w2", "default = \"available\"");
    farm.open_gate(first);
    w2.wait_started(first);
    let build = farm.wait_finished(first);
    assert_eq!(build.worker.as_deref(), Some("w2"));
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert!(build.retries >= 1, "{build:?}");
}

#[test]
fn a_master_killed_and_restarted_receives_the_result_of_a_build_that_finished_meanwhile() {
    let mut farm = Farm::start(&["w1"]);
    let w1 = farm.start_worker("w1", "default = \"available\"");
    let first = farm.submit();
    w1.wait_started(first);

    let master = farm.master.as_mut().expect("the master runs");
    master.signal(nix::sys::signal::Signal::SIGKILL);
    master.wait_exit();
    let seen = w1.proc().wait_line("lost the master");
    farm.open_gate(first);
    let seen = w1
        .proc()
        .wait_line_from(seen, &format!("build {first} finished: success"));
    assert!(
        w1.dir
            .path()
            .join(format!("state/results/{first}.json"))
            .exists(),
        "the result is spooled while the master is down: {:?}\n{}",
        std::fs::read_dir(w1.dir.path().join("state"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()),
        w1.proc().log()
    );

    farm.start_master();
    w1.proc().wait_line_from(seen, "connected to the master");
    let build = farm.wait_finished(first);
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.worker.as_deref(), Some("w1"));
    let log = farm.master_cli(&["log", &first.to_string()]);
    assert!(log.contains(&format!("done-{first}")), "{log}");
    // Acknowledged, so no longer spooled.
    let spooled = w1.dir.path().join(format!("state/results/{first}.json"));
    let deadline = Instant::now() + PATIENCE;
    while spooled.exists() {
        assert!(
            Instant::now() < deadline,
            "the result stays spooled after the ack"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn systemd_hears_ready_and_stopping_and_builds_never_see_its_socket() {
    use std::os::unix::net::UnixDatagram;
    let farm = Farm::start(&["w1"]);
    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd.set_read_timeout(Some(PATIENCE)).unwrap();
    let receive = || {
        let mut buffer = [0u8; 4096];
        let n = systemd.recv(&mut buffer).expect("a notification arrives");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };

    let mut w1 = farm.worker("w1", "default = \"available\"", &token_of("w1"));
    w1.env = vec![
        ("NOTIFY_SOCKET".into(), socket_path.clone()),
        ("WATCHDOG_USEC".into(), PathBuf::from("60000000")),
    ];
    w1.start();
    let ready = receive();
    assert!(ready.contains("READY=1"), "{ready:?}");

    let build = farm.submit_to("env");
    let info = farm.wait_finished(build);
    assert_eq!(info.outcome, Some(Outcome::Success));
    let log = farm.master_cli(&["log", &build.to_string()]);
    assert!(log.contains("notify=unset watchdog=unset"), "{log}");

    w1.proc().signal(nix::sys::signal::Signal::SIGTERM);
    let mut seen = String::new();
    while !seen.contains("STOPPING=1") {
        seen += &receive();
    }
    let status = w1.proc.as_mut().expect("w1 runs").wait_exit();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_wrong_token_is_refused_without_disturbing_a_running_build() {
    let farm = Farm::start(&["w1", "w2"]);
    let w2 = farm.start_worker("w2", "default = \"available\"");
    let first = farm.submit();
    w2.wait_started(first);

    let mut impostor = farm.worker("w1", "default = \"available\"", "not-the-right-token");
    impostor.spawn();
    impostor.proc().wait_line("the master refused this worker");
    // It keeps trying, with backoff, and never gets in.
    let after = impostor.proc().wait_line("the master refused this worker");
    impostor
        .proc()
        .wait_line_from(after, "the master refused this worker");
    assert!(!impostor.proc().log().contains("connected to the master"));

    farm.open_gate(first);
    let build = farm.wait_finished(first);
    assert_eq!(build.worker.as_deref(), Some("w2"));
    assert_eq!(build.outcome, Some(Outcome::Success));
}

#[test]
fn a_bad_config_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        "name = \"w1\"\nmaster = \"wss://127.0.0.1:1\"\ntoken = \"t\"\nmax_bulds = 2\n",
    )
    .unwrap();
    let output = Command::new(binary("worker"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_bulds"), "{stderr}");
    assert!(stderr.contains("worker.toml"), "{stderr}");
}
