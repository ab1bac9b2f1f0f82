//! Timed builds: a builder's `schedule` (5-field cron, read in the master's
//! `timezone` with the policy crate's DST rule) fires at its instants by the
//! injected clock. A fire of a builder with a source resolves the branch's
//! head (`git ls-remote`) and, with `only_if_changed`, queues nothing when
//! that head is the one the last timed build was queued for.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use nightshift_policy::CronSchedule;
use tokio::sync::mpsc;

use super::{TriggerContext, TriggerCounters, announce, source_for};
use crate::config::MasterConfig;
use crate::reconfig::LiveConfig;
use crate::store::NewBuild;
use nightshift_proto::clock::Clock;

/// Fires waiting to be queued (the firing loop waits when it is full).
pub const MAX_PENDING_FIRES: usize = 64;

/// Longest single sleep: the wall clock is read again at least this often,
/// so a clock that was set (or a suspend) delays a fire by at most this.
const MAX_SLEEP: Duration = Duration::from_secs(300);

/// One builder's schedule came due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedFire {
    pub builder: String,
    pub at: Timestamp,
}

/// The earliest instant after `after` at which any builder's schedule fires
/// in the config's zone, with every builder firing then.
pub fn next_fire(config: &MasterConfig, after: Timestamp) -> Option<(Timestamp, Vec<String>)> {
    let tz = config.time_zone();
    let mut best: Option<(Timestamp, Vec<String>)> = None;
    for builder in &config.builders {
        let Some(expr) = &builder.schedule else {
            continue;
        };
        let Ok(cron) = CronSchedule::parse(expr) else {
            continue;
        };
        let Some(at) = cron.next_after(after, &tz) else {
            continue;
        };
        match &mut best {
            Some((best_at, names)) if *best_at == at => names.push(builder.name.clone()),
            Some((best_at, _)) if *best_at < at => {}
            _ => best = Some((at, vec![builder.name.clone()])),
        }
    }
    best
}

