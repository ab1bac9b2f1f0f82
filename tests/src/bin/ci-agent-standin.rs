//! A stand-in CI agent for the `[supervise]` tests: it runs "jobs" (a child
//! `sleep`) back to back and honours the stop-signal contract of the agent it
//! imitates, writing what happens to `$STANDIN_EVENTS`, one line per event.
//!
//! `ci-agent-standin gitlab`: like GitLab Runner, SIGQUIT finishes the
//! running job and exits 0; SIGTERM/SIGINT abort it and exit 1.
//! `ci-agent-standin buildkite`: like the Buildkite agent, the first
//! SIGTERM/SIGINT finishes the job and exits 0; a second one, or SIGQUIT,
//! cancels the job and exits 1.
//! `ci-agent-standin ignore`: ignores SIGTERM, SIGQUIT and SIGHUP; SIGINT
//! aborts the job and exits 130.
//! `ci-agent-standin crash`: exits 3 soon after it starts.
//!
//! `$STANDIN_JOB_SECS` (default 3) is each job's length. A second instance
//! in the same directory (`standin.lock`) logs `second-instance` and exits 99.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

fn log(line: &str) {
    let path = std::env::var("STANDIN_EVENTS").unwrap_or_else(|_| "standin.events".into());
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let _ = writeln!(file, "{now:.3} {} {line}", std::process::id());
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Contract {
    Gitlab,
    Buildkite,
    Ignore,
    Crash,
}

fn main() {
    let contract = match std::env::args().nth(1).as_deref() {
        Some("gitlab") => Contract::Gitlab,
        Some("buildkite") => Contract::Buildkite,
        Some("ignore") => Contract::Ignore,
        Some("crash") => Contract::Crash,
        other => {
            eprintln!("usage: ci-agent-standin gitlab|buildkite|ignore|crash (got {other:?})");
            std::process::exit(2);
        }
    };
    let lock = match std::fs::File::create("standin.lock") {
        Ok(file) => file,
        Err(error) => {
            eprintln!("cannot create standin.lock: {error}");
            std::process::exit(2);
        }
    };
    // SAFETY: flock on an open descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        log("second-instance");
        std::process::exit(99);
    }
    let job_secs: f64 = std::env::var("STANDIN_JOB_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(3.0);
    log("start");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = runtime.block_on(run(contract, job_secs));
    log(&format!("exit {code}"));
    drop(lock);
    std::process::exit(code);
}

async fn run(contract: Contract, job_secs: f64) -> i32 {
    if contract == Contract::Crash {
        tokio::time::sleep(Duration::from_millis(300)).await;
        return 3;
    }
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut draining = false;
    let mut job_number = 0u32;
    loop {
        job_number += 1;
        let mut job = match tokio::process::Command::new("sleep")
            .arg(format!("{job_secs}"))
            .kill_on_drop(true)
            .spawn()
        {
            Ok(job) => job,
            Err(error) => {
                log(&format!("cannot start a job: {error}"));
                return 2;
            }
        };
        log(&format!("job-start {job_number}"));
        loop {
            // What a signal means under this contract: None = keep going,
            // Some(true) = drain, Some(false) = abort now.
            let abort = tokio::select! {
                _ = job.wait() => {
                    log(&format!("job-end {job_number}"));
                    break;
                }
                _ = term.recv() => {
                    log("signal SIGTERM");
                    match contract {
                        Contract::Gitlab => true,
                        Contract::Buildkite => std::mem::replace(&mut draining, true),
                        _ => false,
                    }
                }
                _ = int.recv() => {
                    log("signal SIGINT");
                    match contract {
                        Contract::Gitlab | Contract::Ignore => true,
                        Contract::Buildkite => std::mem::replace(&mut draining, true),
                        Contract::Crash => false,
                    }
                }
                _ = quit.recv() => {
                    log("signal SIGQUIT");
                    match contract {
                        Contract::Gitlab => {
                            draining = true;
                            false
                        }
                        Contract::Buildkite => true,
                        _ => false,
                    }
                }
                _ = hup.recv() => {
                    log("signal SIGHUP");
                    false
                }
            };
            if abort {
                let _ = job.start_kill();
                let _ = job.wait().await;
                log(&format!("job-aborted {job_number}"));
                return if contract == Contract::Ignore { 130 } else { 1 };
            }
        }
        if draining {
            return 0;
        }
    }
}
