//! Build artifacts on the master: the agent's streamed, checksummed upload
//! (`PUT /api/v1/agent/builds/{id}/artifacts/{name}`, the worker's token,
//! only for a build running on that worker), storage under
//! `data_dir/artifacts/<build>/<name>` with a row per file in SQLite, the
//! list and the streamed download (admin API and build page), and the
//! retention timer that deletes what `artifact_retention` and
//! `artifact_keep_builds` no longer keep.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use jiff::Timestamp;
use nightshift_proto::api::{ApiError, ArtifactInfo, ArtifactList};
use nightshift_proto::wire::{ARTIFACT_SHA256_HEADER, BuildId, check_artifact_name};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::auth::{bearer, token_sha256};
use crate::latent::LatentTokens;
use crate::metrics::{METRICS, RefusalReason, Refused};
use crate::reconfig::LiveConfig;
use crate::store::{Store, artifact_row, list_rows};

mod download;
mod retention;
mod upload;

pub use download::*;
pub use retention::*;
pub use upload::*;

/// What the artifact endpoints read (taken from the master's shared state,
/// which this module sits below): the stored files, the config in force and
/// the latent instances' tokens.
#[derive(Clone)]
pub struct ArtifactAccess {
    pub artifacts: Arc<Artifacts>,
    pub config: LiveConfig,
    pub latent_tokens: LatentTokens,
}

/// Rows deleted per expiry pass (the timer comes straight back for more).
const EXPIRE_BATCH: u32 = 1000;

/// Where artifacts live and who wakes the retention timer.
pub struct Artifacts {
    /// `data_dir/artifacts`.
    root: PathBuf,
    store: Store,
    /// Signalled when an artifact is stored (an idle timer starts counting).
    stored: Notify,
}

impl Artifacts {
    pub fn new(data_dir: &Path, store: Store) -> anyhow::Result<Arc<Artifacts>> {
        let root = data_dir.join("artifacts");
        fs_err::create_dir_all(root.join(INCOMING))?;
        // Half-received uploads of a previous run are of no use.
        for entry in fs_err::read_dir(root.join(INCOMING))?.flatten() {
            let _ = fs_err::remove_file(entry.path());
        }
        Ok(Arc::new(Artifacts {
            root,
            store,
            stored: Notify::new(),
        }))
    }

    /// The stored file of artifact `name` of build `id` (`name` checked).
    fn path(&self, id: BuildId, name: &str) -> PathBuf {
        self.root.join(id.to_string()).join(name)
    }
}

/// Directory of uploads in progress, inside the artifacts root (a build
/// directory is named by its number, so this never collides).
const INCOMING: &str = ".incoming";

/// Why an upload was refused: status and message.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

fn rejected(status: StatusCode, message: String) -> Refusal {
    METRICS.artifact_upload_rejected();
    Refusal(status, message)
}

