//! Polling for repositories that cannot send hooks: every builder with
//! `poll = "2m"` has its (repository, branch) asked for its head with
//! `git ls-remote` that often; a head that moved since the last one seen
//! queues one request per polling builder, and the new head is stored in
//! the same commit (so a master restart re-queues nothing). The first
//! sight of a branch only records its head.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{TriggerContext, TriggerCounters, announce, source_for};
use crate::config::MasterConfig;
use crate::store::{HeadAdvance, NewBuild};

/// A polled branch: (repository, branch).
type Polled = (String, String);

/// Every polled branch with its interval (the shortest of its builders').
pub fn polled_branches(config: &MasterConfig) -> BTreeMap<Polled, Duration> {
    let mut out: BTreeMap<Polled, Duration> = BTreeMap::new();
    for builder in &config.builders {
        if let (Some(source), Some(every)) = (&builder.source, builder.poll) {
            let key = (source.repo.clone(), source.branch.clone());
            let entry = out.entry(key).or_insert(every);
            *entry = (*entry).min(every);
        }
    }
    out
}

/// The polling task: sleeps until the next branch is due (or the config
/// changes), runs due polls concurrently, never two of one branch at once.
pub async fn run(context: TriggerContext) {
    let mut changes = context.config.subscribe();
    let mut due: BTreeMap<Polled, Instant> = BTreeMap::new();
    let mut in_flight: BTreeSet<Polled> = BTreeSet::new();
    let mut polls: JoinSet<Polled> = JoinSet::new();
    loop {
        let config = context.config.get();
        let wanted = polled_branches(&config);
        due.retain(|key, _| wanted.contains_key(key));
        let now = Instant::now();
        for key in wanted.keys() {
            due.entry(key.clone()).or_insert(now);
        }
        for (key, at) in due.iter_mut() {
            if *at <= now && !in_flight.contains(key) {
                *at = now + wanted[key];
                in_flight.insert(key.clone());
                let (context, key) = (context.clone(), key.clone());
                polls.spawn(async move {
                    poll_once(&context, &key.0, &key.1).await;
                    key
                });
            }
        }
        let next = due
            .iter()
            .filter(|(key, _)| !in_flight.contains(*key))
            .map(|(_, at)| *at)
            .min();
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            Some(done) = polls.join_next() => {
                if let Ok(key) = done {
                    in_flight.remove(&key);
                } else {
                    // A poll panicked: forget which, re-plan all.
                    in_flight.clear();
                }
            }
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// One poll of `branch` in `repo`.
async fn poll_once(context: &TriggerContext, repo: &str, branch: &str) {
    TriggerCounters::bump(&context.counters.polls, 1);
    let revision = match super::git::branch_head(repo, branch).await {
        Ok(revision) => revision,
        Err(why) => {
            TriggerCounters::bump(&context.counters.poll_errors, 1);
            tracing::warn!("poll {repo} {branch}: {why}");
            return;
        }
    };
    let config = context.config.get();
    let builds: Vec<NewBuild> = config
        .builders
        .iter()
        .filter(|b| {
            b.poll.is_some()
                && b.source
                    .as_ref()
                    .is_some_and(|s| s.repo == repo && s.branch == branch)
        })
        .map(|b| NewBuild {
            builder: b.name.clone(),
            properties: Default::default(),
            source: source_for(b, branch, &revision),
            trigger: "poll".into(),
        })
        .collect();
    match context
        .store
        .advance_head(
            repo.to_owned(),
            branch.to_owned(),
            revision.clone(),
            builds.clone(),
        )
        .await
    {
        Ok(HeadAdvance::Unchanged) => {
            tracing::debug!("poll {repo} {branch}: still {revision}")
        }
        Ok(HeadAdvance::Baseline) => {
            tracing::info!(
                "poll {repo} {branch}: first seen at {revision}; builds start with the next change"
            )
        }
        Ok(HeadAdvance::Queued(ids)) => {
            TriggerCounters::bump(&context.counters.poll_builds_queued, ids.len() as u64);
            tracing::info!("poll {repo} {branch}: new revision {revision}: queued builds {ids:?}");
            announce(&context.events, &ids, builds);
        }
        Err(e) => {
            TriggerCounters::bump(&context.counters.poll_errors, 1);
            tracing::error!("poll {repo} {branch}: cannot record {revision}: {e:#}");
        }
    }
}
