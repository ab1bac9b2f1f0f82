//! Build logs: capped appends, reads and live watching.

use super::*;

impl Store {
    /// Appends a chunk of live output, up to the build's log cap; past the
    /// cap only the number of dropped bytes is recorded.
    pub fn append_log(&self, id: BuildId, step: u32, data: String) {
        let cap = self.log_cap.load(Ordering::Relaxed);
        let live = self.live.clone();
        self.spawn("append log", move |conn| {
            let Some((stored, dropped)) = log_room(conn, id)? else {
                return Ok(());
            };
            let room = cap.saturating_sub(stored);
            let kept = prefix_within(&data, room);
            if !kept.is_empty() {
                conn.prepare_cached("INSERT INTO logs (build_id, step, data) VALUES (?1, ?2, ?3)")?
                    .execute(params![id as i64, step, kept])?;
                live.publish(id, step, kept);
            }
            let lost = (data.len() - kept.len()) as u64;
            if lost > 0 {
                crate::metrics::METRICS.log_bytes_dropped(lost);
            }
            conn.prepare_cached(
                "UPDATE builds SET log_bytes = ?2, log_dropped = ?3 WHERE id = ?1",
            )?
            .execute(params![
                id as i64,
                (stored + kept.len() as u64) as i64,
                (dropped + lost) as i64
            ])?;
            Ok(())
        });
    }
}

impl Store {
    /// The whole log of a build so far (`None`: no such build).
    pub async fn get_log(&self, id: BuildId) -> anyhow::Result<Option<String>> {
        self.call(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM builds WHERE id = ?1")?
                .query_row(params![id as i64], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut stmt =
                conn.prepare_cached("SELECT data FROM logs WHERE build_id = ?1 ORDER BY seq")?;
            let chunks = stmt.query_map(params![id as i64], |r| r.get::<_, String>(0))?;
            let mut log = String::new();
            for chunk in chunks {
                log.push_str(&chunk?);
            }
            let (_, dropped) = log_room(conn, id)?.unwrap_or((0, 0));
            if dropped > 0 {
                if !log.is_empty() && !log.ends_with('\n') {
                    log.push('\n');
                }
                log.push_str(&format!(
                    "[nightshift: {dropped} bytes dropped: this build's log reached its cap (max_log_bytes)]\n"
                ));
            }
            Ok(Some(log))
        })
        .await
    }

    /// A build's log so far (its last `tail_bytes` at most, cut at a line
    /// start, and whether earlier output was left out), whether the build
    /// has finished, and a receiver of the output that follows, exactly:
    /// taken in one store job, so no chunk is missed or repeated. `None`: no
    /// such build.
    pub async fn watch_log(
        &self,
        id: BuildId,
        tail_bytes: usize,
    ) -> anyhow::Result<Option<LogWatch>> {
        let live = self.live.clone();
        self.call(move |conn| {
            let state: Option<String> = conn
                .prepare_cached("SELECT state FROM builds WHERE id = ?1")?
                .query_row(params![id as i64], |r| r.get(0))
                .optional()?;
            let Some(state) = state else {
                return Ok(None);
            };
            let mut stmt =
                conn.prepare_cached("SELECT data FROM logs WHERE build_id = ?1 ORDER BY seq DESC")?;
            let mut chunks = Vec::new();
            let mut size = 0usize;
            let mut cut = false;
            for chunk in stmt.query_map(params![id as i64], |r| r.get::<_, String>(0))? {
                let chunk = chunk?;
                if size + chunk.len() > tail_bytes {
                    let room = tail_bytes - size;
                    let mut start = chunk.len() - room;
                    while !chunk.is_char_boundary(start) {
                        start += 1;
                    }
                    let tail = &chunk[start..];
                    let tail = tail.find('\n').map_or("", |i| &tail[i + 1..]);
                    chunks.push(tail.to_owned());
                    cut = true;
                    break;
                }
                size += chunk.len();
                chunks.push(chunk);
            }
            chunks.reverse();
            let finished = state == "finished";
            let live = (!finished).then(|| live.subscribe(id));
            Ok(Some(LogWatch {
                log: chunks.concat(),
                cut,
                finished,
                live,
            }))
        })
        .await
    }
}

/// A build's stored and dropped log bytes (`None`: no such build).
pub(super) fn log_room(conn: &Connection, id: BuildId) -> rusqlite::Result<Option<(u64, u64)>> {
    conn.prepare_cached("SELECT log_bytes, log_dropped FROM builds WHERE id = ?1")?
        .query_row(params![id as i64], |r| {
            Ok((
                u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            ))
        })
        .optional()
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub(super) fn prefix_within(text: &str, max: u64) -> &str {
    let mut end = usize::try_from(max).unwrap_or(usize::MAX).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
