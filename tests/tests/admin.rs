//! The admin's first hour, through the real binaries: the README's first
//! command (the embedded default), `master init` and a master started from
//! its file, `add-worker local`, stopping the local worker without stopping
//! the farm, how the CLI finds master.toml (and reports a broken one), and a
//! second agent on one machine told which key sets its control port.

use std::path::Path;
use std::process::{Command, Output};

use nightshift_proto::api::WorkerList;
use nightshift_tests::{DEADLINE, Spawned, bin_dir, sha256_hex, wait_for};
use nix::sys::signal::Signal;

/// A `master` command in `dir`, with none of the caller's NIGHTSHIFT_*
/// settings leaking in.
fn master(dir: &Path) -> anyhow::Result<Command> {
    let mut command = Command::new(bin_dir()?.join("master"));
    command
        .current_dir(dir)
        .env_remove("NIGHTSHIFT_MASTER_CONFIG")
        .env_remove("NIGHTSHIFT_MASTER_URL")
        .env_remove("NIGHTSHIFT_ADMIN_TOKEN")
        .env_remove("NIGHTSHIFT_CA_FILE")
        .env_remove("NIGHTSHIFT_PIN_SHA256");
    Ok(command)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(mut command: Command) -> anyhow::Result<Output> {
    Ok(command.stdin(std::process::Stdio::null()).output()?)
}

/// One `--local-worker` master at a time in this file: each local worker
/// takes the status page's usual port 7878 when it is free, and two starting
/// at once could both see it free.
static LOCAL_WORKER_PORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `master run ARGS` in `dir`; returns it once it printed its last ready
/// line (the local worker's status page), with the URL of its ready line.
async fn start_master(dir: &Path, args: &[&str]) -> anyhow::Result<(Spawned, String)> {
    let mut command = master(dir)?;
    command
        .arg("run")
        .args(args)
        .stderr(std::process::Stdio::null());
    let running = Spawned::start("master run", command)?;
    let ready = running
        .wait_line("its ready line", |line| {
            line.starts_with("nightshift master ready on ")
        })
        .await?;
    let url = ready
        .trim_start_matches("nightshift master ready on ")
        .to_owned();
    running
        .wait_line("the local worker's status page", |line| {
            line.contains("its status page")
        })
        .await?;
    Ok((running, url))
}

async fn stop(mut master: Spawned) -> anyhow::Result<()> {
    master.signal(Signal::SIGTERM)?;
    let status = master.wait_exit(DEADLINE).await?;
    assert_eq!(status.code(), Some(0), "the master exits 0 on SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_job_runs_a_build_from_an_empty_directory() -> anyhow::Result<()> {
    let _one_at_a_time = LOCAL_WORKER_PORT.lock().await;
    let dir = tempfile::tempdir()?;
    let (running, url) =
        start_master(dir.path(), &["--local-worker", "--listen", "127.0.0.1:0"]).await?;
    let printed = running.lines().join("\n");
    assert!(printed.contains("pin_sha256 = \""), "{printed}");
    assert!(printed.contains("master submit hello"), "{printed}");
    assert!(printed.contains("nightshift-data"), "{printed}");

    // The CLI finds the token and the certificate in ./nightshift-data.
    let submit = run({
        let mut c = master(dir.path())?;
        c.args(["submit", "hello", "--wait", "--url", &url]);
        c
    })?;
    let out = text(&submit.stdout);
    assert_eq!(
        submit.status.code(),
        Some(0),
        "{out}{}",
        text(&submit.stderr)
    );
    assert!(out.contains("hello from nightshift"), "{out}");
    assert!(dir.path().join("nightshift-data/master.db").exists());

    // SIGTERM: the master stops its local worker and exits 0.
    stop(running).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_a_config_that_runs_twice_and_stopping_the_local_worker_leaves_the_master_up()
-> anyhow::Result<()> {
    let _one_at_a_time = LOCAL_WORKER_PORT.lock().await;
    let dir = tempfile::tempdir()?;
    let init = run({
        let mut c = master(dir.path())?;
        c.arg("init");
        c
    })?;
    assert_eq!(init.status.code(), Some(0), "{}", text(&init.stderr));
    let config = fs_err::read_to_string(dir.path().join("master.toml"))?;
    let token = fs_err::read_to_string(dir.path().join("nightshift-data/local-worker.token"))?;
    let hash = sha256_hex(token.trim());
    assert!(
        config.contains(&format!("token_sha256 = \"{hash}\"")),
        "master.toml holds the local worker's token hash:\n{config}"
    );

    // A second init changes nothing and says why.
    let again = run({
        let mut c = master(dir.path())?;
        c.arg("init");
        c
    })?;
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        fs_err::read_to_string(dir.path().join("master.toml"))?,
        config
    );

    // `master check` finds ./master.toml.
    let check = run({
        let mut c = master(dir.path())?;
        c.arg("check");
        c
    })?;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).contains("master.toml: ok"),
        "{}",
        text(&check.stdout)
    );

    let (running, url) =
        start_master(dir.path(), &["--local-worker", "--listen", "127.0.0.1:0"]).await?;
    // The sample builder's steps succeed run after run in the same workdir.
    for round in 1..=2 {
        let submit = run({
            let mut c = master(dir.path())?;
            c.args(["submit", "hello", "--wait", "--url", &url]);
            c
        })?;
        assert_eq!(
            submit.status.code(),
            Some(0),
            "round {round}: {}{}",
            text(&submit.stdout),
            text(&submit.stderr)
        );
    }

    // `add-worker local` prints the entry of the token the local worker uses.
    let add = run({
        let mut c = master(dir.path())?;
        c.args(["add-worker", "local"]);
        c
    })?;
    assert_eq!(add.status.code(), Some(0), "{}", text(&add.stderr));
    assert!(
        text(&add.stdout).contains(&format!("token_sha256 = \"{hash}\"")),
        "{}",
        text(&add.stdout)
    );
    assert!(
        text(&add.stderr).contains("already in"),
        "{}",
        text(&add.stderr)
    );

    // Stopping the local worker does not stop the farm.
    let stop_worker = run({
        let mut c = Command::new(bin_dir()?.join("worker"));
        c.args(["stop", "--graceful", "--config"])
            .arg(dir.path().join("nightshift-data/local-worker/worker.toml"))
            .env_remove("NIGHTSHIFT_WORKER_CONFIG");
        c
    })?;
    assert_eq!(
        stop_worker.status.code(),
        Some(0),
        "{}",
        text(&stop_worker.stderr)
    );
    let workers_json = || -> anyhow::Result<WorkerList> {
        let out = run({
            let mut c = master(dir.path())?;
            c.args(["workers", "--json", "--url", &url]);
            c
        })?;
        anyhow::ensure!(
            out.status.success(),
            "master workers: {}",
            text(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    wait_for("the local worker to leave", DEADLINE, || {
        let list = workers_json();
        async move {
            let list = list?;
            Ok(list
                .workers
                .iter()
                .any(|w| w.name == "local" && !w.connected)
                .then_some(()))
        }
    })
    .await?;
    // The master still answers: it did not go down with its worker.
    let list = workers_json()?;
    assert!(list.workers.iter().any(|w| w.name == "local"), "{list:?}");
    stop(running).await
}

#[test]
fn the_cli_finds_master_toml_by_env_and_shows_the_real_error_of_a_broken_one() -> anyhow::Result<()>
{
    let broken = tempfile::tempdir()?;
    fs_err::write(broken.path().join("master.toml"), "listen = 5\n")?;
    let elsewhere = tempfile::tempdir()?;

    // add-worker in the directory of a broken master.toml: its error, exit 2.
    let add = run({
        let mut c = master(broken.path())?;
        c.args(["add-worker", "w9"]);
        c
    })?;
    let stderr = text(&add.stderr);
    assert_eq!(add.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("master.toml") && stderr.contains("listen"),
        "{stderr}"
    );
    assert!(!stderr.contains("give --url"), "{stderr}");

    // From elsewhere, NIGHTSHIFT_MASTER_CONFIG names it: the same error.
    for verb in [&["workers"][..], &["check"][..], &["add-worker", "w9"][..]] {
        let out = run({
            let mut c = master(elsewhere.path())?;
            c.args(verb).env(
                "NIGHTSHIFT_MASTER_CONFIG",
                broken.path().join("master.toml"),
            );
            c
        })?;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb:?}: {stderr}");
        assert!(stderr.contains("listen"), "{verb:?}: {stderr}");
    }

    // With a good file named by the variable, check reads that file.
    let good = tempfile::tempdir()?;
    let init = run({
        let mut c = master(good.path())?;
        c.arg("init");
        c
    })?;
    assert_eq!(init.status.code(), Some(0), "{}", text(&init.stderr));
    let check = run({
        let mut c = master(elsewhere.path())?;
        c.arg("check")
            .env("NIGHTSHIFT_MASTER_CONFIG", good.path().join("master.toml"));
        c
    })?;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).contains(&good.path().join("master.toml").display().to_string()),
        "{}",
        text(&check.stdout)
    );

    // Nothing anywhere: the error says where it looked.
    let workers = run({
        let mut c = master(elsewhere.path())?;
        c.arg("workers");
        c
    })?;
    let stderr = text(&workers.stderr);
    assert_eq!(workers.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("NIGHTSHIFT_MASTER_CONFIG") && stderr.contains("./master.toml"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_second_agent_on_the_machine_is_told_which_key_sets_its_control_port() -> anyhow::Result<()> {
    // The first agent's status page holds the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("worker.toml");
    fs_err::write(
        &config,
        format!(
            "name = \"second\"\nmaster = \"ws://127.0.0.1:9\"\ntoken = \"t\"\ninsecure = true\n\n\
             [control]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    )?;
    let out = run({
        let mut c = Command::new(bin_dir()?.join("worker"));
        c.arg("run")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET");
        c
    })?;
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(
        stderr.contains("[control]") && stderr.contains("listen"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":0"),
        "it says how to get any free port: {stderr}"
    );
    drop(taken);
    Ok(())
}
