//! Tests of the dashboard: times and durations, workers, builds, builders, sessions' forms, waits.

use super::*;
use nightshift_proto::api::{WorkerInfo, WorkerList};

/// All of `list` as one page, with its counts by state.
fn page(list: WorkerList) -> WorkerPage {
    let mut counts = BTreeMap::new();
    for w in &list.workers {
        *counts.entry(w.state.as_str().to_owned()).or_insert(0) += 1;
    }
    WorkerPage {
        paused: list.paused,
        total: list.workers.len(),
        offset: 0,
        workers: list.workers,
        counts,
    }
}
use nightshift_policy::Source;

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

#[test]
fn full_times_name_the_zone() {
    // Central Europe with its DST rule, no tz database needed.
    let cet = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
    assert_eq!(
        full_time(at("2026-07-01T10:00:00.5Z"), &cet),
        "2026-07-01 12:00:00 CEST"
    );
}

fn worker(name: &str, state: PresenceState, reason: &str) -> WorkerInfo {
    WorkerInfo {
        name: name.to_owned(),
        state,
        reason: reason.to_owned(),
        source: Some(Source::Manual),
        since: Some(at("2026-11-23T10:18:00Z")),
        until: None,
        connected: true,
        max_builds: 2,
        running: Vec::new(),
        latent: None,
    }
}

fn build(id: BuildId, state: BuildState) -> BuildInfo {
    BuildInfo {
        id,
        builder: "hello".to_owned(),
        properties: BTreeMap::from([("secret".to_owned(), "hunter2".to_owned())]),
        state,
        worker: None,
        outcome: None,
        retries: 0,
        retry_reason: None,
        waiting_for: None,
        reason: None,
        submitted_at: at("2026-11-23T13:00:00Z"),
        started_at: None,
        finished_at: None,
        steps: Vec::new(),
        estimate_secs: None,
        repository: None,
        branch: None,
        revision: None,
        trigger: None,
        collapsed_into: None,
        artifacts: Vec::new(),
    }
}

#[test]
fn page_shows_workers_builds_and_the_pause_escaped() {
    let now = at("2026-11-23T13:30:00Z");
    let tz = TimeZone::UTC;
    let mut desk = worker("desk<1>", PresenceState::Away, "<script>alert(1)</script>");
    desk.until = Some(at("2026-11-23T19:00:00Z"));
    desk.running = vec![7];
    let mut cloud = worker("cloud", PresenceState::Offline, "no instance running");
    cloud.connected = false;
    cloud.source = Some(Source::Master);
    cloud.latent = Some(LatentInfo {
        state: "lingering".to_owned(),
        reason: "idle; stops at 13:40".to_owned(),
        since: at("2026-11-23T13:25:00Z"),
        retry_after: None,
        provider: "command".to_owned(),
    });
    let workers = WorkerList {
        paused: true,
        workers: vec![
            desk,
            cloud,
            worker("lab", PresenceState::Available, "night hours"),
        ],
    };
    let mut queued = build(9, BuildState::Queued);
    queued.waiting_for = Some("lock deploy".to_owned());
    queued.retries = 1;
    queued.retry_reason = Some("worker desk went away \"at once\"".to_owned());
    let mut running = build(7, BuildState::Running);
    running.worker = Some("desk<1>".to_owned());
    running.started_at = Some(at("2026-11-23T13:27:55Z"));
    let mut done = build(6, BuildState::Finished);
    done.outcome = Some(Outcome::Success);
    done.submitted_at = at("2026-11-22T07:59:00Z");
    done.started_at = Some(at("2026-11-22T08:00:00Z"));
    done.finished_at = Some(at("2026-11-22T08:01:05Z"));
    let mut cancelled = build(5, BuildState::Finished);
    cancelled.outcome = Some(Outcome::Cancelled);
    cancelled.reason = Some("cancelled by the admin".to_owned());
    let builds = vec![queued, running, done, cancelled];
    let counts = BuildCounts {
        queued: 1,
        running: 1,
    };

    let html = render(
        &page(workers),
        &builds,
        &[],
        counts,
        &Viewer::default(),
        now,
        &tz,
    );

    // Escaped, never raw.
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("desk&lt;1&gt;"));
    assert!(html.contains("title=\"worker desk went away &quot;at once&quot;\""));
    // Header, summary and the paused banner.
    assert!(html.contains("<title>nightshift master (paused)</title>"));
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    assert!(html.contains("refreshes every 10 s"));
    let text = strip_tags(&html);
    assert!(
        text.contains(
            "3 workers: 1 available, 0 reluctant, 1 away, 1 offline; 1 queued, 1 running"
        ),
        "{text}"
    );
    assert!(text.contains(
        "Paused: no new builds are handed out; running builds go on. master resume to resume."
    ));
    // Workers: pills, times, durations, latent instance.
    assert!(html.contains("<span class=\"pill away\">away</span>"));
    assert!(text.contains("10:18for 3h12m"), "{text}");
    assert!(text.contains("19:00in 5h30m"), "{text}");
    assert!(text.contains("#71 of 2 slots"), "{text}");
    assert!(html.contains("<span class=\"inst lingering\">lingering</span>"));
    assert!(text.contains("idle; stops at 13:40"));
    assert!(
        text.contains("provider command · since 13:25 (for 5m00s)"),
        "{text}"
    );
    assert!(text.contains("not connected"));
    // Builds: states, outcomes, waits, durations; no properties.
    assert!(text.contains("waiting for lock deploy"));
    assert!(text.contains("2m05s so far"), "{text}");
    assert!(text.contains("took 1m05s"), "{text}");
    assert!(text.contains("Sun 07:59"), "{text}");
    assert!(html.contains("<span class=\"pill cancelled\">cancelled</span>"));
    assert!(html.contains("<span class=\"outcome success\">success</span>"));
    assert!(text.contains("cancelled by the admin"));
    assert!(!html.contains("hunter2"), "build properties must not show");
}