/// Whether workers `workers` may upload for build `id`: it runs and was
/// handed to one of them. Answers the builder and the bytes the build's
/// other artifacts (not `name`) already take.
fn check_owner(
    conn: &Connection,
    id: BuildId,
    name: &str,
    workers: &[String],
) -> rusqlite::Result<Result<(String, u64), RefusalReason>> {
    let row: Option<(String, Option<String>, String)> = conn
        .prepare_cached("SELECT state, handed_to, builder FROM builds WHERE id = ?1")?
        .query_row(params![id as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let builder = match row {
        None => return Ok(Err(RefusalReason::UnknownOrFinished)),
        Some((state, _, _)) if state == "finished" => {
            return Ok(Err(RefusalReason::UnknownOrFinished));
        }
        Some((state, handed_to, builder)) => {
            let running_here =
                state == "running" && handed_to.is_some_and(|w| workers.contains(&w));
            if !running_here {
                return Ok(Err(RefusalReason::NotHandedToIt));
            }
            builder
        }
    };
    let others: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE build_id = ?1 AND name != ?2",
        )?
        .query_row(params![id as i64, name], |r| r.get(0))?;
    Ok(Ok((builder, others.max(0) as u64)))
}

/// A size in bytes as people read it (`1.5 MiB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The build page's list of artifacts (nothing when it has none): each a
/// download link, its size and SHA-256.
pub fn render_list(html: &mut String, build: &nightshift_proto::api::BuildInfo) {
    use nightshift_proto::html::escape as esc;
    use std::fmt::Write;
    if build.artifacts.is_empty() {
        return;
    }
    html.push_str(
        "<section class=\"card\" id=\"artifacts\"><h2>Artifacts</h2><table><thead><tr>\
         <th>Name</th><th>Size</th><th>SHA-256</th></tr></thead><tbody>",
    );
    for artifact in &build.artifacts {
        let _ = write!(
            html,
            "<tr><td class=\"name\"><a href=\"/builds/{id}/artifacts/{href}\" download>{name}</a></td>\
             <td class=\"num\">{size}</td><td><code>{sha}</code></td></tr>",
            id = build.id,
            href = esc(&nightshift_proto::wire::encode_path(&artifact.name)),
            name = esc(&artifact.name),
            size = esc(&human_size(artifact.size)),
            sha = esc(&artifact.sha256),
        );
    }
    html.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_proto::api::{BuildInfo, BuildState};

    fn connection() -> Connection {
        let conn = Connection::open_in_memory().expect("sqlite");
        conn.execute_batch(
            "CREATE TABLE builds (id INTEGER PRIMARY KEY, builder TEXT NOT NULL, state TEXT NOT NULL, handed_to TEXT);
             CREATE TABLE artifacts (build_id INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
               sha256 TEXT NOT NULL, stored_at INTEGER NOT NULL, PRIMARY KEY (build_id, name));",
        )
        .expect("schema");
        conn
    }

    fn add(conn: &Connection, id: i64, name: &str, size: i64, at: i64) {
        conn.execute(
            "INSERT INTO artifacts VALUES (?1, ?2, ?3, 'x', ?4)",
            params![id, name, size, at],
        )
        .expect("insert");
    }

    #[test]
    fn only_the_worker_running_the_build_may_upload() {
        let conn = connection();
        conn.execute_batch(
            "INSERT INTO builds VALUES (1, 'b', 'running', 'w1');
             INSERT INTO builds VALUES (2, 'b', 'finished', 'w1');
             INSERT INTO builds VALUES (3, 'b', 'queued', 'w1');",
        )
        .expect("builds");
        add(&conn, 1, "dist/a", 10, 0);
        let mine = |id, name: &str, who: &str| {
            check_owner(&conn, id, name, &[who.to_owned()]).expect("query")
        };
        assert_eq!(mine(1, "dist/b", "w1"), Ok(("b".to_owned(), 10)));
        // Replacing its own file does not count the old one.
        assert_eq!(mine(1, "dist/a", "w1"), Ok(("b".to_owned(), 0)));
        assert_eq!(mine(1, "dist/b", "w2"), Err(RefusalReason::NotHandedToIt));
        assert_eq!(mine(2, "x", "w1"), Err(RefusalReason::UnknownOrFinished));
        // Taken back into the queue: no longer the worker's.
        assert_eq!(mine(3, "x", "w1"), Err(RefusalReason::NotHandedToIt));
        assert_eq!(mine(9, "x", "w1"), Err(RefusalReason::UnknownOrFinished));
    }

    #[test]
    fn expiry_takes_the_old_and_keep_builds_the_newest_per_builder() {
        let conn = connection();
        conn.execute_batch(
            "INSERT INTO builds VALUES (1, 'b', 'finished', 'w');
             INSERT INTO builds VALUES (2, 'b', 'finished', 'w');
             INSERT INTO builds VALUES (3, 'b', 'running', 'w');
             INSERT INTO builds VALUES (4, 'other', 'finished', 'w');",
        )
        .expect("builds");
        add(&conn, 1, "a", 1, 100);
        add(&conn, 1, "b", 1, 100);
        add(&conn, 2, "a", 1, 200);
        add(&conn, 3, "a", 1, 300);
        add(&conn, 4, "a", 1, 50);
        let mut pushed = push_out(&conn, "b", 2).expect("push out");
        pushed.sort();
        assert_eq!(pushed, [(1, "a".to_owned()), (1, "b".to_owned())]);
        assert_eq!(
            list_rows(&conn, 4).expect("list").len(),
            1,
            "other builder kept"
        );
        let expired = expire(&conn, 200).expect("expire");
        assert_eq!(expired, [(4, "a".to_owned()), (2, "a".to_owned())]);
        assert_eq!(list_rows(&conn, 3).expect("list").len(), 1);
    }

    #[tokio::test]
    async fn the_sweep_deletes_expired_files_and_says_when_the_next_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("master.db")).expect("store");
        let artifacts = Artifacts::new(dir.path(), store.clone()).expect("artifacts");
        let t0 = Timestamp::from_second(1_800_000_000).expect("instant");
        let day = Duration::from_secs(86400);
        for (id, name, age_days) in [(1, "dist/a.tar.gz", 3), (1, "b", 3), (2, "c", 1)] {
            let path = artifacts.path(id, name);
            fs_err::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs_err::write(&path, name).expect("write");
            let at = t0.as_second() - age_days * 86400;
            store
                .call(move |conn| {
                    conn.execute(
                        "INSERT INTO artifacts VALUES (?1, ?2, 1, 'x', ?3)",
                        params![id as i64, name, at],
                    )
                })
                .await
                .expect("insert");
        }
        // Kept 7 days: nothing expires yet; the oldest goes in 4 days.
        let due = sweep(&artifacts, 7 * day, t0).await.expect("sweep");
        assert_eq!(due, Some(t0 + jiff::SignedDuration::from_hours(4 * 24)));
        assert!(artifacts.path(1, "dist/a.tar.gz").exists());
        // Kept 2 days: build 1's files go, directories with them; build 2's stay.
        let due = sweep(&artifacts, 2 * day, t0).await.expect("sweep");
        assert_eq!(due, Some(t0 + jiff::SignedDuration::from_hours(24)));
        assert!(
            !artifacts.root.join("1").exists(),
            "build 1's directory is gone"
        );
        assert!(artifacts.path(2, "c").exists());
        let left = store.call(|conn| list_rows(conn, 1)).await.expect("list");
        assert!(left.is_empty());
        // Past the last one: nothing left, nothing due.
        let due = sweep(&artifacts, 2 * day, t0 + 2 * day)
            .await
            .expect("sweep");
        assert_eq!(due, None);
        assert!(!artifacts.path(2, "c").exists());
    }

    #[test]
    fn the_build_page_links_each_artifact_escaped() {
        let build = BuildInfo {
            id: 7,
            builder: "b".into(),
            properties: Default::default(),
            state: BuildState::Finished,
            worker: None,
            outcome: None,
            retries: 0,
            retry_reason: None,
            waiting_for: None,
            reason: None,
            submitted_at: Timestamp::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
            estimate_secs: None,
            repository: None,
            branch: None,
            revision: None,
            trigger: None,
            collapsed_into: None,
            artifacts: vec![ArtifactInfo {
                name: "dist/<x> y.tar.gz".into(),
                size: 1536,
                sha256: "ab".repeat(32),
                stored_at: Timestamp::UNIX_EPOCH,
            }],
        };
        let mut html = String::new();
        render_list(&mut html, &build);
        assert!(
            html.contains("href=\"/builds/7/artifacts/dist/%3Cx%3E%20y.tar.gz\""),
            "{html}"
        );
        assert!(html.contains(">dist/&lt;x&gt; y.tar.gz</a>"), "{html}");
        assert!(html.contains("1.5 KiB"), "{html}");
        let mut none = String::new();
        render_list(
            &mut none,
            &BuildInfo {
                artifacts: Vec::new(),
                ..build
            },
        );
        assert!(none.is_empty());
    }
}
