//! The master's `/metrics`: counters recorded where things happen (one
//! process-wide registry, [`METRICS`]) plus gauges read at scrape time from
//! the scheduler's snapshot and the store, rendered in the Prometheus text
//! format (the same writer as the agent's, `nightshift_proto::prometheus`).
//!
//! Every label takes values from a fixed set (reasons are kinds, not free
//! text; workers and builders come from master.toml), so the output stays
//! bounded whatever peers send. Recording costs an atomic add or one short
//! uncontended lock; nothing here is O(workers) on a per-build path.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nightshift_policy::PresenceState;
use nightshift_proto::prometheus::{family, sample};
use nightshift_proto::wire::Outcome;

use crate::snapshot::Snapshot;

/// The master's one registry.
pub static METRICS: Metrics = Metrics::new();

/// Upper bounds (seconds) of the wait-before-start histogram's buckets.
const WAIT_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// What an agent tried that the master refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refused {
    /// A frame (output, step, accept/refuse, step wait) for a build not handed to it.
    Frame,
    /// A build result.
    Result,
    /// Adopting a build listed in its hello.
    Adoption,
    /// A `cancelled` result that would consume another worker's cancel.
    Cancel,
    /// An artifact upload.
    Artifact,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::Frame => "frame",
            Refused::Result => "result",
            Refused::Adoption => "adoption",
            Refused::Cancel => "cancel",
            Refused::Artifact => "artifact",
        }
    }
}

/// Why it was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// The build was never handed to this worker (or was taken back).
    NotHandedToIt,
    /// The build's builder does not list this worker.
    BuilderDoesNotListIt,
    /// The build is unknown or already finished by another worker.
    UnknownOrFinished,
}

impl RefusalReason {
    fn label(self) -> &'static str {
        match self {
            RefusalReason::NotHandedToIt => "not_handed_to_it",
            RefusalReason::BuilderDoesNotListIt => "builder_does_not_list_it",
            RefusalReason::UnknownOrFinished => "unknown_or_finished",
        }
    }
}

/// Why a build went back to the queue as a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RetryReason {
    /// Its worker was gone longer than `missing_timeout`.
    WorkerMissing,
    /// Its worker reconnected without it and delivered no result.
    ReconnectedWithoutIt,
    /// Its worker cancelled it (a stop deadline, the owner).
    CancelledOnWorker,
    /// Its worker was removed from master.toml.
    WorkerRemoved,
    /// A step held its locks past the step's timeout.
    LockLeaseEnded,
}

impl RetryReason {
    fn label(self) -> &'static str {
        match self {
            RetryReason::WorkerMissing => "worker_missing",
            RetryReason::ReconnectedWithoutIt => "reconnected_without_it",
            RetryReason::CancelledOnWorker => "cancelled_on_worker",
            RetryReason::WorkerRemoved => "worker_removed",
            RetryReason::LockLeaseEnded => "lock_lease_ended",
        }
    }
}

/// Why the master closed an agent's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DisconnectReason {
    /// It sent frames faster than its rate limit allows.
    RateLimited,
    /// It did not read its frames and its outbox filled up.
    OutboxFull,
    /// It sent a frame that does not decode.
    BadFrame,
    /// It missed its heartbeats.
    Silent,
}

impl DisconnectReason {
    fn label(self) -> &'static str {
        match self {
            DisconnectReason::RateLimited => "rate_limited",
            DisconnectReason::OutboxFull => "outbox_full",
            DisconnectReason::BadFrame => "bad_frame",
            DisconnectReason::Silent => "silent",
        }
    }
}

/// How a latent start ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LatentStart {
    Started,
    NotNow,
    Failed,
    TimedOut,
}

impl LatentStart {
    fn label(self) -> &'static str {
        match self {
            LatentStart::Started => "started",
            LatentStart::NotNow => "not_now",
            LatentStart::Failed => "failed",
            LatentStart::TimedOut => "timed_out",
        }
    }
}

/// Whether a lock wait is for a whole build or for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockLevel {
    Build,
    Step,
}

