//! End-to-end tests of sources and triggers through the real binaries: a
//! local bare repository over file://, a signed GitHub-format webhook that
//! queues a build checking out exactly the pushed revision, refused hooks
//! that queue nothing, polling that picks a new commit once (and not again
//! after a master restart), checkout modes on the second build, collapsing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use hmac::{Hmac, Mac};
use nightshift_proto::api::{BuildInfo, BuildState, SubmitRequest};
use nightshift_proto::wire::Outcome;
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};
use sha2::Sha256;

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// A bare "origin" plus a working clone that commits and pushes to it.
struct Repo {
    _dir: tempfile::TempDir,
    bare: PathBuf,
    work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "e2e")
        .env("GIT_AUTHOR_EMAIL", "e2e@example.org")
        .env("GIT_COMMITTER_NAME", "e2e")
        .env("GIT_COMMITTER_EMAIL", "e2e@example.org")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Repo {
    fn new() -> anyhow::Result<Repo> {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-repo-")
            .tempdir()?;
        let bare = dir.path().join("origin.git");
        let work = dir.path().join("dev");
        fs_err::create_dir_all(&bare)?;
        fs_err::create_dir_all(&work)?;
        git(&bare, &["init", "-q", "--bare", "-b", "main"])?;
        git(&work, &["init", "-q", "-b", "main"])?;
        git(
            &work,
            &["remote", "add", "origin", &bare.display().to_string()],
        )?;
        let repo = Repo {
            _dir: dir,
            bare,
            work,
        };
        repo.commit("one")?;
        Ok(repo)
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Commits `content` as `file.txt`, pushes main, returns the revision.
    fn commit(&self, content: &str) -> anyhow::Result<String> {
        fs_err::write(self.work.join("file.txt"), content)?;
        git(&self.work, &["add", "file.txt"])?;
        git(&self.work, &["commit", "-q", "-m", content])?;
        git(&self.work, &["push", "-q", "origin", "main"])?;
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

/// One HTTP/1.1 POST over plain TCP; returns the status and body.
fn post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    // A refused oversized body may close the connection before it is sent.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn github_push(repo: &Repo, revision: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000000",
        "after": revision,
        "repository": { "full_name": "acme/app", "clone_url": repo.url() },
        "pusher": { "name": "e2e" }
    })
    .to_string()
    .into_bytes()
}

fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `[[builder]]` with a source over `repo` and `steps` as (name, command).
fn sourced_builder(name: &str, repo: &Repo, extra: &str, steps: &[(&str, &str)]) -> String {
    let steps: Vec<String> = steps
        .iter()
        .map(|(n, c)| format!("{{ name = {}, command = {} }}", toml_str(n), toml_str(c)))
        .collect();
    format!(
        "\n[[builder]]\nname = {}\nworkers = [\"w\"]\nsource = {{ repo = {}, branch = \"main\"{extra} }}\nsteps = [{}]\n",
        toml_str(name),
        toml_str(&repo.url()),
        steps.join(", ")
    )
}

async fn all_builds(farm: &Farm) -> anyhow::Result<Vec<BuildInfo>> {
    Ok(farm.api()?.builds(200).await?.builds)
}

