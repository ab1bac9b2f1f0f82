//! The master's embedded SQLite store: build requests and builds, step
//! results, logs, workers' last presence and the pause flag.
//!
//! One dedicated thread owns the connection. Callers send it jobs over a
//! channel; the thread runs whatever jobs are waiting in ONE transaction
//! (each in its own savepoint, so one failing job changes nothing of its
//! own and spoils nothing of the others), commits, and only then answers
//! every caller. A submit therefore returns after its row is committed, and
//! a burst of small writes costs one commit instead of many.
//!
//! WAL with `synchronous = NORMAL`: a committed transaction survives a
//! SIGKILL of the master (only a power loss can take the last commits).
//!
//! Bounded: the job queue holds at most [`STORE_QUEUE`] jobs; a caller that
//! finds it full waits (real backpressure: the scheduler slows down, its
//! connections stop reading, TCP pushes back on the agents). Each build's
//! log is capped ([`Store::set_log_cap`]); output past the cap is counted,
//! not stored, and the log ends with a line saying how much was dropped.
//!
//! A build remembers who it was handed to (`handed_to`), also across a
//! re-queue, and [`Store::finish`] accepts a result only from that worker.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use anyhow::{Context, anyhow};
use jiff::Timestamp;
use nightshift_policy::Presence;
use nightshift_proto::api::{BuildInfo, BuildState};
use nightshift_proto::wire::{
    BuildId, BuildResult, BuildSource, CheckoutMode, Outcome, StepResult,
};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::live_log::{LiveEvent, LiveLogs};
use crate::outbox::{Committed, commit_signal};
use crate::worker_groups::Member;

/// What runs after the batch's commit (or failed commit: `false`).
type Completion = Box<dyn FnOnce(bool) + Send>;
/// A job reports whether it succeeded (else its savepoint is rolled back).
type Job = Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>;

/// Most jobs folded into one transaction.
const MAX_BATCH: usize = 512;

/// Most jobs waiting for the store thread; senders wait beyond that.
pub const STORE_QUEUE: usize = 4096;

/// Default per-build log cap (`max_log_bytes` in master.toml).
pub const DEFAULT_LOG_CAP: u64 = 64 << 20;

/// Ordered schema migrations; `PRAGMA user_version` counts the applied ones.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    builder TEXT NOT NULL,
    properties TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'finished')),
    worker TEXT,
    retries INTEGER NOT NULL DEFAULT 0,
    retry_reason TEXT,
    outcome TEXT,
    reason TEXT,
    waiting_for TEXT,
    submitted_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX builds_unfinished ON builds(state) WHERE state != 'finished';
CREATE TABLE step_results (
    build_id INTEGER NOT NULL REFERENCES builds(id),
    step INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (build_id, step)
);
CREATE TABLE logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL,
    step INTEGER,
    data TEXT NOT NULL
);
CREATE INDEX logs_by_build ON logs(build_id, seq);
CREATE TABLE worker_presence (
    name TEXT PRIMARY KEY,
    presence TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE builds ADD COLUMN repository TEXT;
ALTER TABLE builds ADD COLUMN branch TEXT;
ALTER TABLE builds ADD COLUMN revision TEXT;
ALTER TABLE builds ADD COLUMN trigger TEXT;
ALTER TABLE builds ADD COLUMN collapsed_into INTEGER;
CREATE TABLE source_heads (
    repository TEXT NOT NULL,
    branch TEXT NOT NULL,
    revision TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (repository, branch)
);
CREATE TABLE timed_builds (
    builder TEXT PRIMARY KEY,
    revision TEXT,
    fired_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE builds ADD COLUMN handed_to TEXT;
UPDATE builds SET handed_to = worker WHERE worker IS NOT NULL;
ALTER TABLE builds ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN log_dropped INTEGER NOT NULL DEFAULT 0;
UPDATE builds SET log_bytes = COALESCE(
    (SELECT SUM(length(CAST(data AS BLOB))) FROM logs WHERE logs.build_id = builds.id), 0);
CREATE TABLE step_grants (
    build_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    worker TEXT NOT NULL,
    PRIMARY KEY (build_id, step)
);
"#,
    r#"
CREATE TABLE artifacts (
    build_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX artifacts_by_age ON artifacts(stored_at);
CREATE TABLE enrolled_workers (
    name TEXT PRIMARY KEY,
    worker_group TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    enrolled_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE builds ADD COLUMN cool_off_worker TEXT;
ALTER TABLE builds ADD COLUMN cool_off_until TEXT;
"#,
];

/// A build that is not finished, as loaded at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct UnfinishedBuild {
    pub id: BuildId,
    pub builder: String,
    pub properties: BTreeMap<String, String>,
    pub state: BuildState,
    pub worker: Option<String>,
    /// The worker it was last handed to (kept across a re-queue): the only
    /// one whose result or adoption of it is accepted.
    pub handed_to: Option<String>,
    pub retries: u32,
    pub source: Option<BuildSource>,
    /// The worker it is kept away from after its lock lease ended there,
    /// and until when (a restart keeps the cool-off).
    pub cool_off: Option<(String, Timestamp)>,
}

/// A build request to insert: what the API and the triggers queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBuild {
    pub builder: String,
    pub properties: BTreeMap<String, String>,
    pub source: Option<BuildSource>,
    /// What queued it (`submit`, `webhook <name>`, `poll`, `schedule`).
    pub trigger: String,
}

/// What [`Store::advance_head`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadAdvance {
    /// The branch is where it was last seen: nothing queued.
    Unchanged,
    /// First sight of the branch: its head is recorded, nothing queued.
    Baseline,
    /// A new head: recorded, and these builds queued in the same commit.
    Queued(Vec<BuildId>),
}

