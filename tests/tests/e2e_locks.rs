//! End-to-end tests of counting locks through the real `master` and `worker`
//! binaries: builder-level master locks, worker-scoped locks, and the
//! step-level "one checkout at a time, one compile at a time" case.
//!
//! Steps wait for gate files that the test creates, so the test decides when
//! each step may end; what it observes (steps started, builds waiting for a
//! lock) is awaited with generous deadlines, never slept for.

use std::path::{Path, PathBuf};

use nightshift_proto::api::{BuildInfo, BuildState};
use nightshift_proto::wire::{BuildId, Outcome};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};

/// A step command that marks `<dir>/<name>.started`, waits for
/// `<dir>/<name>.go`, then marks `<dir>/<name>.done`. `$PWD` is the build
/// directory, one per worker and builder.
fn gated(name: &str) -> String {
    format!(
        "touch {name}.started; while [ ! -f {name}.go ]; do sleep 0.05; done; rm -f {name}.go; touch {name}.done"
    )
}

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// Where `worker` runs builds of `builder` (the harness's layout).
fn build_dir(farm: &Farm, worker: &str, builder: &str) -> PathBuf {
    farm.dir
        .path()
        .join("workers")
        .join(worker)
        .join("work")
        .join(builder)
}

async fn wait_file(what: &str, path: &Path) -> anyhow::Result<()> {
    wait_for(what, DEADLINE, || async { Ok(path.exists().then_some(())) }).await
}

fn open(path: &Path) {
    fs_err::write(path, b"").expect("the gate file can be written");
}

async fn submit(farm: &Farm, builder: &str) -> anyhow::Result<BuildId> {
    Ok(farm
        .api()?
        .submit(builder, Default::default())
        .await?
        .build_id)
}

async fn waiting_for(farm: &Farm, id: BuildId, text: &str) -> anyhow::Result<BuildInfo> {
    farm.wait_build_state(id, &format!("build {id} to show `{text}`"), |b| {
        b.waiting_for.as_deref().is_some_and(|w| w.contains(text))
    })
    .await
}

