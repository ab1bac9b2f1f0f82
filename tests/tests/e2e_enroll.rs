//! End-to-end enrolment through the real binaries: two machines enrol in one
//! `[[worker_group]]` with the group's token (one with `worker enroll`, one
//! by its first `worker run`), each gets its own token (only the hash is
//! kept by the master), both run builds of a builder that lists the group,
//! the group token itself opens no agent session, a revoked worker is
//! refused and its place is free again, and enrolments survive a restart.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nightshift_policy::PresenceState;
use nightshift_proto::api::{ApiClient, BuildState};
use nightshift_proto::wire::Outcome;
use nightshift_tests::{FakeAgent, Farm, WorkerSpec, new_token, sha256_hex, wait_for};

/// Every file under the master's data dir, as bytes.
fn data_dir_bytes(farm: &Farm) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    for entry in walk(&farm.data_dir())? {
        all.extend(fs_err::read(entry)?);
    }
    Ok(all)
}

fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_token_enrols_workers_that_run_builds_and_a_revoked_one_is_refused()
-> anyhow::Result<()> {
    let group_token = new_token();
    let mut farm = Farm::builder()
        .master_toml(&format!(
            "[[worker_group]]\nname = \"lab\"\nenroll_token_sha256 = \"{}\"\nmax_builds = 1\n",
            sha256_hex(&group_token)
        ))
        .worker(WorkerSpec::enrolled("lab-1", &group_token))
        .worker(WorkerSpec::enrolled("lab-2", &group_token))
        .builder("app", &["lab"], &[("build", "sleep 1; echo built")])
        .start()
        .await?;
    let diagnostics = |farm: &Farm| {
        format!(
            "--- master log:\n{}\n--- lab-1:\n{}\n--- lab-2:\n{}",
            farm.master_log(),
            farm.worker_log("lab-1"),
            farm.worker_log("lab-2")
        )
    };

    // lab-1 enrols explicitly; its token file is private.
    let config = farm.write_worker_config("lab-1")?;
    let (code, stdout, stderr) = farm.worker_cli("lab-1", &["enroll"])?;
    assert_eq!(
        code,
        0,
        "worker enroll: {stdout}{stderr}\n{}",
        diagnostics(&farm)
    );
    assert!(
        stdout.contains("enrolled as lab-1 in group lab"),
        "{stdout}"
    );
    let token_file = config.with_file_name("worker.token");
    let lab1_token = fs_err::read_to_string(&token_file)?.trim().to_owned();
    assert_eq!(
        lab1_token.len(),
        64,
        "a fresh 256-bit token: {lab1_token:?}"
    );
    assert_ne!(lab1_token, group_token);
    let mode = fs_err::metadata(&token_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token_file mode {mode:o}");
    // Enrolling again is refused: the name is taken.
    let (code, _, stderr) = farm.worker_cli("lab-1", &["enroll"])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("already enrolled"), "{stderr}");

    // lab-2 enrols by itself on its first `worker run`.
    farm.start_worker("lab-1")?;
    farm.start_worker("lab-2")?;
    for name in ["lab-1", "lab-2"] {
        farm.wait_worker_state(name, PresenceState::Available)
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", diagnostics(&farm)))?;
    }
    let lab2_token =
        fs_err::read_to_string(farm.worker_config("lab-2").with_file_name("worker.token"))?
            .trim()
            .to_owned();
    assert_ne!(lab1_token, lab2_token, "each worker has its own token");
    // The master keeps only the hashes.
    let stored = data_dir_bytes(&farm)?;
    for token in [&lab1_token, &lab2_token, &group_token] {
        assert!(!contains(&stored, token), "a token is stored in clear");
    }
    assert!(contains(&stored, &sha256_hex(&lab1_token)));

    // Both run builds of the builder that lists the group.
    let api = farm.api()?;
    let first = api.submit("app", BTreeMap::new()).await?.build_id;
    let second = api.submit("app", BTreeMap::new()).await?.build_id;
    let mut ran_on = Vec::new();
    for id in [first, second] {
        let build = farm.wait_build(id).await?;
        assert_eq!(
            build.outcome,
            Some(Outcome::Success),
            "{build:?}\n{}",
            diagnostics(&farm)
        );
        ran_on.push(build.worker.clone().unwrap_or_default());
    }
    ran_on.sort();
    assert_eq!(ran_on, ["lab-1", "lab-2"], "{}", diagnostics(&farm));

    // The group token opens no agent session and runs nothing.
    let refusal = FakeAgent::try_connect(&farm, Some(&group_token))
        .await?
        .err()
        .expect("the enrolment token gets no WebSocket");
    assert_eq!(refusal.status, 401, "{refusal:?}");

    // Enrolment refusals say why and change nothing.
    let enroller = ApiClient::new(farm.url(), group_token.clone(), Some(farm.tls_client()?))?;
    let taken = enroller.enroll("lab-1").await.expect_err("lab-1 exists");
    assert_eq!(taken.status, Some(409), "{taken}");
    assert!(taken.message.contains("revoke"), "{taken}");
    let foreign = enroller
        .enroll("desk-1")
        .await
        .expect_err("not the group's prefix");
    assert_eq!(foreign.status, Some(400), "{foreign}");
    assert!(foreign.message.contains("lab-<suffix>"), "{foreign}");
    let stranger = ApiClient::new(farm.url(), new_token(), Some(farm.tls_client()?))?;
    let wrong = stranger
        .enroll("lab-9")
        .await
        .expect_err("not a group token");
    assert_eq!(wrong.status, Some(401), "{wrong}");
    let admin_only = enroller
        .revoke_worker("lab-1")
        .await
        .expect_err("admin only");
    assert_eq!(admin_only.status, Some(401), "{admin_only}");

    // Revoking lab-2: its connection ends and its token is refused.
    let (code, stdout, stderr) = farm.master_cli(&["revoke-worker", "lab-2"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("lab-2 (group lab) revoked"), "{stdout}");
    let refusal = FakeAgent::try_connect(&farm, Some(&lab2_token))
        .await?
        .err()
        .expect("a revoked token gets no WebSocket");
    assert_eq!(refusal.status, 401, "{refusal:?}");
    wait_for(
        "lab-2 to be gone from the workers",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let list = api.workers().await?;
                Ok((!list.workers.iter().any(|w| w.name == "lab-2")).then_some(()))
            }
        },
    )
    .await?;
    let (code, _, stderr) = farm.master_cli(&["revoke-worker", "lab-2"])?;
    assert_ne!(code, 0, "revoking twice: {stderr}");
    assert!(stderr.contains("no enrolled worker `lab-2`"), "{stderr}");
    // Builds go to lab-1 only now.
    let third = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm.wait_build(third).await?;
    assert_eq!(
        build.worker.as_deref(),
        Some("lab-1"),
        "{}",
        diagnostics(&farm)
    );

    // Enrolments survive a master restart: lab-1 comes back and builds.
    farm.stop_master().await?;
    farm.start_master().await?;
    farm.wait_worker_state("lab-1", PresenceState::Available)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", diagnostics(&farm)))?;
    let api = farm.api()?;
    let fourth = api.submit("app", BTreeMap::new()).await?.build_id;
    let build = farm.wait_build(fourth).await?;
    assert_eq!(build.state, BuildState::Finished);
    assert_eq!(build.worker.as_deref(), Some("lab-1"));
    assert!(
        !api.workers()
            .await?
            .workers
            .iter()
            .any(|w| w.name == "lab-2"),
        "a revoked worker stays revoked after a restart"
    );
    Ok(())
}

