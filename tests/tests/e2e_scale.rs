//! The O(N) guard: the master's CPU time per build must not grow with the
//! number of connected idle workers. Not a timed test: it compares the
//! master's own CPU per build (from `/proc`) with 50 and with 2,000 connected
//! fake agents, with generous slack; a per-build cost linear in the workers
//! (let alone quadratic, as a name search inside a per-worker loop was)
//! shows as a ratio far above it.

use std::time::{Duration, Instant};

use nightshift_tests::fleet::{Fleet, cpu_ms, throughput};
use nightshift_tests::{Farm, WorkerSpec};

const BUILDS: usize = 150;

/// Master CPU milliseconds per trivial build with `n` connected idle workers.
async fn cpu_per_build(n: usize) -> anyhow::Result<f64> {
    let names: Vec<String> = (0..n).map(|i| format!("g{i:05}")).collect();
    let mut builder = Farm::builder();
    for name in &names {
        builder = builder.worker(WorkerSpec::new(name));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let farm = builder
        .builder("noop", &refs, &[("noop", "true")])
        .start()
        .await?;
    let pid = farm.master_pid().expect("the master runs");
    let (fleet, _presence, stop) = Fleet::new(&farm)?;
    let agents = fleet.spawn(&farm, &names)?;
    fleet.all_connected(n).await?;
    // A warm-up, so that both runs measure the steady state.
    throughput(&farm, "noop", 20, 4).await?;
    // The idle master's own rate (heartbeats of n agents): a cost per
    // second, not per build, taken out of the figure below.
    let (idle_from, idle_cpu) = (Instant::now(), cpu_ms(pid)?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_per_ms = (cpu_ms(pid)? - idle_cpu) / idle_from.elapsed().as_secs_f64() / 1000.0;
    let (from, before) = (Instant::now(), cpu_ms(pid)?);
    throughput(&farm, "noop", BUILDS, 4).await?;
    let spent = cpu_ms(pid)? - before;
    let idle = idle_per_ms * from.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "n = {n}: {:.2} ms per build in all, {:.2} ms idle (heartbeats) per build",
        spent / BUILDS as f64,
        idle / BUILDS as f64
    );
    let per_build = (spent - idle).max(0.0) / BUILDS as f64;
    stop.send_replace(true);
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(30), agent).await;
    }
    Ok(per_build)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_cpu_per_build_does_not_grow_with_idle_workers() -> anyhow::Result<()> {
    let few = cpu_per_build(50).await?;
    let many = cpu_per_build(2_000).await?;
    eprintln!(
        "master CPU per build, idle rate taken out: {few:.2} ms with 50 workers, {many:.2} ms with 2,000"
    );
    // 40 times the workers; a per-build cost linear in all of them would be
    // ~40x. The idle master's CPU (heartbeats) is taken out; the pick takes
    // the first of the builder's eligible workers (O(log n)): what is left
    // is the same work per build. The slack (3x + 2 ms) is for a loaded
    // 2-core machine, still far below linear.
    assert!(
        many <= few * 3.0 + 2.0,
        "CPU per build grew with the workers: {few:.2} ms with 50, {many:.2} ms with 2,000"
    );
    Ok(())
}
