//! Workers' last presence, recent build durations, enrolments, and the farm's pause flag.

use super::*;

impl Store {
    /// Records `worker`'s presence for a later restart. Not a job of its
    /// own: the newest presence of each worker waits in the
    /// [`PresenceBuffer`], and the store thread writes them in chunks
    /// beside (never before) the jobs in its queue. So a farm-wide flip —
    /// 10,000 presence changes at 19:00 — costs at most one row per worker
    /// and never queues a submit or a hand-out's commit behind it.
    pub fn save_presence(&self, worker: String, presence: Presence) {
        if self.presence.put(worker, presence, Timestamp::now()) {
            // The store thread may be asleep on an empty queue: wake it.
            self.spawn("wake for presence", |_| Ok(()));
        }
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
        let buffer = Arc::clone(&self.presence);
        self.call(move |conn| {
            // What is still buffered is newer than the table.
            while buffer.write_chunk(conn, PRESENCE_CHUNK)? {}
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

/// The newest unsaved presence of each worker (at most one entry per
/// worker: the buffer is bounded by the farm's size), see
/// [`Store::save_presence`].
#[derive(Default)]
pub(super) struct PresenceBuffer {
    inner: std::sync::Mutex<PresenceBufferInner>,
}

#[derive(Default)]
struct PresenceBufferInner {
    pending: std::collections::HashMap<String, (Presence, Timestamp)>,
    /// The store thread knows there is work (a wake-up job is queued, or
    /// it is writing chunks): no other wake-up is needed.
    awake: bool,
}

/// Most presence rows written per transaction when no job waits.
pub(super) const PRESENCE_CHUNK: usize = 256;

/// Most presence rows written in a transaction that also commits jobs: a
/// submit or a hand-out waits for these rows' writes, not for a whole
/// chunk, and the buffer still drains while jobs keep coming.
pub(super) const PRESENCE_CHUNK_BESIDE_JOBS: usize = 16;

impl PresenceBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, PresenceBufferInner> {
        // Plain inserts and removes: a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps `presence` as `worker`'s newest; true when the store thread
    /// must be woken for it.
    pub(super) fn put(&self, worker: String, presence: Presence, at: Timestamp) -> bool {
        let mut inner = self.lock();
        inner.pending.insert(worker, (presence, at));
        !std::mem::replace(&mut inner.awake, true)
    }

    /// Whether rows wait to be written.
    pub(super) fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// Writes up to `limit` buffered rows with `conn` (inside the caller's
    /// transaction); true while more remain. Rows whose write fails are
    /// dropped with an error in the log (the presence is shown again as
    /// soon as the agent reconnects).
    pub(super) fn write_chunk(&self, conn: &Connection, limit: usize) -> rusqlite::Result<bool> {
        let (chunk, more) = {
            let mut inner = self.lock();
            let chunk: Vec<_> = inner.pending.extract_if(|_, _| true).take(limit).collect();
            let more = !inner.pending.is_empty();
            if !more {
                inner.awake = false;
            }
            (chunk, more)
        };
        if chunk.is_empty() {
            return Ok(more);
        }
        let mut stmt = conn.prepare_cached(
            "INSERT INTO worker_presence (name, presence, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT(name) DO UPDATE SET presence = excluded.presence, updated_at = excluded.updated_at",
        )?;
        for (worker, (presence, at)) in chunk {
            let json = serde_json::to_string(&presence).unwrap_or_default();
            if let Err(error) = stmt.execute(params![worker, json, at.to_string()]) {
                tracing::error!("store: save presence of {worker}: {error}");
            }
        }
        Ok(more)
    }
}