/// The enrolment endpoint limits each source address (and all together):
/// past its burst, even guesses of the token are answered 429 with the
/// time to come back, and /metrics counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolments_past_the_rate_limit_are_told_to_retry_later() -> anyhow::Result<()> {
    let group_token = new_token();
    let farm = Farm::builder()
        .master_toml(&format!(
            "[[worker_group]]\nname = \"lab\"\nenroll_token_sha256 = \"{}\"\n",
            sha256_hex(&group_token)
        ))
        .start()
        .await?;
    let guesser = ApiClient::new(farm.url(), new_token(), Some(farm.tls_client()?))?;
    let mut limited = None;
    // The burst per source is 60; the sustained rate (2/s) adds a few while
    // this loop runs on a loaded machine, so allow some more.
    for attempt in 0..400 {
        let refused = guesser
            .enroll("lab-1")
            .await
            .expect_err("a guessed token enrols nothing");
        match refused.status {
            Some(401) => continue,
            Some(429) => {
                limited = Some((attempt, refused));
                break;
            }
            _ => panic!("attempt {attempt}: {refused}\n{}", farm.master_log()),
        }
    }
    let (attempt, refused) = limited.unwrap_or_else(|| {
        panic!(
            "400 enrolments from one address were never limited\n{}",
            farm.master_log()
        )
    });
    assert!(attempt >= 60, "limited after only {attempt} attempts");
    assert!(
        refused
            .message
            .contains("too many enrolments from this address")
            && refused.message.contains("retry after"),
        "{refused}"
    );
    // The right token is held up too while the address is over its limit.
    let enroller = ApiClient::new(farm.url(), group_token, Some(farm.tls_client()?))?;
    let held = enroller.enroll("lab-1").await.expect_err("over the limit");
    assert_eq!(held.status, Some(429), "{held}");
    let (status, metrics) = farm.api()?.call_raw("GET", "/metrics", None).await?;
    assert_eq!(status, 200, "{metrics}");
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("nightshift_master_enrolments_rate_limited_total{limit=\"source\"}")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no source-limit counter in /metrics:\n{metrics}"));
    assert!(counted >= 2.0, "{counted} refusals counted:\n{metrics}");
    Ok(())
}

