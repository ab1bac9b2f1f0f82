//! Triggers: what queues builds besides a hand-made `master submit` —
//! webhooks (their HTTP endpoint is `webhook.rs`, a layer above), polling (`poll.rs`)
//! and timed builds (`timed.rs`) — plus the one queueing path they and the
//! API's submit share (commit to the store, then tell the scheduler) and
//! their counters.

pub mod git;
pub mod poll;
pub mod timed;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Deliveries larger than `MAX_HOOK_BODY` (webhook.rs).
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
    /// Per configured hook: deliveries by what became of them (the hook
    /// names come from master.toml, so the map stays small).
    per_hook: Mutex<BTreeMap<(String, HookResult), u64>>,
}

/// What became of one delivery to a configured hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HookResult {
    /// Authentic and well formed (whether or not it queued builds).
    Accepted,
    /// A build it queued (counted once per build).
    BuildQueued,
    /// Refused: missing or wrong signature or token.
    BadSignature,
    /// Refused: the body could not be understood.
    Malformed,
    /// Refused: larger than `MAX_HOOK_BODY` (webhook.rs).
    Oversized,
    /// Refused: the hook's secret file is unreadable or empty.
    SecretUnavailable,
}

impl HookResult {
    /// The reasons a delivery is refused, in the order metrics list them.
    pub const REFUSALS: [HookResult; 4] = [
        HookResult::BadSignature,
        HookResult::Malformed,
        HookResult::Oversized,
        HookResult::SecretUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HookResult::Accepted => "accepted",
            HookResult::BuildQueued => "build_queued",
            HookResult::BadSignature => "bad_signature",
            HookResult::Malformed => "malformed",
            HookResult::Oversized => "oversized",
            HookResult::SecretUnavailable => "secret_unavailable",
        }
    }
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

    /// Counts `by` deliveries (or builds) of configured hook `hook`.
    pub fn hook(&self, hook: &str, result: HookResult, by: u64) {
        let mut map = self
            .per_hook
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *map.entry((hook.to_owned(), result)).or_default() += by;
    }

    /// Appends the trigger families to a Prometheus text answer; `hooks` are
    /// the configured hooks (listed with zeroes before any delivery).
    pub fn render_metrics(&self, out: &mut String, hooks: &[String]) {
        use nightshift_proto::prometheus::{family, sample};
        let per_hook = self
            .per_hook
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut names: Vec<&str> = hooks.iter().map(String::as_str).collect();
        // A hook removed by a reconfig keeps its counts.
        for (name, _) in per_hook.keys() {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        let count = |hook: &str, result: HookResult| {
            per_hook
                .get(&(hook.to_owned(), result))
                .copied()
                .unwrap_or(0) as f64
        };
        family(
            out,
            "nightshift_master_hook_accepted_total",
            "counter",
            "Authentic, well-formed webhook deliveries, per hook (whether or not they queued builds).",
        );
        for hook in &names {
            sample(
                out,
                "nightshift_master_hook_accepted_total",
                &[("hook", hook)],
                count(hook, HookResult::Accepted),
            );
        }
        family(
            out,
            "nightshift_master_hook_builds_queued_total",
            "counter",
            "Builds queued by webhook deliveries, per hook.",
        );
        for hook in &names {
            sample(
                out,
                "nightshift_master_hook_builds_queued_total",
                &[("hook", hook)],
                count(hook, HookResult::BuildQueued),
            );
        }
        family(
            out,
            "nightshift_master_hook_refused_total",
            "counter",
            "Webhook deliveries refused (nothing queued), per hook and reason.",
        );
        for hook in &names {
            for reason in HookResult::REFUSALS {
                sample(
                    out,
                    "nightshift_master_hook_refused_total",
                    &[("hook", hook), ("reason", reason.label())],
                    count(hook, reason),
                );
            }
        }
        let all = self.snapshot();
        let single = |out: &mut String, name: &str, help: &str, value: u64| {
            family(out, name, "counter", help);
            sample(out, name, &[], value as f64);
        };
        single(
            out,
            "nightshift_master_hook_unknown_total",
            "Webhook deliveries to a hook name master.toml does not configure (404).",
            all.hook_unknown,
        );
        single(
            out,
            "nightshift_master_polls_total",
            "git ls-remote polls of polled builders' branches.",
            all.polls,
        );
        single(
            out,
            "nightshift_master_poll_errors_total",
            "Polls that failed (the repository unreachable, git failed).",
            all.poll_errors,
        );
        family(
            out,
            "nightshift_master_triggered_builds_total",
            "counter",
            "Builds queued by a trigger, by trigger.",
        );
        for (trigger, value) in [
            ("webhook", all.hook_builds_queued),
            ("poll", all.poll_builds_queued),
            ("schedule", all.timed_builds_queued),
        ] {
            sample(
                out,
                "nightshift_master_triggered_builds_total",
                &[("trigger", trigger)],
                value as f64,
            );
        }
        single(
            out,
            "nightshift_master_timed_skipped_unchanged_total",
            "Timed builds not queued because the branch had not changed (only_if_changed).",
            all.timed_skipped_unchanged,
        );
        single(
            out,
            "nightshift_master_timed_errors_total",
            "Timed builds that could not be queued.",
            all.timed_errors,
        );
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
/// them to the scheduler: the one way a request enters the queue. The
/// scheduler hears of them from the store thread right after the commit
/// (before the caller is answered), so a hand-out does not wait for the
/// caller's task to be woken first.
pub async fn queue_builds(
    store: &Store,
    events: &mpsc::UnboundedSender<Event>,
    builds: Vec<NewBuild>,
    heads: Vec<(String, String, String)>,
) -> anyhow::Result<Vec<BuildId>> {
    let events = events.clone();
    let announced = builds.clone();
    store
        .insert_builds_then(builds, heads, move |ids| {
            for id in ids {
                tracing::debug!(target: nightshift_proto::log::HANDOFF, "build {id}: committed");
            }
            announce(&events, ids, announced)
        })
        .await
}

/// The test hook for timed builds: an RFC 3339 instant at which the
/// triggers' clock starts when the master starts (it then advances with the
/// real one). Read once, by `master run` only; it moves nothing else (the
/// scheduler, presence, logs keep the real time). Not a user setting.
pub const TEST_CLOCK_ENV: &str = "NIGHTSHIFT_TEST_TRIGGER_CLOCK";

/// The real clock moved by a fixed offset.
struct OffsetClock {
    offset: jiff::SignedDuration,
}

impl nightshift_proto::clock::Clock for OffsetClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
            .checked_add(self.offset)
            .unwrap_or_else(|_| jiff::Timestamp::now())
    }
}

