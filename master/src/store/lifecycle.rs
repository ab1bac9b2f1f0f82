//! A build's progress once queued: start, re-queue, waiting reasons, steps, results, cancel.

use super::*;

impl Store {
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
}

impl Store {
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