/// Counters and histograms, recorded from anywhere.
pub struct Metrics {
    finished: [AtomicU64; 4],
    refused: Mutex<BTreeMap<(Refused, RefusalReason), u64>>,
    retries: Mutex<BTreeMap<RetryReason, u64>>,
    disconnects: Mutex<BTreeMap<DisconnectReason, u64>>,
    latent_starts: Mutex<BTreeMap<LatentStart, u64>>,
    lock_waits: [AtomicU64; 2],
    wait_buckets: [AtomicU64; WAIT_BUCKETS.len()],
    wait_count: AtomicU64,
    wait_sum_micros: AtomicU64,
    log_bytes_dropped: AtomicU64,
    output_bytes_received: AtomicU64,
    store_queue_full: AtomicU64,
    frames_rate_limited: AtomicU64,
    /// Enrolments refused by the source's and by the global rate limit.
    enrolments_rate_limited: [AtomicU64; 2],
    artifacts_stored: AtomicU64,
    artifact_bytes_stored: AtomicU64,
    artifact_uploads_rejected: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub const fn new() -> Metrics {
        Metrics {
            finished: [const { AtomicU64::new(0) }; 4],
            refused: Mutex::new(BTreeMap::new()),
            retries: Mutex::new(BTreeMap::new()),
            disconnects: Mutex::new(BTreeMap::new()),
            latent_starts: Mutex::new(BTreeMap::new()),
            lock_waits: [const { AtomicU64::new(0) }; 2],
            wait_buckets: [const { AtomicU64::new(0) }; WAIT_BUCKETS.len()],
            wait_count: AtomicU64::new(0),
            wait_sum_micros: AtomicU64::new(0),
            log_bytes_dropped: AtomicU64::new(0),
            output_bytes_received: AtomicU64::new(0),
            store_queue_full: AtomicU64::new(0),
            frames_rate_limited: AtomicU64::new(0),
            enrolments_rate_limited: [const { AtomicU64::new(0) }; 2],
            artifacts_stored: AtomicU64::new(0),
            artifact_bytes_stored: AtomicU64::new(0),
            artifact_uploads_rejected: AtomicU64::new(0),
        }
    }

