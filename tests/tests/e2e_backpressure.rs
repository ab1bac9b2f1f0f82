//! End-to-end tests of backpressure (issue 8) through the real `master` and
//! `worker` binaries: a flooding agent is cut off while others are still
//! heard, a build's log is capped at `max_log_bytes` (the master drops what
//! is past it, a real agent does not even send it), and a step flooding a
//! throttled link keeps the agent small while its result still arrives.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use nightshift_policy::PresenceState;
use nightshift_proto::api::BuildState;
use nightshift_proto::wire::{AgentMessage, Outcome};
use nightshift_tests::{
    DEADLINE, Farm, WorkerSpec, metric_sample, one_step_result, presence, wait_for,
};

/// One agent flooding presence frames is disconnected with a reason, while
/// another worker's presence change still reaches the scheduler at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_disconnected_and_others_are_still_heard() -> anyhow::Result<()> {
    let farm = Farm::with_release("60s").await?;
    let mut flooder = farm.fake_agent("a", PresenceState::Available).await?;
    let mut calm = farm.fake_agent("b", PresenceState::Away).await?;
    let flood = tokio::spawn(async move {
        let mut sent = 0u32;
        for i in 0..5_000u32 {
            let state = if i % 2 == 0 {
                PresenceState::Away
            } else {
                PresenceState::Available
            };
            if flooder
                .send(&AgentMessage::Presence {
                    presence: presence(state),
                    outlook: None,
                })
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        let closed = flooder.expect_closed().await;
        (sent, closed)
    });
    let began = Instant::now();
    calm.send(&AgentMessage::Presence {
        presence: presence(PresenceState::Available),
        outlook: None,
    })
    .await?;
    farm.wait_worker_state("b", PresenceState::Available)
        .await?;
    let heard_after = began.elapsed();
    let (sent, closed) = flood.await?;
    closed.context("the flooder's connection is closed")?;
    assert!(sent < 5_000 || farm.master_log().contains("rate limit"));
    let log = farm.master_log();
    assert!(
        log.contains("worker a: disconnected: rate limit"),
        "the reason is logged:\n{log}"
    );
    let text = farm.master_metrics().await?;
    assert_eq!(
        metric_sample(
            &text,
            "nightshift_master_agent_disconnects_total",
            "reason=\"rate_limited\""
        ),
        1.0,
        "{text}"
    );
    eprintln!("calm worker's presence heard after {heard_after:?} during the flood");
    assert!(heard_after < DEADLINE);
    Ok(())
}

/// A build's log is capped at `max_log_bytes`; past it, the log says how
/// many bytes were dropped, both for the live stream and the final log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builds_log_is_capped_and_says_how_much_was_dropped() -> anyhow::Result<()> {
    let farm = Farm::builder()
        .worker(WorkerSpec::new("a"))
        .builder("app", &["a"], &[("build", "yes")])
        .master_toml("max_log_bytes = 4096\n")
        .start()
        .await?;
    let api = farm.api()?;
    let mut a = farm.fake_agent("a", PresenceState::Available).await?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    assert_eq!(a.expect_start().await?, id);
    a.send(&AgentMessage::BuildAccepted { build_id: id })
        .await?;
    let chunk = "y\n".repeat(512); // 1 KiB
    for _ in 0..10 {
        a.send(&AgentMessage::Output {
            build_id: id,
            step: 0,
            data: chunk.clone(),
        })
        .await?;
    }
    let live = wait_for("the live log to reach its cap", DEADLINE, || {
        let api = &api;
        async move {
            let log = api.log(id).await?.log;
            Ok(log.contains("bytes dropped").then_some(log))
        }
    })
    .await?;
    assert!(
        live.starts_with(&"y\n".repeat(2048)),
        "the first 4096 bytes are kept"
    );
    assert!(
        live.ends_with(
            "[nightshift: 6144 bytes dropped: this build's log reached its cap (max_log_bytes)]\n"
        ),
        "{}",
        &live[4096..]
    );

    let full = "y\n".repeat(5 * 1024); // 10 KiB
    a.send(&AgentMessage::BuildFinished {
        result: one_step_result(id, Outcome::Success, &full),
    })
    .await?;
    farm.wait_build(id).await?;
    let log = api.log(id).await?.log;
    assert_eq!(
        log,
        format!(
            "{}[nightshift: 6144 bytes dropped: this build's log reached its cap (max_log_bytes)]\n",
            "y\n".repeat(2048)
        )
    );
    let text = farm.master_metrics().await?;
    assert!(metric_sample(&text, "nightshift_master_log_bytes_dropped_total", "") >= 12288.0);
    Ok(())
}

