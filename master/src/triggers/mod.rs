//! Triggers: what queues builds besides a hand-made `master submit` —
//! webhooks (`webhook.rs`), polling (`poll.rs`) and timed builds
//! (`timed.rs`) — plus the one queueing path they and the API's submit share
//! (commit to the store, then tell the scheduler) and their counters.

pub mod git;
pub mod poll;
pub mod timed;
pub mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nightshift_proto::wire::{BuildId, BuildSource};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::BuilderDef;
use crate::scheduler::Event;
use crate::store::{NewBuild, Store};

/// Counts of what the triggers did since the master started (for the
/// master's metrics; [`TriggerCounters::snapshot`] reads them all).
#[derive(Debug, Default)]
pub struct TriggerCounters {
    /// Hook deliveries that were authentic and well formed.
    pub hook_accepted: AtomicU64,
    /// Builds queued by hooks.
    pub hook_builds_queued: AtomicU64,
    /// Authentic deliveries that queued nothing (a ping, a tag, a deleted
    /// branch, a branch no builder follows).
    pub hook_ignored: AtomicU64,
    /// Deliveries to a hook name that is not configured.
    pub hook_unknown: AtomicU64,
    /// Deliveries with a missing or wrong signature or token.
    pub hook_bad_signature: AtomicU64,
    /// Deliveries whose body could not be understood.
    pub hook_malformed: AtomicU64,
    /// Deliveries larger than [`webhook::MAX_HOOK_BODY`].
    pub hook_oversized: AtomicU64,
    /// `git ls-remote` polls run, and those that failed.
    pub polls: AtomicU64,
    pub poll_errors: AtomicU64,
    /// Builds queued because a poll saw a new revision.
    pub poll_builds_queued: AtomicU64,
    /// Timed builds queued, and those skipped (`only_if_changed`, no change).
    pub timed_builds_queued: AtomicU64,
    pub timed_skipped_unchanged: AtomicU64,
    /// Timed builds that could not be queued (e.g. the branch unreachable).
    pub timed_errors: AtomicU64,
}

/// A consistent-enough copy of [`TriggerCounters`], serializable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TriggerCountersSnapshot {
    pub hook_accepted: u64,
    pub hook_builds_queued: u64,
    pub hook_ignored: u64,
    pub hook_unknown: u64,
    pub hook_bad_signature: u64,
    pub hook_malformed: u64,
    pub hook_oversized: u64,
    pub polls: u64,
    pub poll_errors: u64,
    pub poll_builds_queued: u64,
    pub timed_builds_queued: u64,
    pub timed_skipped_unchanged: u64,
    pub timed_errors: u64,
}

impl TriggerCounters {
    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TriggerCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TriggerCountersSnapshot {
            hook_accepted: get(&self.hook_accepted),
            hook_builds_queued: get(&self.hook_builds_queued),
            hook_ignored: get(&self.hook_ignored),
            hook_unknown: get(&self.hook_unknown),
            hook_bad_signature: get(&self.hook_bad_signature),
            hook_malformed: get(&self.hook_malformed),
            hook_oversized: get(&self.hook_oversized),
            polls: get(&self.polls),
            poll_errors: get(&self.poll_errors),
            poll_builds_queued: get(&self.poll_builds_queued),
            timed_builds_queued: get(&self.timed_builds_queued),
            timed_skipped_unchanged: get(&self.timed_skipped_unchanged),
            timed_errors: get(&self.timed_errors),
        }
    }
}

/// What the triggers need of the master.
#[derive(Clone)]
pub struct TriggerContext {
    pub config: crate::reconfig::LiveConfig,
    pub store: Store,
    pub events: mpsc::UnboundedSender<Event>,
    pub counters: Arc<TriggerCounters>,
}

/// The source a build of `builder` at `revision` of `branch` checks out.
pub fn source_for(builder: &BuilderDef, branch: &str, revision: &str) -> Option<BuildSource> {
    let source = builder.source.as_ref()?;
    Some(BuildSource {
        repository: source.repo.clone(),
        branch: branch.to_owned(),
        revision: revision.to_owned(),
        mode: source.mode,
        shallow: source.shallow,
    })
}

/// Tells the scheduler about committed requests (in id order).
pub fn announce(events: &mpsc::UnboundedSender<Event>, ids: &[BuildId], builds: Vec<NewBuild>) {
    for (&id, build) in ids.iter().zip(builds) {
        let _ = events.send(Event::Submitted {
            id,
            builder: build.builder,
            properties: build.properties,
            source: build.source,
        });
    }
}

/// Commits `builds` (and the branch heads they build, if any), then hands
/// them to the scheduler: the one way a request enters the queue.
pub async fn queue_builds(
    store: &Store,
    events: &mpsc::UnboundedSender<Event>,
    builds: Vec<NewBuild>,
    heads: Vec<(String, String, String)>,
) -> anyhow::Result<Vec<BuildId>> {
    let ids = store.insert_builds(builds.clone(), heads).await?;
    announce(events, &ids, builds);
    Ok(ids)
}

/// Starts the polling and timed-build tasks.
pub fn start(context: TriggerContext, clock: Arc<dyn crate::scheduler::Clock>) {
    tokio::spawn(poll::run(context.clone()));
    let (fires, fired) = mpsc::channel(timed::MAX_PENDING_FIRES);
    tokio::spawn(timed::run(context.config.clone(), clock, fires));
    tokio::spawn(timed::queue_fired(context, fired));
}