/// A step whose locks were granted, as persisted (re-taken after a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepGrant {
    pub build_id: BuildId,
    pub step: u32,
    pub worker: String,
}

/// What a stored result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The result is now stored.
    Stored,
    /// The build was already finished by this worker: nothing changed.
    AlreadyStored,
    /// The build does not exist, was never handed to this worker, or
    /// another worker finished it.
    NotYours,
}

/// A build's log as a viewer starts watching it: see [`Store::watch_log`].
#[derive(Debug)]
pub struct LogWatch {
    pub log: String,
    /// Earlier output was left out of `log`.
    pub cut: bool,
    pub finished: bool,
    /// The output that follows (`None` once finished).
    pub live: Option<tokio::sync::broadcast::Receiver<LiveEvent>>,
}

/// Handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::SyncSender<Job>,
    /// Per-build log cap in bytes.
    log_cap: Arc<AtomicU64>,
    /// Viewers of live logs, fed from inside the store thread.
    live: LiveLogs,
}

impl Store {
    /// Opens (creating and migrating) `path` and starts the store thread.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .with_context(|| format!("cannot configure {}", path.display()))?;
        migrate(&conn).with_context(|| format!("cannot migrate {}", path.display()))?;
        let (jobs, inbox) = mpsc::sync_channel::<Job>(STORE_QUEUE);
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || run(conn, inbox))
            .context("cannot start the store thread")?;
        Ok(Store {
            jobs,
            log_cap: Arc::new(AtomicU64::new(DEFAULT_LOG_CAP)),
            live: LiveLogs::default(),
        })
    }

    /// Sets the per-build log cap (`max_log_bytes`), for logs written from now on.
    pub fn set_log_cap(&self, bytes: u64) {
        self.log_cap.store(bytes, Ordering::Relaxed);
    }

    /// Queues `job`, waiting while the queue is full (on a multi-thread
    /// runtime the wait moves this thread's other tasks elsewhere).
    fn enqueue(&self, job: Job) -> Result<(), ()> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(()),
            Err(mpsc::TrySendError::Full(job)) => {
                crate::metrics::METRICS.store_queue_full();
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                let send = || self.jobs.send(job).map_err(|_| ());
                if multi_thread {
                    tokio::task::block_in_place(send)
                } else {
                    send()
                }
            }
        }
    }

    /// Runs `f` in the next transaction; answers after the commit.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |committed| {
                let result = match (committed, result) {
                    (true, Ok(value)) => Ok(value),
                    (false, Ok(_)) => Err(anyhow!("the database commit failed")),
                    (_, Err(e)) => Err(anyhow!("database error: {e}")),
                };
                let _ = reply.send(result);
            });
            (ok, completion)
        });
        self.enqueue(job)
            .map_err(|()| anyhow!("the store thread has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the store thread has stopped"))?
    }

    /// Runs `f` in the next transaction without waiting; failures are logged.
    pub fn spawn(
        &self,
        what: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    ) {
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |committed| match result {
                Err(e) => tracing::error!("store: {what}: {e}"),
                Ok(()) if !committed => tracing::error!("store: {what}: commit failed"),
                Ok(()) => {}
            });
            (ok, completion)
        });
        if self.enqueue(job).is_err() {
            tracing::error!("store: {what}: the store thread has stopped");
        }
    }

    /// [`Store::spawn`] whose answer is done once the transaction has ended
    /// (committed, or failed and logged), for a frame that must wait for it.
    fn spawn_committed(
        &self,
        what: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    ) -> Committed {
        let (signal, committed) = commit_signal();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |committed| {
                match result {
                    Err(e) => tracing::error!("store: {what}: {e}"),
                    Ok(()) if !committed => tracing::error!("store: {what}: commit failed"),
                    Ok(()) => {}
                }
                signal.fire();
            });
            (ok, completion)
        });
        if self.enqueue(job).is_err() {
            // The signal was dropped with the job: waiters go on.
            tracing::error!("store: {what}: the store thread has stopped");
        }
        committed
    }

    /// Inserts a queued build without a source; returns its id once committed.
    #[cfg(test)]
    pub async fn insert_build(
        &self,
        builder: String,
        properties: BTreeMap<String, String>,
        now: Timestamp,
    ) -> anyhow::Result<BuildId> {
        let props = serde_json::to_string(&properties)?;
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO builds (builder, properties, state, submitted_at) VALUES (?1, ?2, 'queued', ?3)",
            )?
            .execute(params![builder, props, now.to_string()])?;
            Ok(conn.last_insert_rowid() as BuildId)
        })
        .await
    }

    /// Inserts build requests in one commit; returns their ids in order.
    /// Each of `heads` (repository, branch, revision) is recorded as that
    /// branch's last seen head in the same commit (a pushed revision is not
    /// polled again).
    pub async fn insert_builds(
        &self,
        builds: Vec<NewBuild>,
        heads: Vec<(String, String, String)>,
    ) -> anyhow::Result<Vec<BuildId>> {
        let now = Timestamp::now();
        self.call(move |conn| {
            for (repository, branch, revision) in &heads {
                record_head(conn, repository, branch, revision, now)?;
            }
            builds
                .iter()
                .map(|build| insert_new_build(conn, build, now))
                .collect()
        })
        .await
    }

    /// Records `revision` as the head of (`repository`, `branch`) and, when
    /// it moved since the last recorded head, queues `builds` in the same
    /// commit — so a restart neither loses nor repeats a new revision.
    pub async fn advance_head(
        &self,
        repository: String,
        branch: String,
        revision: String,
        builds: Vec<NewBuild>,
    ) -> anyhow::Result<HeadAdvance> {
        let now = Timestamp::now();
        self.call(move |conn| {
            let last: Option<String> = conn
                .prepare_cached(
                    "SELECT revision FROM source_heads WHERE repository = ?1 AND branch = ?2",
                )?
                .query_row(params![repository, branch], |r| r.get(0))
                .optional()?;
            if last.as_deref() == Some(revision.as_str()) {
                return Ok(HeadAdvance::Unchanged);
            }
            record_head(conn, &repository, &branch, &revision, now)?;
            if last.is_none() {
                return Ok(HeadAdvance::Baseline);
            }
            let ids = builds
                .iter()
                .map(|build| insert_new_build(conn, build, now))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(HeadAdvance::Queued(ids))
        })
        .await
    }

    /// The revision the last timed build of `builder` was queued for.
    pub async fn last_timed_revision(&self, builder: String) -> anyhow::Result<Option<String>> {
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("SELECT revision FROM timed_builds WHERE builder = ?1")?
                .query_row(params![builder], |r| r.get::<_, Option<String>>(0))
                .optional()?
                .flatten())
        })
        .await
    }

    /// Queues a timed build and records its revision, in one commit.
    pub async fn insert_timed_build(
        &self,
        build: NewBuild,
        fired_at: Timestamp,
    ) -> anyhow::Result<BuildId> {
        let now = Timestamp::now();
        self.call(move |conn| {
            let id = insert_new_build(conn, &build, now)?;
            conn.prepare_cached(
                "INSERT INTO timed_builds (builder, revision, fired_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(builder) DO UPDATE SET revision = excluded.revision, fired_at = excluded.fired_at",
            )?
            .execute(params![
                build.builder,
                build.source.as_ref().map(|s| s.revision.clone()),
                fired_at.to_string()
            ])?;
            Ok(id)
        })
        .await
    }

    /// Ends waiting builds `ids` unrun: collapsed into the newer `into`.
    pub async fn collapse(
        &self,
        ids: Vec<BuildId>,
        into: BuildId,
        now: Timestamp,
    ) -> anyhow::Result<()> {
        let live = self.live.clone();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE builds SET state = 'finished', outcome = 'cancelled', reason = ?2, \
                 collapsed_into = ?3, finished_at = ?4, waiting_for = NULL \
                 WHERE id = ?1 AND state = 'queued'",
            )?;
            for id in ids {
                stmt.execute(params![
                    id as i64,
                    format!("collapsed into build {into}"),
                    into as i64,
                    now.to_string()
                ])?;
                live.finish(id);
            }
            Ok(())
        })
        .await
    }

    /// The build was handed to `worker`. The answer is done once the
    /// transaction has ended: the agent is told only then, so a master
    /// killed meanwhile cannot forget a build an agent runs.
    pub fn mark_started(&self, id: BuildId, worker: String, now: Timestamp) -> Committed {
        self.spawn_committed("mark build started", move |conn| {
            conn.prepare_cached(
                "UPDATE builds SET state = 'running', worker = ?2, handed_to = ?2, started_at = ?3, \
                 waiting_for = NULL WHERE id = ?1 AND state != 'finished'",
            )?
            .execute(params![id as i64, worker, now.to_string()])?;
            Ok(())
        })
    }

    /// The build goes back to the queue; `retry` counts it as a retry. It
    /// still remembers who it was handed to, and gives up its step grants.
    pub fn requeue(&self, id: BuildId, retry: Option<String>) {
        self.spawn("re-queue build", move |conn| {
            conn.prepare_cached("DELETE FROM step_grants WHERE build_id = ?1")?
                .execute(params![id as i64])?;
            match retry {
                Some(reason) => conn
                    .prepare_cached(
                        "UPDATE builds SET state = 'queued', worker = NULL, started_at = NULL, \
                         retries = retries + 1, retry_reason = ?2 WHERE id = ?1 AND state != 'finished'",
                    )?
                    .execute(params![id as i64, reason])?,
                None => conn
                    .prepare_cached(
                        "UPDATE builds SET state = 'queued', worker = NULL, started_at = NULL \
                         WHERE id = ?1 AND state != 'finished'",
                    )?
                    .execute(params![id as i64])?,
            };
            Ok(())
        });
    }

    /// Keeps build `id` away from `worker` until `until` (its lock lease
    /// ended there), or ends that (`None`): survives a restart.
    pub fn set_cool_off(&self, id: BuildId, cool_off: Option<(String, Timestamp)>) {
        self.spawn("set a build's cool-off", move |conn| {
            let (worker, until) = match cool_off {
                Some((worker, until)) => (Some(worker), Some(until.to_string())),
                None => (None, None),
            };
            conn.prepare_cached(
                "UPDATE builds SET cool_off_worker = ?2, cool_off_until = ?3 WHERE id = ?1",
            )?
            .execute(params![id as i64, worker, until])?;
            Ok(())
        });
    }

    /// What a queued build waits for (shown by `master builds`).
    pub fn set_waiting_for(&self, id: BuildId, text: Option<String>) {
        self.spawn("set waiting-for text", move |conn| {
            conn.prepare_cached("UPDATE builds SET waiting_for = ?2 WHERE id = ?1")?
                .execute(params![id as i64, text])?;
            Ok(())
        });
    }

    /// The build was taken back from the worker it was handed to (e.g. its
    /// lock lease ended): no result or adoption from that worker is
    /// accepted any more.
    pub fn forget_handed_to(&self, id: BuildId) {
        self.spawn("forget who a build was handed to", move |conn| {
            conn.prepare_cached(
                "UPDATE builds SET handed_to = NULL WHERE id = ?1 AND state != 'finished'",
            )?
            .execute(params![id as i64])?;
            Ok(())
        });
    }

    /// Appends a chunk of live output, up to the build's log cap; past the
    /// cap only the number of dropped bytes is recorded.
    pub fn append_log(&self, id: BuildId, step: u32, data: String) {
        let cap = self.log_cap.load(Ordering::Relaxed);
        let live = self.live.clone();
        self.spawn("append log", move |conn| {
            let Some((stored, dropped)) = log_room(conn, id)? else {
                return Ok(());
            };
            let room = cap.saturating_sub(stored);
            let kept = prefix_within(&data, room);
            if !kept.is_empty() {
                conn.prepare_cached("INSERT INTO logs (build_id, step, data) VALUES (?1, ?2, ?3)")?
                    .execute(params![id as i64, step, kept])?;
                live.publish(id, step, kept);
            }
            let lost = (data.len() - kept.len()) as u64;
            if lost > 0 {
                crate::metrics::METRICS.log_bytes_dropped(lost);
            }
            conn.prepare_cached(
                "UPDATE builds SET log_bytes = ?2, log_dropped = ?3 WHERE id = ?1",
            )?
            .execute(params![
                id as i64,
                (stored + kept.len() as u64) as i64,
                (dropped + lost) as i64
            ])?;
            Ok(())
        });
    }

    /// Persists that `step` of build `id` holds its locks on `worker`;
    /// answers after the commit (the grant is sent only then, so a restart
    /// cannot forget a hold the agent acts on).
    pub async fn save_step_grant(
        &self,
        id: BuildId,
        step: u32,
        worker: String,
    ) -> anyhow::Result<()> {
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO step_grants (build_id, step, worker) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(build_id, step) DO UPDATE SET worker = excluded.worker",
            )?
            .execute(params![id as i64, step, worker])?;
            Ok(())
        })
        .await
    }

    /// The step's locks were released.
    pub fn drop_step_grant(&self, id: BuildId, step: u32) {
        self.spawn("drop step grant", move |conn| {
            conn.prepare_cached("DELETE FROM step_grants WHERE build_id = ?1 AND step = ?2")?
                .execute(params![id as i64, step])?;
            Ok(())
        });
    }

    /// Every persisted step grant of an unfinished build.
    pub async fn step_grants(&self) -> anyhow::Result<Vec<StepGrant>> {
        self.call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT g.build_id, g.step, g.worker FROM step_grants g \
                 JOIN builds b ON b.id = g.build_id WHERE b.state = 'running' \
                 ORDER BY g.build_id, g.step",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(StepGrant {
                    build_id: r.get::<_, i64>(0)? as BuildId,
                    step: r.get(1)?,
                    worker: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Queued and running builds per builder.
    pub async fn depth_by_builder(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT builder, state, COUNT(*) FROM builds WHERE state != 'finished' \
                 GROUP BY builder, state",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for row in rows {
                let (builder, state, count) = row?;
                let entry = out.entry(builder).or_default();
                let count = u64::try_from(count).unwrap_or(0);
                match state.as_str() {
                    "queued" => entry.0 = count,
                    _ => entry.1 = count,
                }
            }
            Ok(out)
        })
        .await
    }

    /// Stores one finished step.
    pub fn store_step(&self, id: BuildId, result: StepResult) {
        self.spawn("store step result", move |conn| {
            store_step(conn, id, &result)?;
            Ok(())
        });
    }

    /// Stores a build's result, idempotently: a result for a build already
    /// finished by the same worker changes nothing.
    pub async fn finish(
        &self,
        worker: String,
        result: BuildResult,
    ) -> anyhow::Result<StoreOutcome> {
        let cap = self.log_cap.load(Ordering::Relaxed);
        let outcome = result.outcome;
        let live = self.live.clone();
        let stored = self.call(move |conn| {
            let id = result.build_id as i64;
            let row: Option<(String, Option<String>, Option<String>)> = conn
                .prepare_cached("SELECT state, worker, handed_to FROM builds WHERE id = ?1")?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            match row {
                None => return Ok(StoreOutcome::NotYours),
                Some((state, owner, _)) if state == "finished" => {
                    return Ok(if owner.as_deref() == Some(worker.as_str()) {
                        StoreOutcome::AlreadyStored
                    } else {
                        StoreOutcome::NotYours
                    });
                }
                // Only the worker it was handed to may finish it.
                Some((_, _, handed_to)) if handed_to.as_deref() != Some(worker.as_str()) => {
                    return Ok(StoreOutcome::NotYours);
                }
                Some(_) => {}
            }
            conn.prepare_cached(
                "UPDATE builds SET state = 'finished', worker = ?2, outcome = ?3, reason = ?4, \
                 finished_at = ?5, waiting_for = NULL, started_at = COALESCE(started_at, ?6) WHERE id = ?1",
            )?
            .execute(params![
                id,
                worker,
                result.outcome.to_string(),
                result.reason,
                result.finished_at.to_string(),
                result
                    .steps
                    .first()
                    .map(|s| s.started_at)
                    .unwrap_or(result.finished_at)
                    .to_string(),
            ])?;
            for step in &result.steps {
                store_step(conn, result.build_id, step)?;
            }
            conn.prepare_cached("DELETE FROM step_grants WHERE build_id = ?1")?
                .execute(params![id])?;
            if !result.log.is_empty() {
                // The full log supersedes whatever part streamed live, up to
                // the cap; what streamed past the cap stays counted.
                let (_, dropped_live) = log_room(conn, result.build_id)?.unwrap_or((0, 0));
                let kept = prefix_within(&result.log, cap);
                let lost = (result.log.len() - kept.len()) as u64;
                if lost > 0 {
                    crate::metrics::METRICS.log_bytes_dropped(lost);
                }
                conn.prepare_cached("DELETE FROM logs WHERE build_id = ?1")?
                    .execute(params![id])?;
                conn.prepare_cached("INSERT INTO logs (build_id, step, data) VALUES (?1, NULL, ?2)")?
                    .execute(params![id, kept])?;
                conn.prepare_cached(
                    "UPDATE builds SET log_bytes = ?2, log_dropped = ?3 WHERE id = ?1",
                )?
                .execute(params![id, kept.len() as i64, lost.max(dropped_live) as i64])?;
            }
            live.finish(result.build_id);
            Ok(StoreOutcome::Stored)
        })
        .await;
        if let Ok(StoreOutcome::Stored) = stored {
            crate::metrics::METRICS.build_finished(outcome);
        }
        stored
    }

    /// Marks a queued build finished without running (cancelled).
    pub async fn cancel_queued(
        &self,
        id: BuildId,
        reason: String,
        now: Timestamp,
    ) -> anyhow::Result<bool> {
        let live = self.live.clone();
        let cancelled = self
            .call(move |conn| {
                let n = conn
                    .prepare_cached(
                        "UPDATE builds SET state = 'finished', outcome = 'cancelled', reason = ?2, \
                     finished_at = ?3, waiting_for = NULL WHERE id = ?1 AND state = 'queued'",
                    )?
                    .execute(params![id as i64, reason, now.to_string()])?;
                live.finish(id);
                Ok(n > 0)
            })
            .await;
        if let Ok(true) = cancelled {
            crate::metrics::METRICS.build_finished(Outcome::Cancelled);
        }
        cancelled
    }

    /// Every build that is not finished, oldest first.
    pub async fn unfinished(&self) -> anyhow::Result<Vec<UnfinishedBuild>> {
        self.call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, builder, properties, state, worker, retries, repository, branch, revision, \
                 handed_to, cool_off_worker, cool_off_until FROM builds \
                 WHERE state != 'finished' ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                let props: String = r.get(2)?;
                let state: String = r.get(3)?;
                Ok(UnfinishedBuild {
                    id: r.get::<_, i64>(0)? as BuildId,
                    builder: r.get(1)?,
                    properties: serde_json::from_str(&props).unwrap_or_default(),
                    state: state.parse().unwrap_or(BuildState::Queued),
                    worker: r.get(4)?,
                    retries: r.get(5)?,
                    source: source_of(r.get(6)?, r.get(7)?, r.get(8)?),
                    handed_to: r.get(9)?,
                    cool_off: match (r.get::<_, Option<String>>(10)?, r.get::<_, Option<String>>(11)?) {
                        (Some(worker), Some(until)) => until.parse().ok().map(|until| (worker, until)),
                        _ => None,
                    },
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The newest `limit` builds, newest first.
    pub async fn list_builds(&self, limit: u32) -> anyhow::Result<Vec<BuildInfo>> {
        self.call(move |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("{BUILD_COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
            let rows = stmt.query_map(params![limit], build_row)?;
            rows.collect()
        })
        .await
    }

    /// How many builds are queued and how many running, in all.
    pub async fn unfinished_counts(&self) -> anyhow::Result<(u64, u64)> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT state, COUNT(*) FROM builds WHERE state != 'finished' GROUP BY state",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            let (mut queued, mut running) = (0, 0);
            for row in rows {
                let (state, count) = row?;
                let count = u64::try_from(count).unwrap_or(0);
                match state.as_str() {
                    "queued" => queued = count,
                    "running" => running = count,
                    _ => {}
                }
            }
            Ok((queued, running))
        })
        .await
    }

    /// One build with its step results.
    pub async fn get_build(&self, id: BuildId) -> anyhow::Result<Option<BuildInfo>> {
        self.call(move |conn| {
            let build = conn
                .prepare_cached(&format!("{BUILD_COLUMNS} WHERE id = ?1"))?
                .query_row(params![id as i64], build_row)
                .optional()?;
            let Some(mut build) = build else {
                return Ok(None);
            };
            let mut stmt = conn.prepare_cached(
                "SELECT result FROM step_results WHERE build_id = ?1 ORDER BY step",
            )?;
            let steps = stmt.query_map(params![id as i64], |r| r.get::<_, String>(0))?;
            for step in steps {
                if let Ok(step) = serde_json::from_str::<StepResult>(&step?) {
                    build.steps.push(step);
                }
            }
            build.artifacts = crate::artifacts::list_rows(conn, id)?;
            Ok(Some(build))
        })
        .await
    }

    /// The whole log of a build so far (`None`: no such build).
    pub async fn get_log(&self, id: BuildId) -> anyhow::Result<Option<String>> {
        self.call(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM builds WHERE id = ?1")?
                .query_row(params![id as i64], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut stmt =
                conn.prepare_cached("SELECT data FROM logs WHERE build_id = ?1 ORDER BY seq")?;
            let chunks = stmt.query_map(params![id as i64], |r| r.get::<_, String>(0))?;
            let mut log = String::new();
            for chunk in chunks {
                log.push_str(&chunk?);
            }
            let (_, dropped) = log_room(conn, id)?.unwrap_or((0, 0));
            if dropped > 0 {
                if !log.is_empty() && !log.ends_with('\n') {
                    log.push('\n');
                }
                log.push_str(&format!(
                    "[nightshift: {dropped} bytes dropped: this build's log reached its cap (max_log_bytes)]\n"
                ));
            }
            Ok(Some(log))
        })
        .await
    }

    /// A build's log so far (its last `tail_bytes` at most, cut at a line
    /// start, and whether earlier output was left out), whether the build
    /// has finished, and a receiver of the output that follows, exactly:
    /// taken in one store job, so no chunk is missed or repeated. `None`: no
    /// such build.
    pub async fn watch_log(
        &self,
        id: BuildId,
        tail_bytes: usize,
    ) -> anyhow::Result<Option<LogWatch>> {
        let live = self.live.clone();
        self.call(move |conn| {
            let state: Option<String> = conn
                .prepare_cached("SELECT state FROM builds WHERE id = ?1")?
                .query_row(params![id as i64], |r| r.get(0))
                .optional()?;
            let Some(state) = state else {
                return Ok(None);
            };
            let mut stmt =
                conn.prepare_cached("SELECT data FROM logs WHERE build_id = ?1 ORDER BY seq DESC")?;
            let mut chunks = Vec::new();
            let mut size = 0usize;
            let mut cut = false;
            for chunk in stmt.query_map(params![id as i64], |r| r.get::<_, String>(0))? {
                let chunk = chunk?;
                if size + chunk.len() > tail_bytes {
                    let room = tail_bytes - size;
                    let mut start = chunk.len() - room;
                    while !chunk.is_char_boundary(start) {
                        start += 1;
                    }
                    let tail = &chunk[start..];
                    let tail = tail.find('\n').map_or("", |i| &tail[i + 1..]);
                    chunks.push(tail.to_owned());
                    cut = true;
                    break;
                }
                size += chunk.len();
                chunks.push(chunk);
            }
            chunks.reverse();
            let finished = state == "finished";
            let live = (!finished).then(|| live.subscribe(id));
            Ok(Some(LogWatch {
                log: chunks.concat(),
                cut,
                finished,
                live,
            }))
        })
        .await
    }

    pub fn save_presence(&self, worker: String, presence: Presence) {
        self.spawn("save presence", move |conn| {
            let json = serde_json::to_string(&presence).unwrap_or_default();
            conn.prepare_cached(
                "INSERT INTO worker_presence (name, presence, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO UPDATE SET presence = excluded.presence, updated_at = excluded.updated_at",
            )?
            .execute(params![worker, json, Timestamp::now().to_string()])?;
            Ok(())
        });
    }

    /// `(builder, duration)` of each builder's last `per_builder` successful
    /// builds, oldest first: the seed of the duration estimates.
    pub async fn recent_durations(
        &self,
        per_builder: usize,
    ) -> anyhow::Result<Vec<(String, jiff::SignedDuration)>> {
        let limit = i64::try_from(per_builder).unwrap_or(i64::MAX);
        self.call(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT builder, started_at, finished_at FROM ( \
                   SELECT id, builder, started_at, finished_at, \
                     ROW_NUMBER() OVER (PARTITION BY builder ORDER BY id DESC) AS newest \
                   FROM builds WHERE state = 'finished' AND outcome = 'success' \
                     AND started_at IS NOT NULL AND finished_at IS NOT NULL) \
                 WHERE newest <= ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![limit], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (builder, started, finished) = row?;
                if let (Some(started), Some(finished)) = (parse_ts(started), parse_ts(finished)) {
                    out.push((builder, finished.duration_since(started)));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Every enrolled worker (`[[worker_group]]` members), at start.
    pub async fn enrolled_workers(&self) -> anyhow::Result<Vec<Member>> {
        self.call(|conn| {
            let mut stmt =
                conn.prepare("SELECT name, worker_group, token_sha256 FROM enrolled_workers")?;
            let rows = stmt.query_map([], |r| {
                Ok(Member {
                    name: r.get(0)?,
                    group: r.get(1)?,
                    token_sha256: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Records an enrolment; `Ok(false)`: the name is taken (nothing
    /// changed).
    pub async fn enroll(&self, member: Member, now: Timestamp) -> anyhow::Result<bool> {
        self.call(move |conn| {
            let added = conn.execute(
                "INSERT INTO enrolled_workers (name, worker_group, token_sha256, enrolled_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO NOTHING",
                params![
                    member.name,
                    member.group,
                    member.token_sha256,
                    now.to_string()
                ],
            )?;
            Ok(added == 1)
        })
        .await
    }

    /// Forgets an enrolled worker (its token stops working); `Ok(false)`:
    /// there was none of that name.
    pub async fn revoke(&self, name: String) -> anyhow::Result<bool> {
        self.call(move |conn| {
            let gone = conn.execute(
                "DELETE FROM enrolled_workers WHERE name = ?1",
                params![name],
            )?;
            Ok(gone == 1)
        })
        .await
    }

    /// Workers' last known presence (from before a restart).
    pub async fn last_presences(&self) -> anyhow::Result<BTreeMap<String, Presence>> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT name, presence FROM worker_presence")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (name, json) = row?;
                if let Ok(presence) = serde_json::from_str(&json) {
                    out.insert(name, presence);
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn set_paused(&self, paused: bool) -> anyhow::Result<()> {
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO settings (key, value) VALUES ('paused', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![if paused { "1" } else { "0" }],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn paused(&self) -> anyhow::Result<bool> {
        self.call(|conn| {
            let value: Option<String> = conn
                .query_row("SELECT value FROM settings WHERE key = 'paused'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(value.as_deref() == Some("1"))
        })
        .await
    }
}

const BUILD_COLUMNS: &str = "SELECT id, builder, properties, state, worker, retries, retry_reason, \
     outcome, reason, waiting_for, submitted_at, started_at, finished_at, repository, branch, \
     revision, trigger, collapsed_into FROM builds";

/// A stored source (mode and depth come from the builder at hand-out).
fn source_of(
    repository: Option<String>,
    branch: Option<String>,
    revision: Option<String>,
) -> Option<BuildSource> {
    Some(BuildSource {
        repository: repository?,
        branch: branch.unwrap_or_default(),
        revision: revision?,
        mode: CheckoutMode::default(),
        shallow: false,
    })
}

fn record_head(
    conn: &Connection,
    repository: &str,
    branch: &str,
    revision: &str,
    now: Timestamp,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO source_heads (repository, branch, revision, seen_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT(repository, branch) DO UPDATE SET revision = excluded.revision, seen_at = excluded.seen_at",
    )?
    .execute(params![repository, branch, revision, now.to_string()])?;
    Ok(())
}

fn insert_new_build(
    conn: &Connection,
    build: &NewBuild,
    now: Timestamp,
) -> rusqlite::Result<BuildId> {
    let props = serde_json::to_string(&build.properties).unwrap_or_else(|_| "{}".into());
    let source = build.source.as_ref();
    conn.prepare_cached(
        "INSERT INTO builds (builder, properties, state, submitted_at, repository, branch, revision, trigger) \
         VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        build.builder,
        props,
        now.to_string(),
        source.map(|s| s.repository.as_str()),
        source.map(|s| s.branch.as_str()),
        source.map(|s| s.revision.as_str()),
        build.trigger,
    ])?;
    Ok(conn.last_insert_rowid() as BuildId)
}

fn parse_ts(text: Option<String>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

fn build_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildInfo> {
    let props: String = r.get(2)?;
    let state: String = r.get(3)?;
    let outcome: Option<String> = r.get(7)?;
    Ok(BuildInfo {
        id: r.get::<_, i64>(0)? as BuildId,
        builder: r.get(1)?,
        properties: serde_json::from_str(&props).unwrap_or_default(),
        state: state.parse().unwrap_or(BuildState::Queued),
        worker: r.get(4)?,
        retries: r.get(5)?,
        retry_reason: r.get(6)?,
        outcome: outcome
            .and_then(|o| serde_json::from_value::<Outcome>(serde_json::Value::String(o)).ok()),
        reason: r.get(8)?,
        waiting_for: r.get(9)?,
        submitted_at: parse_ts(r.get(10)?).unwrap_or(Timestamp::UNIX_EPOCH),
        started_at: parse_ts(r.get(11)?),
        finished_at: parse_ts(r.get(12)?),
        steps: Vec::new(),
        estimate_secs: None,
        repository: r.get(13)?,
        branch: r.get(14)?,
        revision: r.get(15)?,
        trigger: r.get(16)?,
        collapsed_into: r.get::<_, Option<i64>>(17)?.map(|id| id as BuildId),
        artifacts: Vec::new(),
    })
}

/// A build's stored and dropped log bytes (`None`: no such build).
fn log_room(conn: &Connection, id: BuildId) -> rusqlite::Result<Option<(u64, u64)>> {
    conn.prepare_cached("SELECT log_bytes, log_dropped FROM builds WHERE id = ?1")?
        .query_row(params![id as i64], |r| {
            Ok((
                u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            ))
        })
        .optional()
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
fn prefix_within(text: &str, max: u64) -> &str {
    let mut end = usize::try_from(max).unwrap_or(usize::MAX).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn store_step(conn: &Connection, id: BuildId, result: &StepResult) -> rusqlite::Result<()> {
    let json = serde_json::to_string(result).unwrap_or_default();
    conn.prepare_cached(
        "INSERT INTO step_results (build_id, step, result) VALUES (?1, ?2, ?3) \
         ON CONFLICT(build_id, step) DO UPDATE SET result = excluded.result",
    )?
    .execute(params![id as i64, result.step, json])?;
    Ok(())
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// The store thread: batch, commit, answer.
fn run(conn: Connection, inbox: mpsc::Receiver<Job>) {
    while let Ok(first) = inbox.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Normally one transaction for the whole batch. If it cannot begin
        // (e.g. the database is busy or the disk is full), each job's
        // savepoint is its own transaction and reports its own commit.
        let began = conn.execute_batch("BEGIN IMMEDIATE").is_ok();
        let mut completions = Vec::with_capacity(batch.len());
        for job in batch {
            let _ = conn.execute_batch("SAVEPOINT job");
            let (ok, completion) = job(&conn);
            if !ok {
                // Undo this job's partial writes; the others stay.
                let _ = conn.execute_batch("ROLLBACK TO job");
            }
            let released = conn.execute_batch("RELEASE job").is_ok();
            completions.push((completion, began || released));
        }
        let committed = !began || conn.execute_batch("COMMIT").is_ok();
        if !committed {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for (completion, own) in completions {
            completion(committed && own);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_proto::wire::Outcome;

    fn result(id: BuildId, outcome: Outcome) -> BuildResult {
        let now = Timestamp::now();
        BuildResult {
            build_id: id,
            outcome,
            steps: vec![StepResult {
                step: 0,
                outcome,
                exit_code: Some(0),
                signal: None,
                started_at: now,
                finished_at: now,
            }],
            reason: None,
            log: "full log\n".into(),
            finished_at: now,
        }
    }

    #[tokio::test]
    async fn a_log_watch_sees_each_chunk_once_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("master.db")).unwrap();
        let a = store
            .insert_build("app".into(), BTreeMap::new(), Timestamp::now())
            .await
            .unwrap();
        store.mark_started(a, "w1".into(), Timestamp::now());
        // Chunks queued right before and after the watch: each lands either
        // in the snapshot or in the stream, never both, never neither.
        for i in 0..50 {
            store.append_log(a, 0, format!("{i}\n"));
        }
        let watch = store.watch_log(a, 1 << 20).await.unwrap().unwrap();
        for i in 50..60 {
            store.append_log(a, 0, format!("{i}\n"));
        }
        store
            .finish("w1".into(), result(a, Outcome::Success))
            .await
            .unwrap();
        assert!(!watch.finished && !watch.cut);
        let mut seen = watch.log.clone();
        let mut rx = watch.live.unwrap();
        while let LiveEvent::Output { data, .. } = rx.recv().await.unwrap() {
            seen.push_str(&data);
        }
        let expected: String = (0..60).map(|i| format!("{i}\n")).collect();
        assert_eq!(seen, expected);
        // After the end: the stored log, no stream; a tail starts at a line.
        let watch = store.watch_log(a, 12).await.unwrap().unwrap();
        assert!(watch.finished && watch.live.is_none() && !watch.cut);
        assert_eq!(watch.log, "full log\n");
        let watch = store.watch_log(a, 6).await.unwrap().unwrap();
        assert_eq!(watch.log, "", "a partial line is left out");
        assert!(watch.cut);
        assert!(store.watch_log(a + 100, 10).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn builds_survive_reopen_and_results_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.db");
        let store = Store::open(&path).unwrap();
        let mut props = BTreeMap::new();
        props.insert("branch".to_string(), "main".to_string());
        let a = store
            .insert_build("app".into(), props.clone(), Timestamp::now())
            .await
            .unwrap();
        let b = store
            .insert_build("app".into(), BTreeMap::new(), Timestamp::now())
            .await
            .unwrap();
        assert!(b > a);
        store.mark_started(a, "w1".into(), Timestamp::now());
        store.append_log(a, 0, "live ".into());
        assert_eq!(store.get_log(a).await.unwrap().unwrap(), "live ");
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.unfinished_counts().await.unwrap(), (1, 1));
        let unfinished = store.unfinished().await.unwrap();
        assert_eq!(unfinished.len(), 2);
        assert_eq!(unfinished[0].state, BuildState::Running);
        assert_eq!(unfinished[0].worker.as_deref(), Some("w1"));
        assert_eq!(unfinished[0].properties, props);
        assert_eq!(unfinished[1].state, BuildState::Queued);

        assert_eq!(
            store
                .finish("w1".into(), result(a, Outcome::Success))
                .await
                .unwrap(),
            StoreOutcome::Stored
        );
        assert_eq!(
            store
                .finish("w1".into(), result(a, Outcome::Success))
                .await
                .unwrap(),
            StoreOutcome::AlreadyStored
        );
        assert_eq!(
            store
                .finish("w2".into(), result(a, Outcome::Failure))
                .await
                .unwrap(),
            StoreOutcome::NotYours
        );
        assert_eq!(
            store
                .finish("w2".into(), result(999, Outcome::Failure))
                .await
                .unwrap(),
            StoreOutcome::NotYours
        );
        assert_eq!(store.unfinished_counts().await.unwrap(), (1, 0));
        let info = store.get_build(a).await.unwrap().unwrap();
        assert_eq!(info.state, BuildState::Finished);
        assert_eq!(info.outcome, Some(Outcome::Success));
        assert_eq!(info.steps.len(), 1);
        assert_eq!(store.get_log(a).await.unwrap().unwrap(), "full log\n");
        assert!(store.get_log(12345).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn requeue_counts_retries_and_pause_persists() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let a = store
            .insert_build("app".into(), BTreeMap::new(), Timestamp::now())
            .await
            .unwrap();
        store.mark_started(a, "w1".into(), Timestamp::now());
        store.requeue(a, Some("worker w1 missing".into()));
        let info = store.get_build(a).await.unwrap().unwrap();
        assert_eq!(info.state, BuildState::Queued);
        assert_eq!(info.retries, 1);
        assert_eq!(info.retry_reason.as_deref(), Some("worker w1 missing"));
        assert!(info.worker.is_none());
        assert!(!store.paused().await.unwrap());
        store.set_paused(true).await.unwrap();
        assert!(store.paused().await.unwrap());
    }

    #[tokio::test]
    async fn a_branch_head_queues_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let build = |rev: &str| NewBuild {
            builder: "app".into(),
            properties: BTreeMap::new(),
            source: Some(BuildSource {
                repository: "file:///r".into(),
                branch: "main".into(),
                revision: rev.into(),
                mode: CheckoutMode::Full,
                shallow: false,
            }),
            trigger: "poll".into(),
        };
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let advance = |store: Store, rev: String| async move {
            store
                .advance_head(
                    "file:///r".into(),
                    "main".into(),
                    rev.clone(),
                    vec![build(&rev)],
                )
                .await
                .unwrap()
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(
            advance(store.clone(), a.clone()).await,
            HeadAdvance::Baseline
        );
        assert_eq!(
            advance(store.clone(), a.clone()).await,
            HeadAdvance::Unchanged
        );
        let HeadAdvance::Queued(ids) = advance(store.clone(), b.clone()).await else {
            panic!("a new head queues");
        };
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            advance(store.clone(), b.clone()).await,
            HeadAdvance::Unchanged
        );
        let info = store.get_build(ids[0]).await.unwrap().unwrap();
        assert_eq!(info.revision.as_deref(), Some(b.as_str()));
        assert_eq!(info.trigger.as_deref(), Some("poll"));
        let unfinished = store.unfinished().await.unwrap();
        assert_eq!(unfinished[0].source.as_ref().unwrap().revision, b);

        // A collapsed request ends unrun, naming the newer one.
        let newer = store
            .insert_builds(vec![build(&a)], Vec::new())
            .await
            .unwrap()[0];
        store
            .collapse(ids.clone(), newer, Timestamp::now())
            .await
            .unwrap();
        let info = store.get_build(ids[0]).await.unwrap().unwrap();
        assert_eq!(info.state, BuildState::Finished);
        assert_eq!(info.outcome, Some(Outcome::Cancelled));
        assert_eq!(info.collapsed_into, Some(newer));
        // Timed builds remember their revision.
        assert_eq!(store.last_timed_revision("app".into()).await.unwrap(), None);
        store
            .insert_timed_build(build(&a), Timestamp::now())
            .await
            .unwrap();
        assert_eq!(
            store.last_timed_revision("app".into()).await.unwrap(),
            Some(a)
        );
    }

    #[tokio::test]
    async fn a_failing_job_does_not_spoil_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let bad = store.call(|conn| conn.execute("INSERT INTO nowhere VALUES (1)", []));
        let good = store.insert_build("app".into(), BTreeMap::new(), Timestamp::now());
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        let id = good.unwrap();
        assert!(store.get_build(id).await.unwrap().is_some());
    }
}
