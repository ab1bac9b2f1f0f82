//! Reading builds back: unfinished builds, lists, counts, one build, queue depth.

use super::*;
use nightshift_proto::api::ArtifactInfo;

impl Store {
    /// Queued and running builds per builder.
    pub async fn depth_by_builder(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT builder, state, COUNT(*) FROM builds WHERE state != 'finished' \
                 GROUP BY builder, state",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for row in rows {
                let (builder, state, count) = row?;
                let entry = out.entry(builder).or_default();
                let count = u64::try_from(count).unwrap_or(0);
                match state.as_str() {
                    "queued" => entry.0 = count,
                    _ => entry.1 = count,
                }
            }
            Ok(out)
        })
        .await
    }
}

impl Store {
    /// Every build that is not finished, oldest first.
    pub async fn unfinished(&self) -> anyhow::Result<Vec<UnfinishedBuild>> {
        self.call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, builder, properties, state, worker, retries, repository, branch, revision, \
                 handed_to, started_at, cool_off_worker, cool_off_until FROM builds \
                 WHERE state != 'finished' ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                let props: String = r.get(2)?;
                let state: String = r.get(3)?;
                Ok(UnfinishedBuild {
                    id: r.get::<_, i64>(0)? as BuildId,
                    builder: r.get(1)?,
                    properties: serde_json::from_str(&props).unwrap_or_default(),
                    state: state.parse().unwrap_or(BuildState::Queued),
                    worker: r.get(4)?,
                    retries: r.get(5)?,
                    source: source_of(r.get(6)?, r.get(7)?, r.get(8)?),
                    handed_to: r.get(9)?,
                    started_at: parse_ts(r.get(10)?),
                    cool_off: match (r.get::<_, Option<String>>(11)?, r.get::<_, Option<String>>(12)?) {
                        (Some(worker), Some(until)) => until.parse().ok().map(|until| (worker, until)),
                        _ => None,
                    },
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The newest `limit` builds, newest first.
    pub async fn list_builds(&self, limit: u32) -> anyhow::Result<Vec<BuildInfo>> {
        self.call(move |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("{BUILD_COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
            let rows = stmt.query_map(params![limit], build_row)?;
            rows.collect()
        })
        .await
    }

    /// How many builds are queued and how many running, in all.
    pub async fn unfinished_counts(&self) -> anyhow::Result<(u64, u64)> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT state, COUNT(*) FROM builds WHERE state != 'finished' GROUP BY state",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            let (mut queued, mut running) = (0, 0);
            for row in rows {
                let (state, count) = row?;
                let count = u64::try_from(count).unwrap_or(0);
                match state.as_str() {
                    "queued" => queued = count,
                    "running" => running = count,
                    _ => {}
                }
            }
            Ok((queued, running))
        })
        .await
    }

    /// One build with its step results.
    pub async fn get_build(&self, id: BuildId) -> anyhow::Result<Option<BuildInfo>> {
        self.call(move |conn| {
            let build = conn
                .prepare_cached(&format!("{BUILD_COLUMNS} WHERE id = ?1"))?
                .query_row(params![id as i64], build_row)
                .optional()?;
            let Some(mut build) = build else {
                return Ok(None);
            };
            let mut stmt = conn.prepare_cached(
                "SELECT result FROM step_results WHERE build_id = ?1 ORDER BY step",
            )?;
            let steps = stmt.query_map(params![id as i64], |r| r.get::<_, String>(0))?;
            for step in steps {
                if let Ok(step) = serde_json::from_str::<StepResult>(&step?) {
                    build.steps.push(step);
                }
            }
            build.artifacts = list_rows(conn, id)?;
            Ok(Some(build))
        })
        .await
    }
}

const BUILD_COLUMNS: &str = "SELECT id, builder, properties, state, worker, retries, retry_reason, \
     outcome, reason, waiting_for, submitted_at, started_at, finished_at, repository, branch, \
     revision, trigger, collapsed_into FROM builds";

pub(super) fn parse_ts(text: Option<String>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

fn build_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildInfo> {
    let props: String = r.get(2)?;
    let state: String = r.get(3)?;
    let outcome: Option<String> = r.get(7)?;
    Ok(BuildInfo {
        id: r.get::<_, i64>(0)? as BuildId,
        builder: r.get(1)?,
        properties: serde_json::from_str(&props).unwrap_or_default(),
        state: state.parse().unwrap_or(BuildState::Queued),
        worker: r.get(4)?,
        retries: r.get(5)?,
        retry_reason: r.get(6)?,
        outcome: outcome
            .and_then(|o| serde_json::from_value::<Outcome>(serde_json::Value::String(o)).ok()),
        reason: r.get(8)?,
        waiting_for: r.get(9)?,
        submitted_at: parse_ts(r.get(10)?).unwrap_or(Timestamp::UNIX_EPOCH),
        started_at: parse_ts(r.get(11)?),
        finished_at: parse_ts(r.get(12)?),
        steps: Vec::new(),
        estimate_secs: None,
        repository: r.get(13)?,
        branch: r.get(14)?,
        revision: r.get(15)?,
        trigger: r.get(16)?,
        collapsed_into: r.get::<_, Option<i64>>(17)?.map(|id| id as BuildId),
        artifacts: Vec::new(),
    })
}

/// The artifacts of build `id`, by name (for `get_build` and the artifacts API).
pub fn list_rows(conn: &Connection, id: BuildId) -> rusqlite::Result<Vec<ArtifactInfo>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, size, sha256, stored_at FROM artifacts WHERE build_id = ?1 ORDER BY name",
    )?;
    let rows = stmt.query_map(params![id as i64], artifact_row)?;
    rows.collect()
}

/// One `artifacts` row as the API shows it.
pub fn artifact_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactInfo> {
    Ok(ArtifactInfo {
        name: r.get(0)?,
        size: r.get::<_, i64>(1)?.max(0) as u64,
        sha256: r.get(2)?,
        stored_at: Timestamp::from_second(r.get(3)?).unwrap_or(Timestamp::UNIX_EPOCH),
    })
}