async fn trigger_counters(farm: &Farm) -> anyhow::Result<serde_json::Value> {
    let api = farm.api()?;
    let (status, body) = api.call_raw("GET", "/api/v1/triggers", None).await?;
    anyhow::ensure!(status == 200, "GET /api/v1/triggers: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}

const SHOW_SOURCE: &str = "test \"$(git rev-parse HEAD)\" = \"$NIGHTSHIFT_REVISION\" && \
     echo \"built $NIGHTSHIFT_BRANCH@$NIGHTSHIFT_REVISION from $NIGHTSHIFT_REPOSITORY: $(cat file.txt)\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_builds_exactly_its_revision_and_bad_hooks_queue_nothing()
-> anyhow::Result<()> {
    let repo = Repo::new()?;
    let extra = format!(
        "[[hook]]\nname = \"gh\"\nkind = \"github\"\nsecret_file = \"hook.secret\"\nbuilders = [\"app\"]\n{}",
        sourced_builder(
            "app",
            &repo,
            ", mode = \"full\", shallow = true",
            &[("show", SHOW_SOURCE)]
        )
    );
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new("w"))
        .master_toml(&extra)
        .start()
        .await?;
    fs_err::write(farm.dir.path().join("hook.secret"), "s3cret\n")?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;

    let second = repo.commit("two")?;
    // A third commit lands after the push we announce: the build must
    // still check out the announced one.
    let body = github_push(&repo, &second);
    repo.commit("three")?;
    let sig = signature("s3cret", &body);
    let (status, answer) = post(
        farm.port,
        "/hooks/gh",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &body,
    )?;
    assert_eq!(status, 202, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer)?;
    let id = answer["queued"][0]["build_id"]
        .as_u64()
        .expect("a queued build");
    let build = farm.wait_build(id).await?;
    let log = farm.api()?.log(id).await?.log;
    assert_eq!(build.outcome, Some(Outcome::Success), "{log}");
    assert_eq!(build.revision.as_deref(), Some(second.as_str()));
    assert_eq!(build.branch.as_deref(), Some("main"));
    assert_eq!(build.repository.as_deref(), Some(repo.url().as_str()));
    assert_eq!(build.trigger.as_deref(), Some("webhook gh"));
    assert!(
        log.contains(&format!("built main@{second} from {}: two", repo.url())),
        "{log}"
    );
    assert!(log.contains("nightshift: checkout of"), "{log}");
    assert_eq!(build.steps.len(), 2, "checkout + show: {build:?}");

    let before = all_builds(&farm).await?.len();
    // Wrong secret, no signature, unknown hook, garbage, oversized.
    let bad = signature("guess", &body);
    let (status, answer) = post(
        farm.port,
        "/hooks/gh",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &bad)],
        &body,
    )?;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("does not match"), "{answer}");
    let (status, answer) = post(farm.port, "/hooks/gh", &[("X-GitHub-Event", "push")], &body)?;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("missing X-Hub-Signature-256"), "{answer}");
    let (status, answer) = post(
        farm.port,
        "/hooks/nope",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &body,
    )?;
    assert_eq!(status, 404, "{answer}");
    let garbage = b"{\"ref\": 1}".to_vec();
    let (status, answer) = post(
        farm.port,
        "/hooks/gh",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &signature("s3cret", &garbage)),
        ],
        &garbage,
    )?;
    assert_eq!(status, 400, "{answer}");
    let huge = vec![b' '; 2 << 20];
    let (status, _) = post(
        farm.port,
        "/hooks/gh",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &huge,
    )?;
    assert_eq!(status, 413);
    assert_eq!(
        all_builds(&farm).await?.len(),
        before,
        "refused hooks queued nothing"
    );
    let counters = trigger_counters(&farm).await?;
    assert_eq!(counters["hook_bad_signature"], 2, "{counters}");
    assert_eq!(counters["hook_unknown"], 1, "{counters}");
    assert_eq!(counters["hook_malformed"], 1, "{counters}");
    assert_eq!(counters["hook_oversized"], 1, "{counters}");
    assert_eq!(counters["hook_builds_queued"], 1, "{counters}");
    // The same counts, per hook and reason, in /metrics.
    let (status, metrics) = farm.api()?.call_raw("GET", "/metrics", None).await?;
    assert_eq!(status, 200, "{metrics}");
    for line in [
        "nightshift_master_hook_accepted_total{hook=\"gh\"} 1",
        "nightshift_master_hook_builds_queued_total{hook=\"gh\"} 1",
        "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"bad_signature\"} 2",
        "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"malformed\"} 1",
        "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"oversized\"} 1",
        "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"secret_unavailable\"} 0",
        "nightshift_master_hook_unknown_total 1",
        "nightshift_master_triggered_builds_total{trigger=\"webhook\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }

    // `master builds` shows the source and the trigger.
    let (code, out, err) = farm.master_cli(&["builds"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("main@{}", &second[..12])), "{out}");
    assert!(out.contains("by webhook gh"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_queues_a_new_commit_once_even_across_a_master_restart() -> anyhow::Result<()> {
    let repo = Repo::new()?;
    let extra = format!(
        "{}poll = \"1s\"\n",
        sourced_builder("polled", &repo, "", &[("show", SHOW_SOURCE)])
    );
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new("w"))
        .master_toml(&extra)
        .start()
        .await?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    // The first poll only records the head.
    wait_for("the first poll", DEADLINE, || async {
        Ok(farm.master_log().contains("first seen at").then_some(()))
    })
    .await?;
    assert!(all_builds(&farm).await?.is_empty());

    let new = repo.commit("polled change")?;
    let build = wait_for("a build of the new commit", DEADLINE, || async {
        Ok(all_builds(&farm)
            .await?
            .into_iter()
            .find(|b| b.revision.as_deref() == Some(new.as_str())))
    })
    .await?;
    let build = farm.wait_build(build.id).await?;
    assert_eq!(build.outcome, Some(Outcome::Success));
    assert_eq!(build.trigger.as_deref(), Some("poll"));

    // Several more polls, then a restart and several more: still one build.
    let polls = |v: &serde_json::Value| v["polls"].as_u64().unwrap_or(0);
    let seen = polls(&trigger_counters(&farm).await?);
    wait_for("two more polls", DEADLINE, || async {
        Ok((polls(&trigger_counters(&farm).await?) >= seen + 2).then_some(()))
    })
    .await?;
    farm.stop_master().await?;
    farm.start_master().await?;
    wait_for("three polls after the restart", DEADLINE, || async {
        Ok((polls(&trigger_counters(&farm).await?) >= 3).then_some(()))
    })
    .await?;
    let builds = all_builds(&farm).await?;
    assert_eq!(builds.len(), 1, "{builds:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_modes_behave_as_named_on_the_second_build() -> anyhow::Result<()> {
    let repo = Repo::new()?;
    // Each build reports what the previous one left, then leaves an
    // untracked output, a dirty tracked file and a marker inside .git.
    let probe = "echo \"output=$(test -f out.o && echo kept || echo gone) \
                 marker=$(test -f .git/marker && echo kept || echo gone) file=$(cat file.txt)\"; \
                 touch out.o .git/marker; echo dirty > file.txt";
    let mut extra = String::new();
    for mode in ["incremental", "full", "fresh"] {
        extra.push_str(&sourced_builder(
            mode,
            &repo,
            &format!(", mode = \"{mode}\""),
            &[("probe", probe)],
        ));
    }
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new("w"))
        .master_toml(&extra)
        .start()
        .await?;
    farm.start_worker("w")?;
    farm.wait_worker_ready("w").await?;
    let api = farm.api()?;
    let first = git(&repo.work, &["rev-parse", "HEAD"])?;
    let second = repo.commit("two")?;
    for mode in ["incremental", "full", "fresh"] {
        let mut logs = Vec::new();
        for revision in [&first, &second] {
            let id = api
                .submit_request(&SubmitRequest {
                    builder: mode.into(),
                    properties: Default::default(),
                    revision: Some(revision.clone()),
                    branch: None,
                })
                .await?
                .build_id;
            let build = farm.wait_build(id).await?;
            let log = api.log(id).await?.log;
            assert_eq!(build.outcome, Some(Outcome::Success), "{mode}: {log}");
            assert_eq!(build.revision.as_deref(), Some(revision.as_str()));
            logs.push(log);
        }
        assert!(
            logs[0].contains("output=gone marker=gone file=one"),
            "{mode}: {}",
            logs[0]
        );
        let expected = match mode {
            "incremental" => "output=kept marker=kept file=two",
            "full" => "output=gone marker=kept file=two",
            _ => "output=gone marker=gone file=two",
        };
        assert!(logs[1].contains(expected), "{mode}: {}", logs[1]);
    }

    // `--branch` resolves the head on the master (git ls-remote); a short
    // or unknown revision is refused with the reason.
    let (code, out, err) =
        farm.master_cli(&["submit", "incremental", "--branch", "main", "--wait"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("main@{}", &second[..12])), "{out}");
    let (code, _, err) = farm.master_cli(&["submit", "incremental", "--revision", "abc123"])?;
    assert_eq!(code, 1);
    assert!(err.contains("not a full commit id"), "{err}");
    let (code, _, err) = farm.master_cli(&["submit", "incremental", "--branch", "nope"])?;
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_collapse_into_the_newest() -> anyhow::Result<()> {
    let repo = Repo::new()?;
    let extra = format!(
        "{}collapse = true\n",
        sourced_builder("app", &repo, "", &[("show", SHOW_SOURCE)])
    );
    let mut farm = Farm::builder()
        .insecure()
        .worker(WorkerSpec::new("w"))
        .master_toml(&extra)
        .start()
        .await?;
    let api = farm.api()?;
    // No worker yet: every request waits.
    let mut ids = Vec::new();
    let mut revisions = Vec::new();
    for n in 0..3 {
        let revision = repo.commit(&format!("c{n}"))?;
        let id = api
            .submit_request(&SubmitRequest {
                builder: "app".into(),
                properties: Default::default(),
                revision: Some(revision.clone()),
                branch: None,
            })
            .await?
            .build_id;
        ids.push(id);
        revisions.push(revision);
    }
    // Each waiting request collapses into the next newer one as it comes.
    for pair in ids.windows(2) {
        let build = farm.wait_build(pair[0]).await?;
        assert_eq!(build.outcome, Some(Outcome::Cancelled));
        assert_eq!(build.collapsed_into, Some(pair[1]), "{build:?}");
        assert!(build.started_at.is_none());
    }
    let (code, out, _) = farm.master_cli(&["builds"])?;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("collapsed into build {}", ids[2])),
        "{out}"
    );
    farm.start_worker("w")?;
    let newest = farm.wait_build(ids[2]).await?;
    assert_eq!(newest.outcome, Some(Outcome::Success));
    assert_eq!(newest.revision.as_deref(), Some(revisions[2].as_str()));
    let ran = all_builds(&farm)
        .await?
        .into_iter()
        .filter(|b| b.state == BuildState::Finished && b.started_at.is_some())
        .count();
    assert_eq!(ran, 1);
    Ok(())
}
