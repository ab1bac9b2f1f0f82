//! The proof against the real thing: a real Buildbot 4.3.0 master and a real
//! `buildbot-worker`, supervised by a real nightshift `worker` with
//! `[supervise] kind = "buildbot-worker"`, read through Buildbot's REST API.
//!
//! Buildbot comes from PyPI (pinned in `tests/buildbot/constraints.txt`) into
//! a virtualenv under the cargo target dir, made once and reused. Without
//! PyPI the test fails, naming the problem; `NIGHTSHIFT_SKIP_BUILDBOT=1`
//! skips it explicitly.
//!
//! Scenarios (issue 12): available → the buildbot-worker connects and a forced
//! build runs; `away` in the middle of a 5 s build → Buildbot records it
//! SUCCESS at its normal length, the buildbot-worker disconnects and exits
//! 0, and a second forced build stays pending; `auto` → it reconnects and the
//! pending build runs; `worker stop --graceful` drains and exits 0; a
//! schedule window closing does the same as a manual `away`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nightshift_tests::supervised::{SupervisedWorker, alive};
use nightshift_tests::{DEADLINE, free_port, wait_for};
use serde_json::{Value, json};

const CONSTRAINTS: &str = include_str!("../buildbot/constraints.txt");
const MASTER_CFG: &str = include_str!("../buildbot/master.cfg");
const PACKAGES: [&str; 3] = [
    "buildbot==4.3.0",
    "buildbot-worker==4.3.0",
    "buildbot-www==4.3.0",
];