/// The firing loop: waits (by `clock`) for the next instant, sends one
/// [`TimedFire`] per builder, and re-plans when the config changes.
pub async fn run(live: LiveConfig, clock: Arc<dyn Clock>, fires: mpsc::Sender<TimedFire>) {
    let mut changes = live.subscribe();
    let mut cursor = clock.now();
    loop {
        let config = live.get();
        let Some((at, builders)) = next_fire(&config, cursor) else {
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        };
        let now = clock.now();
        if now < at {
            let wait = Duration::try_from(now.duration_until(at))
                .unwrap_or(Duration::ZERO)
                .min(MAX_SLEEP);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        for builder in builders {
            tracing::info!("schedule of builder {builder} fires ({at})");
            if fires.send(TimedFire { builder, at }).await.is_err() {
                return;
            }
        }
        // After a long suspend, fire once, not once per missed instant.
        cursor = at.max(now);
    }
}

/// A timed build's trigger: the instant it fired for, in the master's
/// zone (`schedule 2026-03-29 03:00 CEST`).
pub fn schedule_trigger(at: Timestamp, tz: &jiff::tz::TimeZone) -> String {
    format!(
        "schedule {}",
        at.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M %Z")
    )
}

/// Queues what the firing loop sends.
pub async fn queue_fired(context: TriggerContext, mut fired: mpsc::Receiver<TimedFire>) {
    while let Some(fire) = fired.recv().await {
        queue_one(&context, fire).await;
    }
}

async fn queue_one(context: &TriggerContext, fire: TimedFire) {
    let counters = &context.counters;
    let config = context.config.get();
    let Some(builder) = config.builder(&fire.builder) else {
        return; // Removed by a reconfig since.
    };
    let source = match &builder.source {
        None => None,
        Some(source) => match super::git::branch_head(&source.repo, &source.branch).await {
            Ok(revision) => source_for(builder, &source.branch, &revision),
            Err(why) => {
                TriggerCounters::bump(&counters.timed_errors, 1);
                tracing::error!("timed build of {}: {why}; not queued", fire.builder);
                return;
            }
        },
    };
    if builder.only_if_changed
        && let Some(source) = &source
    {
        match context
            .store
            .last_timed_revision(builder.name.clone())
            .await
        {
            Ok(Some(last)) if last == source.revision => {
                TriggerCounters::bump(&counters.timed_skipped_unchanged, 1);
                tracing::info!(
                    "timed build of {}: `{}` is still at {last}, built last time; skipped (only_if_changed)",
                    fire.builder,
                    source.branch
                );
                return;
            }
            Ok(_) => {}
            Err(e) => {
                TriggerCounters::bump(&counters.timed_errors, 1);
                tracing::error!("timed build of {}: {e:#}", fire.builder);
                return;
            }
        }
    }
    let build = NewBuild {
        builder: builder.name.clone(),
        properties: Default::default(),
        source,
        trigger: schedule_trigger(fire.at, &config.time_zone()),
    };
    match context
        .store
        .insert_timed_build(build.clone(), fire.at)
        .await
    {
        Ok(id) => {
            TriggerCounters::bump(&counters.timed_builds_queued, 1);
            tracing::info!("timed build of {} queued as build {id}", fire.builder);
            announce(&context.events, &[id], vec![build]);
        }
        Err(e) => {
            TriggerCounters::bump(&counters.timed_errors, 1);
            tracing::error!("timed build of {}: cannot queue: {e:#}", fire.builder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_proto::clock::TestClock;
    use std::path::Path;

    fn config(text: &str) -> MasterConfig {
        // `text` starts with top-level keys, so the worker table comes last.
        let text = format!(
            "{text}\n[[worker]]\nname = \"w\"\ntoken_sha256 = \"{}\"\n",
            "a".repeat(64)
        );
        MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/tmp")).unwrap()
    }

    fn local(text: &str, tz: &str) -> Timestamp {
        text.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::get(tz).unwrap())
            .unwrap()
            .timestamp()
    }

    #[test]
    fn builders_firing_together_fire_in_one_instant() {
        let config = config(
            "timezone = \"America/New_York\"\n\
             [[builder]]\nname = \"a\"\nworkers = [\"w\"]\nschedule = \"0 2 * * *\"\nsteps = [{ name = \"s\", command = \"true\" }]\n\
             [[builder]]\nname = \"b\"\nworkers = [\"w\"]\nschedule = \"0 2 * * *\"\nsteps = [{ name = \"s\", command = \"true\" }]\n\
             [[builder]]\nname = \"c\"\nworkers = [\"w\"]\nschedule = \"0 3 * * *\"\nsteps = [{ name = \"s\", command = \"true\" }]\n",
        );
        let (at, names) =
            next_fire(&config, local("2026-06-01T12:00:00", "America/New_York")).unwrap();
        assert_eq!(at, local("2026-06-02T02:00:00", "America/New_York"));
        assert_eq!(names, vec!["a".to_string(), "b".to_string()]);
    }

    /// The real firing loop with an injected clock: a nightly builder in
    /// Europe/Berlin across the spring-forward night and the next midnight.
    #[tokio::test(start_paused = true)]
    async fn a_nightly_fires_at_its_instants_by_the_injected_clock() {
        let live = LiveConfig::new(Arc::new(config(
            "timezone = \"Europe/Berlin\"\n\
             [[builder]]\nname = \"nightly\"\nworkers = [\"w\"]\nschedule = \"30 2 * * *\"\nsteps = [{ name = \"s\", command = \"true\" }]\n",
        )));
        let clock = Arc::new(TestClock::starting_at(local(
            "2026-03-28T23:00:00",
            "Europe/Berlin",
        )));
        let (fires, mut fired) = mpsc::channel(4);
        tokio::spawn(run(live, clock.clone(), fires));
        // 02:30 does not exist on 2026-03-29: it fires at 03:00 CEST.
        let first = fired.recv().await.unwrap();
        assert_eq!(first.builder, "nightly");
        assert_eq!(first.at.to_string(), "2026-03-29T01:00:00Z");
        assert!(clock.now() >= first.at);
        assert!(clock.now() < first.at + jiff::SignedDuration::from_secs(1));
        assert_eq!(
            schedule_trigger(first.at, &jiff::tz::TimeZone::get("Europe/Berlin").unwrap()),
            "schedule 2026-03-29 03:00 CEST"
        );
        let second = fired.recv().await.unwrap();
        assert_eq!(second.at, local("2026-03-30T02:30:00", "Europe/Berlin"));
        assert!(clock.now() >= second.at);
    }
}