    pub fn build_finished(&self, outcome: Outcome) {
        self.finished[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, what: Refused, why: RefusalReason) {
        bump(&self.refused, (what, why));
    }

    pub fn retried(&self, why: RetryReason) {
        bump(&self.retries, why);
    }

    pub fn disconnected(&self, why: DisconnectReason) {
        bump(&self.disconnects, why);
    }

    pub fn latent_start(&self, how: LatentStart) {
        bump(&self.latent_starts, how);
    }

    pub fn lock_wait(&self, level: LockLevel) {
        let index = match level {
            LockLevel::Build => 0,
            LockLevel::Step => 1,
        };
        self.lock_waits[index].fetch_add(1, Ordering::Relaxed);
    }

    /// A build started after waiting `waited` since it was queued.
    pub fn waited_before_start(&self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        if let Some(index) = WAIT_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.wait_buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.wait_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.wait_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn log_bytes_dropped(&self, bytes: u64) {
        self.log_bytes_dropped.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Live build output of `bytes` arrived from an agent.
    pub fn output_received(&self, bytes: u64) {
        self.output_bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// An artifact of `bytes` was verified and stored.
    pub fn artifact_stored(&self, bytes: u64) {
        self.artifacts_stored.fetch_add(1, Ordering::Relaxed);
        self.artifact_bytes_stored
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// An artifact upload from the build's own worker was refused (too
    /// large, bad name, checksum mismatch, broken off).
    pub fn artifact_upload_rejected(&self) {
        self.artifact_uploads_rejected
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn store_queue_full(&self) {
        self.store_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn frame_rate_limited(&self) {
        self.frames_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn enrolment_rate_limited(&self, limit: crate::worker_groups::EnrolLimit) {
        let index = match limit {
            crate::worker_groups::EnrolLimit::Source => 0,
            crate::worker_groups::EnrolLimit::Global => 1,
        };
        self.enrolments_rate_limited[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Renders the counters plus the gauges of `snapshot` and `depths`
    /// (queued and running builds per builder; `builders` lists the
    /// configured ones, so a builder with nothing queued reports 0).
    pub fn render(
        &self,
        snapshot: &Snapshot,
        builders: &[String],
        depths: &BTreeMap<String, (u64, u64)>,
    ) -> String {
        let mut out = String::new();
        let depth = |builder: &str| depths.get(builder).copied().unwrap_or((0, 0));
        let mut names: Vec<&str> = builders.iter().map(String::as_str).collect();
        // Builds of a builder removed by reconfig still count.
        names.extend(
            depths
                .keys()
                .map(String::as_str)
                .filter(|b| !builders.iter().any(|c| c == b)),
        );

        family(
            &mut out,
            "nightshift_master_queue_depth",
            "gauge",
            "Builds queued (not yet handed to a worker), per builder.",
        );
        for builder in &names {
            sample(
                &mut out,
                "nightshift_master_queue_depth",
                &[("builder", builder)],
                depth(builder).0 as f64,
            );
        }
        family(
            &mut out,
            "nightshift_master_builds_running",
            "gauge",
            "Builds handed to a worker and not finished, per builder.",
        );
        for builder in &names {
            sample(
                &mut out,
                "nightshift_master_builds_running",
                &[("builder", builder)],
                depth(builder).1 as f64,
            );
        }

        family(
            &mut out,
            "nightshift_master_wait_before_start_seconds",
            "histogram",
            "Time from a build's (re-)queueing to its hand-out to a worker.",
        );
        let mut cumulative = 0;
        for (bound, count) in WAIT_BUCKETS.iter().zip(&self.wait_buckets) {
            cumulative += count.load(Ordering::Relaxed);
            sample(
                &mut out,
                "nightshift_master_wait_before_start_seconds_bucket",
                &[("le", &nightshift_proto::prometheus::number(*bound))],
                cumulative as f64,
            );
        }
        let count = self.wait_count.load(Ordering::Relaxed);
        sample(
            &mut out,
            "nightshift_master_wait_before_start_seconds_bucket",
            &[("le", "+Inf")],
            count as f64,
        );
        sample(
            &mut out,
            "nightshift_master_wait_before_start_seconds_sum",
            &[],
            self.wait_sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        );
        sample(
            &mut out,
            "nightshift_master_wait_before_start_seconds_count",
            &[],
            count as f64,
        );

        family(
            &mut out,
            "nightshift_master_workers",
            "gauge",
            "Workers by presence state and by the kind of source that decided it.",
        );
        let mut by_state: BTreeMap<(String, String), u64> = BTreeMap::new();
        for state in PresenceState::ALL {
            by_state
                .entry((state.to_string(), "none".into()))
                .or_default();
        }
        for worker in &snapshot.workers.workers {
            let source = worker.source.as_ref().map_or("none", source_kind);
            *by_state
                .entry((worker.state.to_string(), source.to_owned()))
                .or_default() += 1;
        }
        for ((state, source), count) in &by_state {
            sample(
                &mut out,
                "nightshift_master_workers",
                &[("state", state), ("source", source)],
                *count as f64,
            );
        }
        family(
            &mut out,
            "nightshift_master_workers_connected",
            "gauge",
            "Workers whose agent is connected.",
        );
        let connected = snapshot
            .workers
            .workers
            .iter()
            .filter(|w| w.connected)
            .count();
        sample(
            &mut out,
            "nightshift_master_workers_connected",
            &[],
            connected as f64,
        );
        family(
            &mut out,
            "nightshift_master_paused",
            "gauge",
            "1 while the master hands out no new builds (master pause).",
        );
        sample(
            &mut out,
            "nightshift_master_paused",
            &[],
            f64::from(u8::from(snapshot.workers.paused)),
        );

        family(
            &mut out,
            "nightshift_master_builds_finished_total",
            "counter",
            "Builds finished since the master started, by outcome.",
        );
        for outcome in [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Timeout,
            Outcome::Cancelled,
        ] {
            sample(
                &mut out,
                "nightshift_master_builds_finished_total",
                &[("outcome", &outcome.to_string())],
                self.finished[outcome_index(outcome)].load(Ordering::Relaxed) as f64,
            );
        }

        family(
            &mut out,
            "nightshift_master_retries_total",
            "counter",
            "Builds that went back to the queue as a retry, by reason.",
        );
        let retries = snapshot_of(&self.retries);
        for why in [
            RetryReason::WorkerMissing,
            RetryReason::ReconnectedWithoutIt,
            RetryReason::CancelledOnWorker,
            RetryReason::WorkerRemoved,
            RetryReason::LockLeaseEnded,
        ] {
            sample(
                &mut out,
                "nightshift_master_retries_total",
                &[("reason", why.label())],
                retries.get(&why).copied().unwrap_or(0) as f64,
            );
        }

        family(
            &mut out,
            "nightshift_master_refused_total",
            "counter",
            "What agents sent for builds that are not theirs, refused, by what and why.",
        );
        let refused = snapshot_of(&self.refused);
        for what in [
            Refused::Frame,
            Refused::Result,
            Refused::Adoption,
            Refused::Cancel,
            Refused::Artifact,
        ] {
            for why in [
                RefusalReason::NotHandedToIt,
                RefusalReason::BuilderDoesNotListIt,
                RefusalReason::UnknownOrFinished,
            ] {
                sample(
                    &mut out,
                    "nightshift_master_refused_total",
                    &[("what", what.label()), ("reason", why.label())],
                    refused.get(&(what, why)).copied().unwrap_or(0) as f64,
                );
            }
        }

        family(
            &mut out,
            "nightshift_master_frames_rate_limited_total",
            "counter",
            "Agent frames that exceeded their connection's rate limit.",
        );
        sample(
            &mut out,
            "nightshift_master_frames_rate_limited_total",
            &[],
            self.frames_rate_limited.load(Ordering::Relaxed) as f64,
        );
        family(
            &mut out,
            "nightshift_master_enrolments_rate_limited_total",
            "counter",
            "Enrolments refused with 429 by the rate limit of their source address or of all.",
        );
        for (limit, count) in [
            crate::worker_groups::EnrolLimit::Source,
            crate::worker_groups::EnrolLimit::Global,
        ]
        .into_iter()
        .zip(&self.enrolments_rate_limited)
        {
            sample(
                &mut out,
                "nightshift_master_enrolments_rate_limited_total",
                &[("limit", limit.label())],
                count.load(Ordering::Relaxed) as f64,
            );
        }
        family(
            &mut out,
            "nightshift_master_agent_disconnects_total",
            "counter",
            "Agent connections the master closed for cause, by reason.",
        );
        let disconnects = snapshot_of(&self.disconnects);
        for why in [
            DisconnectReason::RateLimited,
            DisconnectReason::OutboxFull,
            DisconnectReason::BadFrame,
            DisconnectReason::Silent,
        ] {
            sample(
                &mut out,
                "nightshift_master_agent_disconnects_total",
                &[("reason", why.label())],
                disconnects.get(&why).copied().unwrap_or(0) as f64,
            );
        }

        family(
            &mut out,
            "nightshift_master_lock_waits_total",
            "counter",
            "Times a build (for its builder-level locks) or a step waited for a lock.",
        );
        for (index, level) in ["build", "step"].iter().enumerate() {
            sample(
                &mut out,
                "nightshift_master_lock_waits_total",
                &[("level", level)],
                self.lock_waits[index].load(Ordering::Relaxed) as f64,
            );
        }
        family(
            &mut out,
            "nightshift_master_lock_waiting",
            "gauge",
            "Builds and steps waiting for a lock right now.",
        );
        let waiting = snapshot
            .waiting_for
            .values()
            .filter(|why| why.starts_with("lock"))
            .count();
        sample(
            &mut out,
            "nightshift_master_lock_waiting",
            &[],
            waiting as f64,
        );

        family(
            &mut out,
            "nightshift_master_latent_starts_total",
            "counter",
            "Latent instance starts, by how they ended.",
        );
        let starts = snapshot_of(&self.latent_starts);
        for how in [
            LatentStart::Started,
            LatentStart::NotNow,
            LatentStart::Failed,
            LatentStart::TimedOut,
        ] {
            sample(
                &mut out,
                "nightshift_master_latent_starts_total",
                &[("outcome", how.label())],
                starts.get(&how).copied().unwrap_or(0) as f64,
            );
        }

        family(
            &mut out,
            "nightshift_master_log_bytes_dropped_total",
            "counter",
            "Build output not stored because the build's log reached max_log_bytes.",
        );
        sample(
            &mut out,
            "nightshift_master_log_bytes_dropped_total",
            &[],
            self.log_bytes_dropped.load(Ordering::Relaxed) as f64,
        );
        family(
            &mut out,
            "nightshift_master_output_bytes_received_total",
            "counter",
            "Live build output received from agents (agents send none past max_log_bytes).",
        );
        sample(
            &mut out,
            "nightshift_master_output_bytes_received_total",
            &[],
            self.output_bytes_received.load(Ordering::Relaxed) as f64,
        );
        family(
            &mut out,
            "nightshift_master_store_queue_full_total",
            "counter",
            "Times a writer waited because the store's job queue was full.",
        );
        sample(
            &mut out,
            "nightshift_master_store_queue_full_total",
            &[],
            self.store_queue_full.load(Ordering::Relaxed) as f64,
        );
        for (name, help, value) in [
            (
                "nightshift_master_artifacts_stored_total",
                "Artifacts uploaded, verified (SHA-256) and stored.",
                &self.artifacts_stored,
            ),
            (
                "nightshift_master_artifact_bytes_stored_total",
                "Bytes of artifacts stored.",
                &self.artifact_bytes_stored,
            ),
            (
                "nightshift_master_artifact_uploads_rejected_total",
                "Artifact uploads of a build's own worker refused: over a size cap, a bad name, \
                 a checksum mismatch or a broken-off body.",
                &self.artifact_uploads_rejected,
            ),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, &[], value.load(Ordering::Relaxed) as f64);
        }
        out
    }
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    let mut map = map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *map.entry(key).or_default() += 1;
}

fn snapshot_of<K: Ord + Clone>(map: &Mutex<BTreeMap<K, u64>>) -> BTreeMap<K, u64> {
    map.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Success => 0,
        Outcome::Failure => 1,
        Outcome::Timeout => 2,
        Outcome::Cancelled => 3,
    }
}

/// The kind of a presence source (a schedule's name is left out: labels
/// stay few).
fn source_kind(source: &nightshift_policy::Source) -> &'static str {
    use nightshift_policy::Source;
    match source {
        Source::Schedule(_) => "schedule",
        Source::Load => "load",
        Source::Manual => "manual",
        Source::Stopping => "stopping",
        Source::Master => "master",
        Source::Default => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_proto::api::{WorkerInfo, WorkerList};

    #[test]
    fn render_has_every_family_once_with_zeroes_and_counts() {
        let metrics = Metrics::new();
        metrics.build_finished(Outcome::Success);
        metrics.refused(Refused::Result, RefusalReason::NotHandedToIt);
        metrics.refused(Refused::Result, RefusalReason::NotHandedToIt);
        metrics.waited_before_start(Duration::from_millis(200));
        metrics.waited_before_start(Duration::from_secs(7200));
        let snapshot = Snapshot {
            workers: WorkerList {
                paused: false,
                workers: vec![WorkerInfo {
                    name: "w\"1".into(),
                    state: PresenceState::Available,
                    reason: "r".into(),
                    source: Some(nightshift_policy::Source::Schedule("nights".into())),
                    since: None,
                    until: None,
                    connected: true,
                    max_builds: 1,
                    running: vec![],
                    latent: None,
                }],
            },
            waiting_for: BTreeMap::from([(3, "lock db (on w1)".to_owned())]),
            estimates: BTreeMap::new(),
            running: BTreeMap::new(),
        };
        let depths = BTreeMap::from([("app".to_owned(), (2, 1))]);
        let text = metrics.render(&snapshot, &["app".into(), "idle".into()], &depths);
        for line in [
            "nightshift_master_queue_depth{builder=\"app\"} 2",
            "nightshift_master_queue_depth{builder=\"idle\"} 0",
            "nightshift_master_builds_running{builder=\"app\"} 1",
            "nightshift_master_wait_before_start_seconds_bucket{le=\"0.5\"} 1",
            "nightshift_master_wait_before_start_seconds_bucket{le=\"3600\"} 1",
            "nightshift_master_wait_before_start_seconds_bucket{le=\"+Inf\"} 2",
            "nightshift_master_wait_before_start_seconds_count 2",
            "nightshift_master_workers{state=\"available\",source=\"schedule\"} 1",
            "nightshift_master_workers{state=\"away\",source=\"none\"} 0",
            "nightshift_master_workers_connected 1",
            "nightshift_master_builds_finished_total{outcome=\"success\"} 1",
            "nightshift_master_builds_finished_total{outcome=\"failure\"} 0",
            "nightshift_master_refused_total{what=\"result\",reason=\"not_handed_to_it\"} 2",
            "nightshift_master_lock_waiting 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let all = names.len();
        names.dedup();
        assert_eq!(all, names.len(), "a family declared twice");
    }
}