fn assert_success(build: &BuildInfo) {
    assert_eq!(build.outcome, Some(Outcome::Success), "{build:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_builders_sharing_a_master_lock_never_overlap() -> anyhow::Result<()> {
    let extra = format!(
        r#"
[[lock]]
name = "deploy"
scope = "master"
max_count = 1

[[builder]]
name = "a"
workers = ["w1"]
locks = [{{ name = "deploy", access = "exclusive" }}]
steps = [{{ name = "ship", command = {a} }}]

[[builder]]
name = "b"
workers = ["w2"]
locks = [{{ name = "deploy", access = "counting" }}]
steps = [{{ name = "ship", command = {b} }}]
"#,
        a = toml_str(&gated("ship")),
        b = toml_str(&gated("ship")),
    );
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .worker(WorkerSpec::new("w2"))
        .master_toml(&extra)
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.start_worker("w2")?;
    farm.wait_worker_state("w1", nightshift_policy::PresenceState::Available)
        .await?;
    farm.wait_worker_state("w2", nightshift_policy::PresenceState::Available)
        .await?;

    let a_dir = build_dir(&farm, "w1", "a");
    let b_dir = build_dir(&farm, "w2", "b");
    let first = submit(&farm, "a").await?;
    wait_file("a's step to start", &a_dir.join("ship.started")).await?;
    let second = submit(&farm, "b").await?;
    // b's worker is free, but the lock is not: b waits, and says why.
    let waiting = waiting_for(&farm, second, "lock deploy").await?;
    assert_eq!(waiting.state, BuildState::Queued);
    assert!(
        !b_dir.join("ship.started").exists(),
        "b must not run while a holds deploy"
    );
    let (code, stdout, _) = farm.master_cli(&["builds"])?;
    assert_eq!(code, 0);
    assert!(stdout.contains("waiting for lock deploy"), "{stdout}");

    open(&a_dir.join("ship.go"));
    let a = farm.wait_build(first).await?;
    assert_success(&a);
    wait_file("b's step to start", &b_dir.join("ship.started")).await?;
    open(&b_dir.join("ship.go"));
    let b = farm.wait_build(second).await?;
    assert_success(&b);
    let (a_end, b_start) = (
        a.finished_at.expect("finished"),
        b.started_at.expect("started"),
    );
    assert!(
        b_start >= a_end,
        "b started at {b_start}, before a ended at {a_end}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lock_limits_each_worker_separately() -> anyhow::Result<()> {
    let extra = format!(
        r#"
[[lock]]
name = "disk"
scope = "worker"
max_count = 1

[[builder]]
name = "io"
workers = ["w1", "w2"]
locks = [{{ name = "disk", access = "counting" }}]
steps = [{{ name = "write", command = {cmd} }}]
"#,
        cmd = toml_str("while [ ! -f go ]; do sleep 0.05; done"),
    );
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1").max_builds(2))
        .worker(WorkerSpec::new("w2").max_builds(2))
        .master_toml(&extra)
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.start_worker("w2")?;
    farm.wait_worker_state("w1", nightshift_policy::PresenceState::Available)
        .await?;
    farm.wait_worker_state("w2", nightshift_policy::PresenceState::Available)
        .await?;

    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(&farm, "io").await?);
    }
    let api = farm.api()?;
    // Two run, one per worker (each has room for two builds but one disk
    // unit); the other two wait for the disk of a worker.
    let builds = wait_for("two running and two waiting for a disk", DEADLINE, || {
        let api = api.clone();
        let ids = ids.clone();
        async move {
            let mut builds = Vec::new();
            for id in ids {
                builds.push(api.build(id).await?);
            }
            let running = builds
                .iter()
                .filter(|b| b.state == BuildState::Running)
                .count();
            let waiting = builds
                .iter()
                .filter(|b| {
                    b.state == BuildState::Queued
                        && b.waiting_for
                            .as_deref()
                            .is_some_and(|w| w.contains("lock disk on w"))
                })
                .count();
            Ok((running == 2 && waiting == 2).then_some(builds))
        }
    })
    .await?;
    let mut running_on: Vec<String> = builds
        .iter()
        .filter(|b| b.state == BuildState::Running)
        .filter_map(|b| b.worker.clone())
        .collect();
    running_on.sort();
    assert_eq!(
        running_on,
        vec!["w1", "w2"],
        "one build per worker holds its disk"
    );

    for worker in ["w1", "w2"] {
        let dir = build_dir(&farm, worker, "io");
        fs_err::create_dir_all(&dir)?;
        open(&dir.join("go"));
    }
    for id in &ids {
        assert_success(&farm.wait_build(*id).await?);
    }
    // Per worker, the two builds ran one after the other.
    let finished: Vec<BuildInfo> = {
        let mut all = Vec::new();
        for id in &ids {
            all.push(api.build(*id).await?);
        }
        all
    };
    for worker in ["w1", "w2"] {
        let mut mine: Vec<&BuildInfo> = finished
            .iter()
            .filter(|b| b.worker.as_deref() == Some(worker))
            .collect();
        assert_eq!(mine.len(), 2, "two builds on {worker}: {finished:?}");
        mine.sort_by_key(|b| b.started_at);
        assert!(
            mine[1].started_at >= mine[0].finished_at,
            "builds overlapped on {worker}: {mine:?}"
        );
    }
    Ok(())
}

