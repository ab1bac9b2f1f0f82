//! The store's SQLite schema: ordered migrations counted by `PRAGMA user_version`.

use super::*;

/// Ordered schema migrations; `PRAGMA user_version` counts the applied ones.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    builder TEXT NOT NULL,
    properties TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'finished')),
    worker TEXT,
    retries INTEGER NOT NULL DEFAULT 0,
    retry_reason TEXT,
    outcome TEXT,
    reason TEXT,
    waiting_for TEXT,
    submitted_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX builds_unfinished ON builds(state) WHERE state != 'finished';
CREATE TABLE step_results (
    build_id INTEGER NOT NULL REFERENCES builds(id),
    step INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (build_id, step)
);
CREATE TABLE logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id INTEGER NOT NULL,
    step INTEGER,
    data TEXT NOT NULL
);
CREATE INDEX logs_by_build ON logs(build_id, seq);
CREATE TABLE worker_presence (
    name TEXT PRIMARY KEY,
    presence TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE builds ADD COLUMN repository TEXT;
ALTER TABLE builds ADD COLUMN branch TEXT;
ALTER TABLE builds ADD COLUMN revision TEXT;
ALTER TABLE builds ADD COLUMN trigger TEXT;
ALTER TABLE builds ADD COLUMN collapsed_into INTEGER;
CREATE TABLE source_heads (
    repository TEXT NOT NULL,
    branch TEXT NOT NULL,
    revision TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (repository, branch)
);
CREATE TABLE timed_builds (
    builder TEXT PRIMARY KEY,
    revision TEXT,
    fired_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE builds ADD COLUMN handed_to TEXT;
UPDATE builds SET handed_to = worker WHERE worker IS NOT NULL;
ALTER TABLE builds ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN log_dropped INTEGER NOT NULL DEFAULT 0;
UPDATE builds SET log_bytes = COALESCE(
    (SELECT SUM(length(CAST(data AS BLOB))) FROM logs WHERE logs.build_id = builds.id), 0);
CREATE TABLE step_grants (
    build_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    worker TEXT NOT NULL,
    PRIMARY KEY (build_id, step)
);
"#,
    r#"
CREATE TABLE artifacts (
    build_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX artifacts_by_age ON artifacts(stored_at);
CREATE TABLE enrolled_workers (
    name TEXT PRIMARY KEY,
    worker_group TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    enrolled_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE builds ADD COLUMN cool_off_worker TEXT;
ALTER TABLE builds ADD COLUMN cool_off_until TEXT;
"#,
];

pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