#[test]
fn a_session_gets_forms_with_its_csrf_token_and_nobody_else_does() {
    let now = at("2026-11-23T13:30:00Z");
    let mut workers = WorkerList {
        paused: false,
        workers: Vec::new(),
    };
    let mut done = build(6, BuildState::Finished);
    done.outcome = Some(Outcome::Success);
    let builds = vec![build(7, BuildState::Queued), done];
    let session = Viewer {
        authenticated: true,
        csrf: Some("c5rf".to_owned()),
    };
    let html = render(
        &page(workers.clone()),
        &builds,
        &[],
        BuildCounts::default(),
        &session,
        now,
        &TimeZone::UTC,
    );
    assert!(html.contains("action=\"/farm/pause\""), "{html}");
    assert!(html.contains("action=\"/builds/7/cancel\""), "{html}");
    assert!(html.contains("action=\"/builds/6/rebuild\""), "{html}");
    assert!(!html.contains("/builds/6/cancel"), "{html}");
    assert!(html.contains("action=\"/logout\""), "{html}");
    assert_eq!(
        html.matches("name=\"csrf\" value=\"c5rf\"").count(),
        html.matches("<form").count(),
        "every form carries the token"
    );
    workers.paused = true;
    let paused = render(
        &page(workers.clone()),
        &builds,
        &[],
        BuildCounts::default(),
        &session,
        now,
        &TimeZone::UTC,
    );
    assert!(paused.contains("action=\"/farm/resume\""), "{paused}");
    assert!(!paused.contains("/farm/pause"), "{paused}");

    let anonymous = render(
        &page(workers.clone()),
        &builds,
        &[],
        BuildCounts::default(),
        &Viewer::default(),
        now,
        &TimeZone::UTC,
    );
    assert!(!anonymous.contains("<form"), "{anonymous}");
    assert!(anonymous.contains("href=\"/login?next=/\""), "{anonymous}");
}

#[test]
fn an_unpaused_empty_farm_says_what_to_do() {
    let now = at("2026-11-23T13:30:00Z");
    let workers = WorkerList {
        paused: false,
        workers: Vec::new(),
    };
    let html = render(
        &page(workers),
        &[],
        &[],
        BuildCounts::default(),
        &Viewer::default(),
        now,
        &TimeZone::UTC,
    );
    let text = strip_tags(&html);
    assert!(!text.contains("Paused"), "{text}");
    assert!(text.contains("0 workers: 0 available"), "{text}");
    assert!(text.contains("No workers: add [[worker]] entries"));
    assert!(text.contains("No builds yet: queue one with master submit BUILDER."));
}

