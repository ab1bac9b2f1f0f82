//! Persisted step-lock grants, re-taken after a restart.

use super::*;

impl Store {
    /// Persists that `step` of build `id` holds its locks on `worker`;
    /// the answer is done after the commit (the grant is sent only then, so
    /// a restart cannot forget a hold the agent acts on).
    pub fn save_step_grant(&self, id: BuildId, step: u32, worker: String) -> Committed {
        self.spawn_committed("save step grant", move |conn| {
            conn.prepare_cached(
                "INSERT INTO step_grants (build_id, step, worker) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(build_id, step) DO UPDATE SET worker = excluded.worker",
            )?
            .execute(params![id as i64, step, worker])?;
            Ok(())
        })
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
}
