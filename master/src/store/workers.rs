//! Workers' last presence, recent build durations, enrolments, and the farm's pause flag.

use super::*;

impl Store {
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
    /// builds by when they finished, in that order: the seed of the
    /// duration estimates, the same runs a master that never restarted
    /// would hold (it records each as it finishes; a retried build of a low
    /// id can be among the last to finish).
    pub async fn recent_durations(
        &self,
        per_builder: usize,
    ) -> anyhow::Result<Vec<(String, jiff::SignedDuration)>> {
        let limit = i64::try_from(per_builder).unwrap_or(i64::MAX);
        self.call(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT builder, started_at, finished_at FROM ( \
                   SELECT id, builder, started_at, finished_at, \
                     ROW_NUMBER() OVER (PARTITION BY builder \
                       ORDER BY julianday(finished_at) DESC, id DESC) AS newest \
                   FROM builds WHERE state = 'finished' AND outcome = 'success' \
                     AND started_at IS NOT NULL AND finished_at IS NOT NULL) \
                 WHERE newest <= ?1 ORDER BY julianday(finished_at), id",
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