/// The first lock request ever made: one checkout at a time, one compile at
/// a time, but a checkout may run while another build compiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_locks_one_checkout_and_one_compile_at_a_time() -> anyhow::Result<()> {
    let extra = format!(
        r#"
[[lock]]
name = "checkout"
scope = "master"
max_count = 1

[[lock]]
name = "compile"
scope = "master"
max_count = 1

[[builder]]
name = "app"
workers = ["w1", "w2"]
steps = [
  {{ name = "checkout", command = {checkout}, locks = [{{ name = "checkout", access = "exclusive" }}] }},
  {{ name = "compile", command = {compile}, locks = [{{ name = "compile", access = "exclusive" }}] }},
]
"#,
        checkout = toml_str(&gated("checkout")),
        compile = toml_str(&gated("compile")),
    );
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .worker(WorkerSpec::new("w2"))
        .master_toml(&extra)
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.start_worker("w2")?;
    farm.wait_worker_state("w1", nightshift_policy::PresenceState::Available)
        .await?;
    farm.wait_worker_state("w2", nightshift_policy::PresenceState::Available)
        .await?;

    let x = submit(&farm, "app").await?;
    let y = submit(&farm, "app").await?;
    let api = farm.api()?;
    // Both builds run (one per worker); exactly one checks out, the other
    // waits for the checkout lock.
    let dirs = [build_dir(&farm, "w1", "app"), build_dir(&farm, "w2", "app")];
    let (first, second) = wait_for("one checkout running, the other waiting", DEADLINE, || {
        let api = api.clone();
        let dirs = dirs.clone();
        async move {
            let bx = api.build(x).await?;
            let by = api.build(y).await?;
            if bx.state != BuildState::Running || by.state != BuildState::Running {
                return Ok(None);
            }
            let started: Vec<usize> = (0..2)
                .filter(|i| dirs[*i].join("checkout.started").exists())
                .collect();
            let waiting = [&bx, &by]
                .iter()
                .filter(|b| b.waiting_for.as_deref() == Some("lock checkout"))
                .count();
            Ok((started.len() == 1 && waiting == 1).then(|| (started[0], 1 - started[0])))
        }
    })
    .await?;
    let (first_dir, second_dir) = (&dirs[first], &dirs[second]);

    // The first checkout ends: the first build compiles, and the second
    // build's checkout runs meanwhile.
    open(&first_dir.join("checkout.go"));
    wait_file(
        "the first compile to start",
        &first_dir.join("compile.started"),
    )
    .await?;
    wait_file(
        "the second checkout to start",
        &second_dir.join("checkout.started"),
    )
    .await?;
    assert!(
        !first_dir.join("compile.done").exists(),
        "a checkout runs while another build compiles"
    );

    // The second checkout ends; its compile waits for the first compile.
    open(&second_dir.join("checkout.go"));
    wait_file(
        "the second checkout to end",
        &second_dir.join("checkout.done"),
    )
    .await?;
    let second_id = if first == 0 { y } else { x };
    let first_id = if first == 0 { x } else { y };
    waiting_for(&farm, second_id, "lock compile").await?;
    let (code, stdout, _) = farm.master_cli(&["builds"])?;
    assert_eq!(code, 0);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&second_id.to_string()))
        .unwrap_or_default();
    assert!(
        line.contains("running") && line.contains("waiting for lock compile"),
        "{stdout}"
    );
    assert!(
        !second_dir.join("compile.started").exists(),
        "one compile at a time"
    );

    open(&first_dir.join("compile.go"));
    assert_success(&farm.wait_build(first_id).await?);
    wait_file(
        "the second compile to start",
        &second_dir.join("compile.started"),
    )
    .await?;
    open(&second_dir.join("compile.go"));
    assert_success(&farm.wait_build(second_id).await?);
    Ok(())
}

/// A worker lost mid-step gives its step lock back when its build is
/// re-queued, so the build waiting for that lock runs; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_releases_its_step_lock_when_its_build_is_requeued() -> anyhow::Result<()> {
    let extra = format!(
        r#"
[[lock]]
name = "compile"
scope = "master"
max_count = 1

[[builder]]
name = "app"
workers = ["w1", "w2"]
steps = [{{ name = "compile", command = {cmd}, locks = [{{ name = "compile", access = "exclusive" }}] }}]
"#,
        cmd = toml_str(&gated("compile")),
    );
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .worker(WorkerSpec::new("w2"))
        .missing_timeout("2s")
        .master_toml(&extra)
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.start_worker("w2")?;
    farm.wait_worker_state("w1", nightshift_policy::PresenceState::Available)
        .await?;
    farm.wait_worker_state("w2", nightshift_policy::PresenceState::Available)
        .await?;

    let first = submit(&farm, "app").await?;
    let holder = farm
        .wait_build_state(first, "the first build to run", |b| {
            b.state == BuildState::Running
        })
        .await?
        .worker
        .expect("running on a worker");
    wait_file(
        "the first compile to start",
        &build_dir(&farm, &holder, "app").join("compile.started"),
    )
    .await?;
    let second = submit(&farm, "app").await?;
    let waiting = waiting_for(&farm, second, "lock compile").await?;
    let other = waiting.worker.clone().expect("running on the other worker");
    assert_ne!(holder, other);

    // The holder's machine dies; after missing_timeout its build is
    // re-queued and its lock released: the second build compiles.
    farm.kill_worker(&holder)?;
    let other_dir = build_dir(&farm, &other, "app");
    wait_file(
        "the second compile to start",
        &other_dir.join("compile.started"),
    )
    .await?;
    let requeued = farm
        .wait_build_state(first, "the first build to be re-queued", |b| b.retries >= 1)
        .await?;
    assert!(requeued.retry_reason.is_some(), "{requeued:?}");
    open(&other_dir.join("compile.go"));
    assert_success(&farm.wait_build(second).await?);
    // The re-queued build runs on the surviving worker, lock and all.
    open(&other_dir.join("compile.go"));
    let done = farm.wait_build(first).await?;
    assert_success(&done);
    assert_eq!(done.worker.as_deref(), Some(other.as_str()));
    Ok(())
}