/// A `schedule` in the `[[worker_group]]` holds for every enrolled member as
/// a master source, the same as a `[[worker]]`'s: outside its window the
/// member is away and a build for the group waits with the schedule's
/// reason; a reconfig that removes the schedule lets the build run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_schedule_keeps_its_enrolled_members_away_outside_its_window() -> anyhow::Result<()>
{
    let group_token = new_token();
    // A window that opens two hours from now: every member is outside it.
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let open = now.checked_add(jiff::SignedDuration::from_hours(2))?;
    let close = now.checked_add(jiff::SignedDuration::from_hours(3))?;
    let hours = format!("{}-{}", open.strftime("%H:%M"), close.strftime("%H:%M"));
    let schedule = format!(
        "timezone = \"UTC\"\nschedule = [{{ name = \"lab-hours\", hours = \"{hours}\" }}]\n"
    );
    let mut farm = Farm::builder()
        .master_toml(&format!(
            "[[worker_group]]\nname = \"lab\"\nenroll_token_sha256 = \"{}\"\n{schedule}",
            sha256_hex(&group_token)
        ))
        .worker(WorkerSpec::enrolled("lab-1", &group_token))
        .builder("app", &["lab"], &[("build", "echo built")])
        .start()
        .await?;
    let diagnostics = |farm: &Farm| {
        format!(
            "--- master log:\n{}\n--- lab-1:\n{}",
            farm.master_log(),
            farm.worker_log("lab-1")
        )
    };

    // lab-1 enrols on its first run and is kept away by the group's schedule.
    farm.start_worker("lab-1")?;
    let lab1 = farm
        .wait_worker("lab-1", "lab-1 to be away by its group's schedule", |w| {
            w.connected && w.state == PresenceState::Away
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", diagnostics(&farm)))?;
    assert_eq!(
        lab1.source,
        Some(nightshift_policy::Source::Master),
        "{lab1:?}"
    );
    assert!(lab1.reason.contains("lab-hours"), "{lab1:?}");
    let api = farm.api()?;
    let id = api.submit("app", BTreeMap::new()).await?.build_id;
    let queued = farm
        .wait_build_state(id, "the build to wait for lab-1", |b| {
            b.waiting_for
                .as_deref()
                .is_some_and(|w| w.contains("lab-1 away"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", diagnostics(&farm)))?;
    assert_eq!(queued.state, BuildState::Queued, "{queued:?}");
    // The agent is told and shows it too.
    let (code, stdout, stderr) = farm.worker_cli("lab-1", &["status", "--json"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("lab-hours"), "{stdout}");

    // The schedule goes: the member's own presence counts again.
    let text = fs_err::read_to_string(&farm.config)?;
    anyhow::ensure!(text.contains(&schedule), "master.toml:\n{text}");
    fs_err::write(&farm.config, text.replacen(&schedule, "", 1))?;
    let (code, stdout, stderr) = farm.master_cli(&["reconfig"])?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("worker groups: lab"), "{stdout}");
    let done = farm.wait_build(id).await?;
    assert_eq!(
        done.outcome,
        Some(Outcome::Success),
        "{done:?}\n{}",
        diagnostics(&farm)
    );
    assert_eq!(done.worker.as_deref(), Some("lab-1"));
    Ok(())
}
