//! The master's embedded SQLite store: build requests and builds, step
//! results, logs, workers' last presence and the pause flag.
//!
//! One dedicated thread owns the connection. Callers send it jobs over a
//! channel; the thread runs whatever jobs are waiting in ONE transaction
//! (each in its own savepoint, so one failing job changes nothing of its
//! own and spoils nothing of the others), commits, and only then answers
//! every caller. A submit therefore returns after its row is committed, and
//! a burst of small writes costs one commit instead of many.
//! Workers' presence is not a job: the newest of each worker waits in a
//! buffer and goes into the transactions a chunk at a time, after the jobs.
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

mod grants;
mod lifecycle;
mod logs;
mod queries;
mod schema;
mod submit;
mod workers;

use logs::*;
use queries::*;
pub use queries::{artifact_row, list_rows};
use schema::*;
use submit::*;
use workers::PresenceBuffer;

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
    /// When a running build was handed out (the master's clock).
    pub started_at: Option<Timestamp>,
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
    /// Workers' presence waiting to be written beside the jobs.
    presence: Arc<PresenceBuffer>,
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
        let presence = Arc::new(PresenceBuffer::default());
        std::thread::Builder::new()
            .name("store".into())
            .spawn({
                let presence = Arc::clone(&presence);
                move || run(conn, inbox, &presence)
            })
            .context("cannot start the store thread")?;
        Ok(Store {
            jobs,
            log_cap: Arc::new(AtomicU64::new(DEFAULT_LOG_CAP)),
            live: LiveLogs::default(),
            presence,
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
        self.call_then(f, |_| {}).await
    }

    /// [`Store::call`], and `then` runs with the committed value on the
    /// store thread right after the commit, before the caller is answered:
    /// what must follow a commit at once (a new build to the scheduler)
    /// does not wait for the caller's task to wake up first.
    pub async fn call_then<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
        then: impl FnOnce(&R) + Send + 'static,
    ) -> anyhow::Result<R> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |committed| {
                let result = match (committed, result) {
                    (true, Ok(value)) => {
                        then(&value);
                        Ok(value)
                    }
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
}

/// The store thread: batch, commit, answer. Buffered presence rows go
/// into the same transactions, a chunk at a time after the queued jobs, and
/// while any wait the thread does not sleep on an empty queue.
fn run(conn: Connection, inbox: mpsc::Receiver<Job>, presence: &PresenceBuffer) {
    loop {
        let first = if presence.has_pending() {
            match inbox.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else {
            match inbox.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while !batch.is_empty() && batch.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch, presence);
    }
    // The master is stopping: what is still buffered is written.
    while presence.has_pending() {
        run_batch(&conn, Vec::new(), presence);
    }
}

/// One transaction: `batch`'s jobs (each in its own savepoint), then a
/// chunk of buffered presence rows (a small one when there are jobs);
/// commits, then answers every job.
fn run_batch(conn: &Connection, batch: Vec<Job>, presence: &PresenceBuffer) {
    // Normally one transaction for the whole batch. If it cannot begin
    // (e.g. the database is busy or the disk is full), each job's
    // savepoint is its own transaction and reports its own commit.
    let began = conn.execute_batch("BEGIN IMMEDIATE").is_ok();
    let mut completions = Vec::with_capacity(batch.len());
    let presence_rows = if batch.is_empty() {
        workers::PRESENCE_CHUNK
    } else {
        workers::PRESENCE_CHUNK_BESIDE_JOBS
    };
    for job in batch {
        let _ = conn.execute_batch("SAVEPOINT job");
        let (ok, completion) = job(conn);
        if !ok {
            // Undo this job's partial writes; the others stay.
            let _ = conn.execute_batch("ROLLBACK TO job");
        }
        let released = conn.execute_batch("RELEASE job").is_ok();
        completions.push((completion, began || released));
    }
    let _ = conn.execute_batch("SAVEPOINT presence");
    if let Err(error) = presence.write_chunk(conn, presence_rows) {
        tracing::error!("store: save presence: {error}");
        let _ = conn.execute_batch("ROLLBACK TO presence");
    }
    let _ = conn.execute_batch("RELEASE presence");
    let committed = !began || conn.execute_batch("COMMIT").is_ok();
    if !committed {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for (completion, own) in completions {
        completion(committed && own);
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
    async fn a_flip_of_many_workers_keeps_each_ones_newest_presence_and_stays_off_the_queue() {
        use nightshift_policy::{PresenceState, Source};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let presence = |state| Presence {
            state,
            reason: "test".into(),
            source: Source::Manual,
            since: Timestamp::UNIX_EPOCH,
            until: None,
        };
        // Twice the queue's size in changes, each worker twice: the newest
        // of each is kept.
        let workers = STORE_QUEUE;
        for state in [PresenceState::Available, PresenceState::Away] {
            for n in 0..workers {
                store.save_presence(format!("w{n}"), presence(state));
            }
        }
        // A submit made meanwhile is answered.
        let id = store
            .insert_build("app".into(), BTreeMap::new(), Timestamp::now())
            .await
            .unwrap();
        assert!(id > 0);
        let last = store.last_presences().await.unwrap();
        assert_eq!(last.len(), workers);
        assert!(last.values().all(|p| p.state == PresenceState::Away));
        // Written to the table, not only held: a fresh connection sees them.
        let conn = Connection::open(dir.path().join("m.db")).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM worker_presence", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, workers as i64);
    }

    /// A transaction that commits jobs carries only a few presence rows
    /// (its jobs wait for their writes); one without jobs, a whole chunk.
    #[test]
    fn jobs_share_their_transaction_with_a_few_presence_rows_only() {
        let check = |jobs: usize, expect_rows: i64| {
            let dir = tempfile::tempdir().unwrap();
            let conn = Connection::open(dir.path().join("m.db")).unwrap();
            migrate(&conn).unwrap();
            let buffer = PresenceBuffer::default();
            for n in 0..1000 {
                let presence = Presence {
                    state: nightshift_policy::PresenceState::Away,
                    reason: "test".into(),
                    source: nightshift_policy::Source::Manual,
                    since: Timestamp::UNIX_EPOCH,
                    until: None,
                };
                buffer.put(format!("w{n}"), presence, Timestamp::UNIX_EPOCH);
            }
            let answered = Arc::new(AtomicU64::new(0));
            let batch: Vec<Job> = (0..jobs)
                .map(|_| {
                    let answered = Arc::clone(&answered);
                    Box::new(move |_: &Connection| {
                        let done: Completion = Box::new(move |ok| {
                            assert!(ok);
                            answered.fetch_add(1, Ordering::Relaxed);
                        });
                        (true, done)
                    }) as Job
                })
                .collect();
            run_batch(&conn, batch, &buffer);
            let rows: i64 = conn
                .query_row("SELECT COUNT(*) FROM worker_presence", [], |r| r.get(0))
                .unwrap();
            assert_eq!(
                (answered.load(Ordering::Relaxed), rows),
                (jobs as u64, expect_rows)
            );
            assert!(buffer.has_pending());
        };
        check(0, workers::PRESENCE_CHUNK as i64);
        check(1, workers::PRESENCE_CHUNK_BESIDE_JOBS as i64);
        check(3, workers::PRESENCE_CHUNK_BESIDE_JOBS as i64);
    }

    #[tokio::test]
    async fn duration_seeds_are_the_last_to_finish_in_the_order_they_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        // (took, finished at): build 1 (retried, say) finishes last, and
        // the sub-second finish of build 3 sorts after build 2's whole one.
        let runs = [(50, 400), (10, 100), (20, 200), (30, 200)];
        for (took, finished) in runs {
            let id = store
                .insert_build("app".into(), BTreeMap::new(), at(0))
                .await
                .unwrap();
            store.mark_started(id, "w1".into(), at(finished - took));
            let mut result = result(id, Outcome::Success);
            result.finished_at = at(finished)
                + if took == 20 {
                    jiff::SignedDuration::from_millis(500)
                } else {
                    jiff::SignedDuration::ZERO
                };
            store.finish("w1".into(), result).await.unwrap();
        }
        let secs = |s: i64| jiff::SignedDuration::from_secs(s);
        let half = jiff::SignedDuration::from_millis(500);
        let all = store.recent_durations(10).await.unwrap();
        let took: Vec<_> = all.into_iter().map(|(_, took)| took).collect();
        assert_eq!(took, [secs(10), secs(30), secs(20) + half, secs(50)]);
        // The window keeps the last to finish, not the highest ids.
        let last_two: Vec<_> = store
            .recent_durations(2)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, took)| took)
            .collect();
        assert_eq!(last_two, [secs(20) + half, secs(50)]);
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
            .insert_builds_then(vec![build(&a)], Vec::new(), |_| {})
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