/// A real agent sends no output past `max_log_bytes`: a step printing
/// ~1.3 MB runs to its end, the bytes that cross the link stay under the
/// cap (the master's `output_bytes_received` metric), and the log says once
/// that it is full and, last, how much was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_sends_no_output_past_max_log_bytes() -> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("a"))
        .builder(
            "app",
            &["a"],
            &[("loud", "seq 1 200000"), ("after", "echo after")],
        )
        .master_toml("max_log_bytes = 16384\n")
        .start()
        .await?;
    farm.start_worker("a")?;
    farm.wait_worker_ready("a").await?;
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm.wait_build(id).await?;
    assert_eq!(
        build.outcome,
        Some(Outcome::Success),
        "{build:?}\n{}",
        farm.worker_log("a")
    );
    let text = farm.master_metrics().await?;
    let crossed = metric_sample(&text, "nightshift_master_output_bytes_received_total", "");
    assert!(
        crossed > 0.0 && crossed <= 16384.0,
        "{crossed} bytes of output crossed the link (max_log_bytes 16384)"
    );
    let log = api.log(id).await?.log;
    assert!(log.len() <= 16384, "{} bytes stored", log.len());
    assert_eq!(
        log.matches("log reached max_log_bytes (16384 bytes)")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.trim_end()
            .ends_with("bytes of output past max_log_bytes were not sent]"),
        "{}",
        &log[log.len().saturating_sub(300)..]
    );
    assert!(
        farm.worker_log("a")
            .contains("its log reached max_log_bytes (16384 bytes)"),
        "{}",
        farm.worker_log("a")
    );
    Ok(())
}

/// VmRSS of process `pid` in bytes, from /proc.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = fs_err::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")?;
    Ok(kib * 1024)
}

/// A step running `yes` on a link the master throttles to 10 frames/s: the
/// real agent stays under 64 MiB resident (the step waits on its pipe while
/// output waits for credit), and the build's result and the end of its log
/// still arrive. (The minute-long run is in `nightshift-bench`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_flooding_a_slow_link_keeps_the_agent_small_and_its_result_arrives()
-> anyhow::Result<()> {
    const LIMIT: u64 = 64 * 1024 * 1024;
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w"))
        .builder(
            "flood",
            &["w"],
            &[("flood", "timeout 12 yes; echo after-the-flood")],
        )
        .master_toml("[agent_limits]\nframes_per_second = 10\nframe_burst = 10\n")
        .start()
        .await?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    let pid = farm.agent("w").context("the worker runs")?.child.id();
    let api = farm.api()?;
    let id = api.submit("flood", BTreeMap::new()).await?.build_id;
    farm.wait_build_state(id, "the flood running", |b| b.state == BuildState::Running)
        .await?;
    // Sample the agent's RSS while the build runs (a measurement, not a
    // synchronisation: the build's end is awaited through the API).
    let mut peak = 0;
    let mut samples = 0;
    let finished = loop {
        peak = peak.max(rss_bytes(pid)?);
        samples += 1;
        let build = api.wait(id, 1).await?;
        if build.state == BuildState::Finished {
            break build;
        }
    };
    eprintln!(
        "agent peak RSS {:.1} MiB over {samples} samples",
        peak as f64 / 1048576.0
    );
    assert!(
        peak < LIMIT,
        "the agent reached {peak} bytes resident (limit {LIMIT})\n{}",
        farm.worker_log("w")
    );
    assert_eq!(
        finished.outcome,
        Some(Outcome::Success),
        "{finished:?}\n{}",
        farm.worker_log("w")
    );
    let log = api.log(id).await?.log;
    assert!(
        log.ends_with("y\nafter-the-flood\n"),
        "the log's end: {:?}",
        &log[log.len().saturating_sub(200)..]
    );
    // The slow link carried megabytes, not gigabytes: the step waited.
    assert!(
        log.len() < 32 * 1024 * 1024,
        "{} bytes: the step was not held back",
        log.len()
    );
    Ok(())
}