/// The virtualenv with Buildbot, made once per target dir (serialized by a
/// lock file, marked complete by a stamp holding the pins).
fn buildbot_venv() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("buildbot-4.3.0-venv");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.with_extension("lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("cannot lock the venv: {errno}"))?;
    let stamp = dir.join(".nightshift-complete");
    let pins = format!("{}\n{CONSTRAINTS}", PACKAGES.join("\n"));
    if std::fs::read_to_string(&stamp).is_ok_and(|text| text == pins) {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let constraints = dir.with_extension("constraints.txt");
    std::fs::write(&constraints, CONSTRAINTS)?;
    let venv = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .context("cannot run python3 (install python3 and python3-venv)")?;
    if !venv.status.success() {
        bail!(
            "`python3 -m venv` failed (install python3-venv): {}",
            String::from_utf8_lossy(&venv.stderr)
        );
    }
    let started = Instant::now();
    let pip = Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-c"])
        .arg(&constraints)
        .args(PACKAGES)
        .output()
        .context("cannot run pip")?;
    if !pip.status.success() {
        bail!(
            "cannot install Buildbot from PyPI ({}): {}\nThis test needs PyPI; set NIGHTSHIFT_SKIP_BUILDBOT=1 to skip it where PyPI is unreachable.",
            PACKAGES.join(" "),
            String::from_utf8_lossy(&pip.stderr)
        );
    }
    eprintln!(
        "installed Buildbot into {} in {:.0?}",
        dir.display(),
        started.elapsed()
    );
    std::fs::write(&stamp, pins)?;
    Ok(dir)
}

/// A running Buildbot master, killed (with its process group) on drop.
struct BuildbotMaster {
    child: Child,
    www: u16,
    pb: u16,
    dir: PathBuf,
}

impl BuildbotMaster {
    fn start(venv: &Path, dir: &Path) -> anyhow::Result<BuildbotMaster> {
        use std::os::unix::process::CommandExt;
        let create = Command::new(venv.join("bin/buildbot"))
            .args(["create-master", "--quiet"])
            .arg(dir)
            .output()?;
        if !create.status.success() {
            bail!(
                "buildbot create-master failed: {}{}",
                String::from_utf8_lossy(&create.stdout),
                String::from_utf8_lossy(&create.stderr)
            );
        }
        std::fs::write(dir.join("master.cfg"), MASTER_CFG)?;
        let (www, pb) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("stdout.log"))?;
        let child = Command::new(venv.join("bin/buildbot"))
            .args(["start", "--nodaemon"])
            .arg(dir)
            .env("BB_WWW_PORT", www.to_string())
            .env("BB_PB_PORT", pb.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start the Buildbot master")?;
        Ok(BuildbotMaster {
            child,
            www,
            pb,
            dir: dir.to_path_buf(),
        })
    }

    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}\n{}", read("stdout.log"), read("twistd.log"))
    }

    /// One HTTP/1.0 request to the REST API; the JSON body of a 2xx answer.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.www))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.www,
            body.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .context("an HTTP answer without a body")?;
        let status = head.split(' ').nth(1).unwrap_or("");
        if !status.starts_with('2') {
            bail!("{method} {path}: {head}\n{body}");
        }
        serde_json::from_str(body).with_context(|| format!("{method} {path}: not JSON: {body}"))
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None)
    }

    async fn wait_up(&mut self) -> anyhow::Result<()> {
        let result = wait_for("the Buildbot master's REST API", DEADLINE * 2, || {
            let exited = self.child.try_wait();
            let answer = self.get("/api/v2/builders");
            async move {
                if let Ok(Some(exit)) = exited {
                    bail!("the Buildbot master exited ({exit})");
                }
                Ok(answer
                    .ok()
                    .filter(|value| value["builders"].as_array().is_some_and(|b| b.len() == 2)))
            }
        })
        .await;
        result.with_context(|| format!("--- Buildbot master log ---\n{}", self.log()))?;
        Ok(())
    }

    fn builder_id(&self, name: &str) -> anyhow::Result<u64> {
        let builders = self.get("/api/v2/builders")?;
        builders["builders"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|builder| builder["name"] == name)
            .and_then(|builder| builder["builderid"].as_u64())
            .with_context(|| format!("no builder {name}: {builders}"))
    }

    /// Forces a build; returns its build request id.
    fn force(&self, builder: &str, secs: u64) -> anyhow::Result<u64> {
        let builderid = self.builder_id(builder)?;
        let answer = self.call(
            "POST",
            "/api/v2/forceschedulers/force",
            Some(&json!({
                "jsonrpc": "2.0",
                "method": "force",
                "params": {"builderid": builderid, "secs": secs.to_string()},
                "id": 1
            })),
        )?;
        let bsid = answer["result"][0]
            .as_u64()
            .with_context(|| format!("no buildset id in {answer}"))?;
        let requests = self.get(&format!("/api/v2/buildrequests?buildsetid={bsid}"))?;
        requests["buildrequests"][0]["buildrequestid"]
            .as_u64()
            .with_context(|| format!("no build request in {requests}"))
    }

    /// The build of a request, once one exists.
    fn build_of(&self, request: u64) -> anyhow::Result<Option<Value>> {
        let builds = self.get(&format!("/api/v2/builds?buildrequestid={request}"))?;
        Ok(builds["builds"].as_array().and_then(|b| b.first()).cloned())
    }

    fn request_claimed(&self, request: u64) -> anyhow::Result<bool> {
        let answer = self.get(&format!("/api/v2/buildrequests/{request}"))?;
        answer["buildrequests"][0]["claimed"]
            .as_bool()
            .with_context(|| format!("no build request {request}: {answer}"))
    }

    /// Whether worker `w1` is connected to this master.
    fn worker_connected(&self) -> anyhow::Result<bool> {
        let workers = self.get("/api/v2/workers?name=w1")?;
        let worker = &workers["workers"][0];
        Ok(!worker["connected_to"]
            .as_array()
            .with_context(|| format!("no worker w1: {workers}"))?
            .is_empty())
    }

    async fn wait_connected(&self, connected: bool) -> anyhow::Result<()> {
        let what = if connected {
            "the buildbot-worker to connect"
        } else {
            "the buildbot-worker to disconnect"
        };
        wait_for(what, DEADLINE, || {
            let now = self.worker_connected();
            async move { Ok((now? == connected).then_some(())) }
        })
        .await
    }

    async fn wait_started(&self, request: u64) -> anyhow::Result<Value> {
        wait_for("the build to start", DEADLINE, || {
            let build = self.build_of(request);
            async move { build }
        })
        .await
    }

    async fn wait_complete(&self, request: u64) -> anyhow::Result<Value> {
        wait_for("the build to complete", DEADLINE * 2, || {
            let build = self.build_of(request);
            async move { Ok(build?.filter(|build| build["complete"] == true)) }
        })
        .await
    }
}

