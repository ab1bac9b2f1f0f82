//! Artifact retention: `artifact_keep_builds` pushing old builds' files out, and the timer that expires what `artifact_retention` no longer keeps.

use super::*;

/// Deletes the rows of builds of `builder` past its newest `keep` builds
/// with artifacts; answers what to delete from disk.
pub(super) fn push_out(
    conn: &Connection,
    builder: &str,
    keep: u32,
) -> rusqlite::Result<Vec<(BuildId, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.build_id, a.name FROM artifacts a WHERE a.build_id IN ( \
           SELECT DISTINCT x.build_id FROM artifacts x JOIN builds b ON b.id = x.build_id \
           WHERE b.builder = ?1 ORDER BY x.build_id DESC LIMIT -1 OFFSET ?2)",
    )?;
    let rows: Vec<(BuildId, String)> = stmt
        .query_map(params![builder, keep], |r| {
            Ok((r.get::<_, i64>(0)? as BuildId, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut delete =
        conn.prepare_cached("DELETE FROM artifacts WHERE build_id = ?1 AND name = ?2")?;
    for (id, name) in &rows {
        delete.execute(params![*id as i64, name])?;
    }
    Ok(rows)
}

/// Deletes the files of removed rows, and build directories left empty.
pub(super) async fn remove_files(artifacts: &Artifacts, rows: Vec<(BuildId, String)>) {
    if rows.is_empty() {
        return;
    }
    let root = artifacts.root.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for (id, name) in rows {
            let build_dir = root.join(id.to_string());
            let path = build_dir.join(&name);
            if let Err(e) = fs_err::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("artifacts: {e}");
            }
            // Empty directories up to and including the build's own.
            let mut dir = path.parent().map(Path::to_owned);
            while let Some(d) = dir {
                if !d.starts_with(&build_dir) || fs_err::remove_dir(&d).is_err() {
                    break;
                }
                dir = d.parent().map(Path::to_owned);
            }
        }
    })
    .await;
}

/// The retention timer: sleeps until the oldest artifact expires (or, with
/// none or no `artifact_retention`, until one is stored or the config
/// changes), deletes what expired ([`sweep`]), and sleeps again. Never
/// woken by requests.
pub async fn retain(artifacts: Arc<Artifacts>, config: LiveConfig) {
    let mut changes = config.subscribe();
    loop {
        let retention = config.get().artifacts.retention;
        let now = Timestamp::now();
        let due = match retention {
            None => None,
            Some(retention) => match sweep(&artifacts, retention, now).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!("artifacts: retention: {e:#}");
                    return;
                }
            },
        };
        let sleep = due.map(|due| {
            let secs = due.as_second().saturating_sub(now.as_second()).max(1);
            Duration::from_secs(secs as u64)
        });
        tokio::select! {
            () = async {
                match sleep {
                    Some(sleep) => tokio::time::sleep(sleep).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = artifacts.stored.notified(), if due.is_none() => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Deletes every artifact stored `retention` or longer before `now` (rows,
/// files, emptied directories); answers when the next one expires.
pub async fn sweep(
    artifacts: &Artifacts,
    retention: Duration,
    now: Timestamp,
) -> anyhow::Result<Option<Timestamp>> {
    let keep = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    let before = now.as_second().saturating_sub(keep);
    loop {
        let expired = artifacts
            .store
            .call(move |conn| expire(conn, before))
            .await?;
        let full = expired.len() as u64 >= u64::from(EXPIRE_BATCH);
        if !expired.is_empty() {
            tracing::info!(
                "artifacts: {} expired (stored more than artifact_retention ago)",
                expired.len()
            );
            remove_files(artifacts, expired).await;
        }
        if !full {
            break;
        }
    }
    let oldest = artifacts
        .store
        .call(|conn| {
            conn.prepare_cached("SELECT MIN(stored_at) FROM artifacts")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))
        })
        .await?;
    Ok(oldest.and_then(|at| Timestamp::from_second(at.saturating_add(keep)).ok()))
}

/// Deletes up to [`EXPIRE_BATCH`] rows stored before `before` (unix seconds).
pub(super) fn expire(conn: &Connection, before: i64) -> rusqlite::Result<Vec<(BuildId, String)>> {
    let rows: Vec<(BuildId, String)> = conn
        .prepare_cached(
            "SELECT build_id, name FROM artifacts WHERE stored_at <= ?1 ORDER BY stored_at LIMIT ?2",
        )?
        .query_map(params![before, EXPIRE_BATCH], |r| {
            Ok((r.get::<_, i64>(0)? as BuildId, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut delete =
        conn.prepare_cached("DELETE FROM artifacts WHERE build_id = ?1 AND name = ?2")?;
    for (id, name) in &rows {
        delete.execute(params![*id as i64, name])?;
    }
    Ok(rows)
}