#[test]
fn waits_read_as_phrases() {
    let check = |waiting: &str, expect: &str| assert_eq!(wait_phrase(waiting), expect);
    check("lock deploy (on b1)", "waiting for lock deploy (on b1)");
    check(
        "a worker: b1 away, b2 offline",
        "waiting for a worker: b1 away, b2 offline",
    );
    check(
        "latent worker cloud to start",
        "waiting for latent worker cloud to start",
    );
    check("master is paused", "held: the master is paused");
    check(
        "builder `app` is not in master.toml",
        "builder `app` is not in master.toml",
    );
}

#[test]
fn waits_come_from_the_live_view_and_finished_builds_wait_for_nothing() {
    let mut queued_stored = build(1, BuildState::Queued);
    queued_stored.waiting_for = Some("no available worker".to_owned());
    let mut running_stale = build(2, BuildState::Running);
    running_stale.waiting_for = Some("stale word".to_owned());
    let running_lock = build(3, BuildState::Running);
    let mut finished = build(4, BuildState::Finished);
    finished.waiting_for = Some("stale word".to_owned());
    let live = BTreeMap::from([(3, "lock deploy".to_owned())]);
    let estimates = BTreeMap::from([("hello".to_owned(), SignedDuration::from_secs(300))]);
    let builds = with_live_waits(
        vec![queued_stored, running_stale, running_lock, finished],
        &live,
        &estimates,
    );
    let waits: Vec<Option<&str>> = builds.iter().map(|b| b.waiting_for.as_deref()).collect();
    assert_eq!(
        waits,
        vec![Some("no available worker"), None, Some("lock deploy"), None]
    );
    // The estimate goes with unfinished builds only.
    let estimates: Vec<Option<u64>> = builds.iter().map(|b| b.estimate_secs).collect();
    assert_eq!(estimates, vec![Some(300), Some(300), Some(300), None]);
}

#[test]
fn estimates_read_in_minutes_rounded_up() {
    for (secs, words) in [
        (0, "1 s"),
        (42, "42 s"),
        (60, "1 min"),
        (61, "2 min"),
        (300, "5 min"),
        (3600, "1 h"),
        (4800, "1 h 20 min"),
        (4801, "1 h 21 min"),
    ] {
        assert_eq!(estimate_words(secs), words, "{secs} s");
    }
}

#[test]
fn builders_and_unfinished_builds_show_the_estimate() {
    let now = at("2026-11-23T13:30:00Z");
    let workers = WorkerList {
        paused: false,
        workers: vec![worker("lab", PresenceState::Available, "night hours")],
    };
    let builders = vec![
        BuilderRow {
            name: "app<x>".to_owned(),
            workers: 3,
            admission: Admission::Fit,
            estimate: Some(SignedDuration::from_secs(4800)),
        },
        BuilderRow {
            name: "docs".to_owned(),
            workers: 1,
            admission: Admission::BestEffort,
            estimate: None,
        },
    ];
    let mut queued = build(9, BuildState::Queued);
    queued.estimate_secs = Some(300);
    let mut running = build(7, BuildState::Running);
    running.started_at = Some(at("2026-11-23T13:28:00Z"));
    running.estimate_secs = Some(300);
    let html = render(
        &page(workers),
        &[queued, running],
        &builders,
        BuildCounts::default(),
        &Viewer::default(),
        now,
        &TimeZone::UTC,
    );
    let text = strip_tags(&html);
    assert!(html.contains("app&lt;x&gt;"), "{html}");
    assert!(
        text.contains("app<x>31 h 20 minfit: waits for a window that fits"),
        "{text}"
    );
    assert!(
        text.contains("docs1unknown until 3 successful buildsbest-effort"),
        "{text}"
    );
    assert!(text.contains("queued 30m00s; estimated 5 min"), "{text}");
    assert!(
        text.contains("2m00s so far of an estimated 5 min"),
        "{text}"
    );
}

/// The page's text without tags, entities decoded for the few used here.
fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

#[test]
fn worker_anchors_are_safe_ids() {
    assert_eq!(worker_anchor("lab-1_a"), "lab-1_a");
    assert_eq!(worker_anchor("a b\"<"), "a_b__");
}