impl Drop for BuildbotMaster {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A completed build: SUCCESS (results 0), lasting about `secs`.
fn assert_success_of_length(build: &Value, secs: u64) {
    assert_eq!(build["results"], 0, "not SUCCESS: {build}");
    let started = build["started_at"].as_u64().unwrap();
    let completed = build["complete_at"].as_u64().unwrap();
    // Buildbot stores whole seconds.
    assert!(
        completed - started + 1 >= secs,
        "the build was cut short ({}s of {secs}s): {build}",
        completed - started
    );
}

fn create_buildbot_worker(venv: &Path, dir: &Path, pb: u16) -> anyhow::Result<()> {
    let create = Command::new(venv.join("bin/buildbot-worker"))
        .args(["create-worker", "--quiet", "--allow-shutdown=signal"])
        .arg(dir)
        .arg(format!("127.0.0.1:{pb}"))
        .args(["w1", "pass"])
        .output()?;
    if !create.status.success() {
        bail!(
            "buildbot-worker create-worker failed: {}",
            String::from_utf8_lossy(&create.stderr)
        );
    }
    Ok(())
}

fn supervised_exit(worker: &SupervisedWorker) -> anyhow::Result<Value> {
    Ok(worker.status()?["supervised"]["last_exit"].clone())
}

#[tokio::test]
async fn presence_drives_a_real_buildbot_worker() -> anyhow::Result<()> {
    if std::env::var_os("NIGHTSHIFT_SKIP_BUILDBOT").is_some_and(|v| v == "1") {
        eprintln!("skipped: NIGHTSHIFT_SKIP_BUILDBOT=1");
        return Ok(());
    }
    let test_started = Instant::now();
    let venv = buildbot_venv()?;
    let tmp = tempfile::tempdir()?;
    let mut master = BuildbotMaster::start(&venv, &tmp.path().join("master"))?;
    let bb_worker_dir = tmp.path().join("bb-worker");
    create_buildbot_worker(&venv, &bb_worker_dir, master.pb)?;
    master.wait_up().await?;
    let supervise = format!(
        "[supervise]\nkind = \"buildbot-worker\"\ncommand = \"{}\"\nworkdir = \"{}\"\n",
        venv.join("bin/buildbot-worker").display(),
        bb_worker_dir.display()
    );
    let agent_dir = tmp.path().join("agent");
    let mut worker = SupervisedWorker::start(&agent_dir, "bb-lab", &supervise)?;
    let result = scenarios(&master, &mut worker).await;
    if result.is_err() {
        eprintln!(
            "--- nightshift worker log ---\n{}\n--- buildbot-worker twistd.log ---\n{}\n--- Buildbot master log ---\n{}",
            worker.log(),
            std::fs::read_to_string(bb_worker_dir.join("twistd.log")).unwrap_or_default(),
            master.log()
        );
    }
    result?;
    eprintln!(
        "the Buildbot scenarios took {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn scenarios(master: &BuildbotMaster, worker: &mut SupervisedWorker) -> anyhow::Result<()> {
    // 1. Available: the buildbot-worker connects and a forced build runs.
    master.wait_connected(true).await?;
    let running = worker
        .wait_supervised("the buildbot-worker to run", |s| s["state"] == "running")
        .await?;
    assert_eq!(running["kind"], "buildbot-worker");
    let first_pid = running["pid"].as_u64().unwrap() as i32;
    let trivial = master.force("trivial", 0)?;
    assert_eq!(master.wait_complete(trivial).await?["results"], 0);

    // 2. Away in the middle of a 5 s build: it finishes SUCCESS at its
    //    normal length, the worker disconnects and exits 0, and a second
    //    forced build stays pending.
    let long = master.force("sleep", 5)?;
    master.wait_started(long).await?;
    worker.cli_ok(&["set-availability", "away", "--reason", "owner's turn"])?;
    let pending = master.force("sleep", 1)?;
    assert_success_of_length(&master.wait_complete(long).await?, 5);
    master.wait_connected(false).await?;
    let stopped = worker
        .wait_supervised("the buildbot-worker to exit", |s| s["state"] == "stopped")
        .await?;
    assert_eq!(stopped["last_exit"]["status"], "exit 0", "{stopped}");
    assert_eq!(stopped["last_exit"]["requested"], true);
    assert!(!alive(first_pid));
    assert!(
        master.build_of(pending)?.is_none(),
        "the second build started"
    );
    assert!(!master.request_claimed(pending)?);

    // 3. auto (available again): it reconnects and the pending build runs.
    worker.cli_ok(&["set-availability", "auto"])?;
    master.wait_connected(true).await?;
    assert_success_of_length(&master.wait_complete(pending).await?, 1);

    // 5. `worker stop --graceful` in the middle of a build drains and exits 0.
    let last = master.force("sleep", 3)?;
    master.wait_started(last).await?;
    let bb_pid = worker.status()?["supervised"]["pid"].as_u64().unwrap() as i32;
    worker.cli_ok(&["stop", "--graceful"])?;
    assert_eq!(worker.wait_exit(Duration::from_secs(90))?, Some(0));
    assert_success_of_length(&master.wait_complete(last).await?, 3);
    master.wait_connected(false).await?;
    assert!(!alive(bb_pid));
    assert!(
        worker
            .log()
            .contains("finished after SIGHUP and ended with exit 0")
    );

    // 4. A schedule window closing does the same as a manual `away`. The
    //    window (whole minutes, UTC) closes at the next minute boundary at
    //    least 15 s away; a build is running across it.
    let now = jiff::Timestamp::now();
    let close = {
        let soon = now + jiff::SignedDuration::from_secs(15 + 59);
        jiff::Timestamp::from_second(soon.as_second() - soon.as_second().rem_euclid(60))?
    };
    let open = close - jiff::SignedDuration::from_mins(30);
    let hhmm = |at: jiff::Timestamp| {
        at.to_zoned(jiff::tz::TimeZone::UTC)
            .strftime("%H:%M")
            .to_string()
    };
    let window = format!(
        "\n[availability]\ntimezone = \"UTC\"\ndefault = \"away\"\n\n[[availability.schedule]]\nname = \"short\"\nhours = \"{}-{}\"\n",
        hhmm(open),
        hhmm(close)
    );
    worker.rewrite_config(|text| text.replace("[supervise]", &format!("{window}\n[supervise]")))?;
    worker.restart()?;
    master.wait_connected(true).await?;
    let secs = (close.as_second() - jiff::Timestamp::now().as_second()).max(0) as u64 + 5;
    let across = master.force("sleep", secs)?;
    master.wait_started(across).await?;
    let after_close = master.force("trivial", 0)?;
    assert_success_of_length(&master.wait_complete(across).await?, secs);
    master.wait_connected(false).await?;
    let stopped = worker
        .wait_supervised("the window to close", |s| s["state"] == "stopped")
        .await?;
    assert_eq!(supervised_exit(worker)?["status"], "exit 0", "{stopped}");
    assert!(
        stopped["why"]
            .as_str()
            .unwrap()
            .contains("outside schedule short"),
        "{stopped}"
    );
    assert!(master.build_of(after_close)?.is_none());
    assert!(!master.request_claimed(after_close)?);
    assert_eq!(worker.status()?["presence"]["state"], "away");
    Ok(())
}
