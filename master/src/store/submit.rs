//! Inserting build requests: submits, timed and change-triggered builds, collapsing.

use super::*;

impl Store {
    /// Inserts a queued build without a source; returns its id once committed.
    #[cfg(test)]
    pub async fn insert_build(
        &self,
        builder: String,
        properties: BTreeMap<String, String>,
        now: Timestamp,
    ) -> anyhow::Result<BuildId> {
        let props = serde_json::to_string(&properties)?;
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO builds (builder, properties, state, submitted_at) VALUES (?1, ?2, 'queued', ?3)",
            )?
            .execute(params![builder, props, now.to_string()])?;
            Ok(conn.last_insert_rowid() as BuildId)
        })
        .await
    }

    /// Inserts build requests in one commit; returns their ids in order.
    /// Each of `heads` (repository, branch, revision) is recorded as that
    /// branch's last seen head in the same commit (a pushed revision is not
    /// polled again).
    /// `committed` runs with the new ids on the store thread as soon as they
    /// are committed (before this answers).
    pub async fn insert_builds_then(
        &self,
        builds: Vec<NewBuild>,
        heads: Vec<(String, String, String)>,
        committed: impl FnOnce(&[BuildId]) + Send + 'static,
    ) -> anyhow::Result<Vec<BuildId>> {
        let now = Timestamp::now();
        self.call_then(
            move |conn| {
                for (repository, branch, revision) in &heads {
                    record_head(conn, repository, branch, revision, now)?;
                }
                builds
                    .iter()
                    .map(|build| insert_new_build(conn, build, now))
                    .collect()
            },
            move |ids: &Vec<BuildId>| committed(ids),
        )
        .await
    }

    /// Records `revision` as the head of (`repository`, `branch`) and, when
    /// it moved since the last recorded head, queues `builds` in the same
    /// commit — so a restart neither loses nor repeats a new revision.
    pub async fn advance_head(
        &self,
        repository: String,
        branch: String,
        revision: String,
        builds: Vec<NewBuild>,
    ) -> anyhow::Result<HeadAdvance> {
        let now = Timestamp::now();
        self.call(move |conn| {
            let last: Option<String> = conn
                .prepare_cached(
                    "SELECT revision FROM source_heads WHERE repository = ?1 AND branch = ?2",
                )?
                .query_row(params![repository, branch], |r| r.get(0))
                .optional()?;
            if last.as_deref() == Some(revision.as_str()) {
                return Ok(HeadAdvance::Unchanged);
            }
            record_head(conn, &repository, &branch, &revision, now)?;
            if last.is_none() {
                return Ok(HeadAdvance::Baseline);
            }
            let ids = builds
                .iter()
                .map(|build| insert_new_build(conn, build, now))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(HeadAdvance::Queued(ids))
        })
        .await
    }

    /// The revision the last timed build of `builder` was queued for.
    pub async fn last_timed_revision(&self, builder: String) -> anyhow::Result<Option<String>> {
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("SELECT revision FROM timed_builds WHERE builder = ?1")?
                .query_row(params![builder], |r| r.get::<_, Option<String>>(0))
                .optional()?
                .flatten())
        })
        .await
    }

    /// Queues a timed build and records its revision, in one commit.
    pub async fn insert_timed_build(
        &self,
        build: NewBuild,
        fired_at: Timestamp,
    ) -> anyhow::Result<BuildId> {
        let now = Timestamp::now();
        self.call(move |conn| {
            let id = insert_new_build(conn, &build, now)?;
            conn.prepare_cached(
                "INSERT INTO timed_builds (builder, revision, fired_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(builder) DO UPDATE SET revision = excluded.revision, fired_at = excluded.fired_at",
            )?
            .execute(params![
                build.builder,
                build.source.as_ref().map(|s| s.revision.clone()),
                fired_at.to_string()
            ])?;
            Ok(id)
        })
        .await
    }

    /// Ends waiting builds `ids` unrun: collapsed into the newer `into`.
    pub async fn collapse(
        &self,
        ids: Vec<BuildId>,
        into: BuildId,
        now: Timestamp,
    ) -> anyhow::Result<()> {
        let live = self.live.clone();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE builds SET state = 'finished', outcome = 'cancelled', reason = ?2, \
                 collapsed_into = ?3, finished_at = ?4, waiting_for = NULL \
                 WHERE id = ?1 AND state = 'queued'",
            )?;
            for id in ids {
                stmt.execute(params![
                    id as i64,
                    format!("collapsed into build {into}"),
                    into as i64,
                    now.to_string()
                ])?;
                live.finish(id);
            }
            Ok(())
        })
        .await
    }
}

/// A stored source (mode and depth come from the builder at hand-out).
pub(super) fn source_of(
    repository: Option<String>,
    branch: Option<String>,
    revision: Option<String>,
) -> Option<BuildSource> {
    Some(BuildSource {
        repository: repository?,
        branch: branch.unwrap_or_default(),
        revision: revision?,
        mode: CheckoutMode::default(),
        shallow: false,
    })
}

fn record_head(
    conn: &Connection,
    repository: &str,
    branch: &str,
    revision: &str,
    now: Timestamp,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO source_heads (repository, branch, revision, seen_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT(repository, branch) DO UPDATE SET revision = excluded.revision, seen_at = excluded.seen_at",
    )?
    .execute(params![repository, branch, revision, now.to_string()])?;
    Ok(())
}

fn insert_new_build(
    conn: &Connection,
    build: &NewBuild,
    now: Timestamp,
) -> rusqlite::Result<BuildId> {
    let props = serde_json::to_string(&build.properties).unwrap_or_else(|_| "{}".into());
    let source = build.source.as_ref();
    conn.prepare_cached(
        "INSERT INTO builds (builder, properties, state, submitted_at, repository, branch, revision, trigger) \
         VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        build.builder,
        props,
        now.to_string(),
        source.map(|s| s.repository.as_str()),
        source.map(|s| s.branch.as_str()),
        source.map(|s| s.revision.as_str()),
        build.trigger,
    ])?;
    Ok(conn.last_insert_rowid() as BuildId)
}