/// Many builders with overlapping builder- and step-level lock sets, all
/// through the real binaries: every build finishes (no deadlock), and no
/// two holders of a lock ever overlap (each holder claims the lock's
/// directory with an atomic `mkdir`; a failed claim is recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_overlapping_lock_sets_finish_without_overlap() -> anyhow::Result<()> {
    const LOCKS: [(&str, bool); 4] = [("m1", false), ("m2", false), ("m3", false), ("wl", true)];
    // A fixed seed by default; NIGHTSHIFT_LOCK_SEED explores others.
    let mut seed: u64 = std::env::var("NIGHTSHIFT_LOCK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d);
    eprintln!("lock stress seed {seed}");
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let root = tempfile::tempdir()?;
    let root_path = root.path().display().to_string();
    // Where a lock's "held" directory lives: one per master lock, one per
    // worker (its workdir, the parent of the build dir) for the worker lock.
    let dir_of = |name: &str, worker_scoped: bool| {
        if worker_scoped {
            format!("\"$(dirname \"$PWD\")/{name}.held\"")
        } else {
            format!("{root_path}/{name}.held")
        }
    };
    let claim = |names: &[(&str, bool)]| {
        names
            .iter()
            .map(|(n, w)| {
                format!(
                    "mkdir {d} || echo {n} >> {root_path}/overlap; ",
                    d = dir_of(n, *w)
                )
            })
            .collect::<String>()
    };
    let release = |names: &[(&str, bool)]| {
        names
            .iter()
            .map(|(n, w)| {
                format!(
                    "rmdir {d} || echo {n} >> {root_path}/overlap; ",
                    d = dir_of(n, *w)
                )
            })
            .collect::<String>()
    };
    let mut extra = String::new();
    for (name, worker_scoped) in LOCKS {
        extra.push_str(&format!(
            "\n[[lock]]\nname = \"{name}\"\nscope = \"{}\"\nmax_count = 1\n",
            if worker_scoped { "worker" } else { "master" }
        ));
    }
    let builders = 6;
    for b in 0..builders {
        let mut build_locks = Vec::new();
        let mut step_locks = Vec::new();
        for lock in LOCKS {
            match next(3) {
                0 => build_locks.push(lock),
                1 => step_locks.push(lock),
                _ => {}
            }
        }
        let access = |_: &str| {
            if next(2) == 0 {
                "exclusive"
            } else {
                "counting"
            }
        };
        let claims = |set: &[(&str, bool)], access: &mut dyn FnMut(&str) -> &'static str| {
            set.iter()
                .map(|(n, _)| format!("{{ name = \"{n}\", access = \"{}\" }}", access(n)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut access = access;
        let build_claims = claims(&build_locks, &mut access);
        let step_claims = claims(&step_locks, &mut access);
        extra.push_str(&format!(
            r#"
[[builder]]
name = "b{b}"
workers = ["w1", "w2", "w3"]
locks = [{build_claims}]
steps = [
  {{ name = "take", command = {take} }},
  {{ name = "work", command = {work}, locks = [{step_claims}] }},
  {{ name = "give", command = {give} }},
]
"#,
            take = toml_str(&format!("{}true", claim(&build_locks))),
            work = toml_str(&format!(
                "{}sleep 0.02; {}true",
                claim(&step_locks),
                release(&step_locks)
            )),
            give = toml_str(&format!("{}true", release(&build_locks))),
        ));
    }
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1").max_builds(2))
        .worker(WorkerSpec::new("w2").max_builds(2))
        .worker(WorkerSpec::new("w3").max_builds(2))
        .master_toml(&extra)
        .start()
        .await?;
    for w in ["w1", "w2", "w3"] {
        farm.start_worker(w)?;
    }
    for w in ["w1", "w2", "w3"] {
        farm.wait_worker_state(w, nightshift_policy::PresenceState::Available)
            .await?;
    }
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(submit(&farm, &format!("b{}", next(builders))).await?);
    }
    for id in ids {
        assert_success(&farm.wait_build(id).await?);
    }
    let overlap = root.path().join("overlap");
    assert!(
        !overlap.exists(),
        "locks overlapped: {}",
        fs_err::read_to_string(&overlap).unwrap_or_default()
    );
    Ok(())
}