/// The instant [`TEST_CLOCK_ENV`] names, if it is set (read once, at
/// start, before anything binds). A value that is not an instant is an
/// error that names the variable.
pub fn test_clock_start(
    value: Option<std::ffi::OsString>,
) -> anyhow::Result<Option<jiff::Timestamp>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let start = text.trim().parse().map_err(|e| {
        anyhow::anyhow!(
            "{TEST_CLOCK_ENV}=`{text}`: not an instant like `2026-03-29T00:59:50Z` ({e}); \
             unset it to use the real clock"
        )
    })?;
    Ok(Some(start))
}

/// The triggers' clock: the real one, or one that reads `start` now (made
/// right before the triggers start, so a slow start costs the test nothing).
pub fn trigger_clock(start: Option<jiff::Timestamp>) -> Arc<dyn nightshift_proto::clock::Clock> {
    let Some(start) = start else {
        return Arc::new(nightshift_proto::clock::SystemClock);
    };
    let offset = jiff::Timestamp::now().duration_until(start);
    tracing::warn!(
        "{TEST_CLOCK_ENV} is set: timed builds run by a clock that reads {start} now \
         (a test hook; the rest of the master keeps the real time)"
    );
    Arc::new(OffsetClock { offset })
}

/// Starts the polling and timed-build tasks.
pub fn start(context: TriggerContext, clock: Arc<dyn nightshift_proto::clock::Clock>) {
    tokio::spawn(poll::run(context.clone()));
    let (fires, fired) = mpsc::channel(timed::MAX_PENDING_FIRES);
    tokio::spawn(timed::run(context.config.clone(), clock, fires));
    tokio::spawn(timed::queue_fired(context, fired));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_clock_reads_the_instant_it_was_given_and_advances() {
        let start = test_clock_start(Some("2026-03-29T00:59:50Z".into())).unwrap();
        let clock = trigger_clock(start);
        let read = clock.now();
        let start: jiff::Timestamp = "2026-03-29T00:59:50Z".parse().unwrap();
        assert!(read >= start && read < start + jiff::SignedDuration::from_secs(60));
        assert_eq!(test_clock_start(None).unwrap(), None);
        let real = trigger_clock(None).now();
        assert!(real.duration_since(jiff::Timestamp::now()).abs().as_secs() < 60);
        let bad = test_clock_start(Some("tomorrow".into())).unwrap_err();
        assert!(
            bad.to_string()
                .contains("NIGHTSHIFT_TEST_TRIGGER_CLOCK=`tomorrow`"),
            "{bad}"
        );
    }

    #[test]
    fn hook_metrics_count_per_hook_and_reason_with_zeroes() {
        let counters = TriggerCounters::default();
        counters.hook("gh", HookResult::Accepted, 1);
        counters.hook("gh", HookResult::BuildQueued, 2);
        counters.hook("gh", HookResult::BadSignature, 1);
        counters.hook("gh", HookResult::BadSignature, 1);
        counters.hook("old", HookResult::Malformed, 1);
        TriggerCounters::bump(&counters.hook_unknown, 3);
        TriggerCounters::bump(&counters.hook_builds_queued, 2);
        let mut text = String::new();
        counters.render_metrics(&mut text, &["gh".into(), "lab".into()]);
        for line in [
            "nightshift_master_hook_accepted_total{hook=\"gh\"} 1",
            "nightshift_master_hook_accepted_total{hook=\"lab\"} 0",
            "nightshift_master_hook_builds_queued_total{hook=\"gh\"} 2",
            "nightshift_master_hook_refused_total{hook=\"gh\",reason=\"bad_signature\"} 2",
            "nightshift_master_hook_refused_total{hook=\"lab\",reason=\"oversized\"} 0",
            "nightshift_master_hook_refused_total{hook=\"old\",reason=\"malformed\"} 1",
            "nightshift_master_hook_unknown_total 3",
            "nightshift_master_triggered_builds_total{trigger=\"webhook\"} 2",
            "nightshift_master_triggered_builds_total{trigger=\"schedule\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!((types, helps), (9, 9), "{text}");
    }
}
