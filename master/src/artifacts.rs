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

use crate::api::{AppState, bearer, token_sha256};
use crate::metrics::{METRICS, RefusalReason, Refused};
use crate::reconfig::LiveConfig;
use crate::store::Store;

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

/// The artifacts of build `id`, by name (used by the store's `get_build`).
pub fn list_rows(conn: &Connection, id: BuildId) -> rusqlite::Result<Vec<ArtifactInfo>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, size, sha256, stored_at FROM artifacts WHERE build_id = ?1 ORDER BY name",
    )?;
    let rows = stmt.query_map(params![id as i64], artifact_row)?;
    rows.collect()
}

fn artifact_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactInfo> {
    Ok(ArtifactInfo {
        name: r.get(0)?,
        size: r.get::<_, i64>(1)?.max(0) as u64,
        sha256: r.get(2)?,
        stored_at: Timestamp::from_second(r.get(3)?).unwrap_or(Timestamp::UNIX_EPOCH),
    })
}

/// The workers presenting `token` (configured ones, or a latent instance).
fn workers_of(state: &AppState, token: &str) -> Vec<String> {
    let hash = token_sha256(token);
    let config = state.config.get();
    let mut workers: Vec<String> = config
        .workers_with_token(&hash)
        .map(|w| w.name.clone())
        .collect();
    workers.extend(state.latent_tokens.worker_with_hash(&hash));
    workers
}

/// `PUT /api/v1/agent/builds/{id}/artifacts/{*name}`: the worker's upload.
pub async fn upload(
    State(state): State<AppState>,
    UrlPath((id, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match receive(&state, &id, &name, &headers, body).await {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn receive(
    state: &AppState,
    id: &str,
    name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<ArtifactInfo, Refusal> {
    let Some(token) = bearer(headers) else {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "no token (send the worker's token as Authorization: Bearer <token>)".into(),
        ));
    };
    let workers = workers_of(state, &token);
    if workers.is_empty() {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "unknown worker token".into(),
        ));
    }
    let id: BuildId = id
        .parse()
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, format!("`{id}` is not a build id")))?;
    check_artifact_name(name).map_err(|why| rejected(StatusCode::BAD_REQUEST, why))?;
    let sha256 = headers
        .get(ARTIFACT_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            rejected(
                StatusCode::BAD_REQUEST,
                format!("artifact `{name}`: send the content's SHA-256 (64 hex digits) as {ARTIFACT_SHA256_HEADER}"),
            )
        })?;
    let length: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            rejected(
                StatusCode::LENGTH_REQUIRED,
                format!("artifact `{name}`: send its size as Content-Length"),
            )
        })?;
    let store = &state.artifacts.store;
    let (owner_name, owner_workers) = (name.to_owned(), workers.clone());
    let checked = store
        .call(move |conn| check_owner(conn, id, &owner_name, &owner_workers))
        .await
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let others = match checked {
        Ok((_, others)) => others,
        Err(why) => return Err(refused(id, name, &workers, why)),
    };
    let limits = state.config.get().artifacts;
    if length > limits.max_file_bytes {
        return Err(rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "artifact `{name}` is {length} bytes, over the master's max_artifact_bytes ({})",
                limits.max_file_bytes
            ),
        ));
    }
    if others.saturating_add(length) > limits.max_build_bytes {
        return Err(rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "artifact `{name}` ({length} bytes) would take build {id}'s artifacts to {} bytes, \
                 over the master's max_build_artifact_bytes ({})",
                others + length,
                limits.max_build_bytes
            ),
        ));
    }

    let artifacts = &state.artifacts;
    let incoming = artifacts
        .root
        .join(INCOMING)
        .join(format!("{id}-{:016x}", rand::random::<u64>()));
    let received = write_body(&incoming, body, length, name).await;
    let written_sha = match received {
        Ok(sha) => sha,
        Err(refusal) => {
            let _ = tokio::fs::remove_file(&incoming).await;
            return Err(refusal);
        }
    };
    if written_sha != sha256 {
        let _ = tokio::fs::remove_file(&incoming).await;
        return Err(rejected(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "artifact `{name}`: checksum mismatch: received content has sha256 {written_sha}, \
                 the upload announced {sha256}"
            ),
        ));
    }
    let target = artifacts.path(id, name);
    if let Err(e) = place(&incoming, &target).await {
        let _ = tokio::fs::remove_file(&incoming).await;
        return Err(Refusal(
            StatusCode::CONFLICT,
            format!("artifact `{name}`: cannot store it: {e}"),
        ));
    }

    // Committed only if the build is still this worker's (a cancel or a
    // re-queue may have come meanwhile).
    let now = Timestamp::now();
    let keep = limits.keep_builds;
    let (row_name, row_sha, row_workers) = (name.to_owned(), sha256.clone(), workers.clone());
    let recorded = store
        .call(move |conn| {
            let builder = match check_owner(conn, id, &row_name, &row_workers)? {
                Ok((builder, _)) => builder,
                Err(why) => return Ok(Err(why)),
            };
            conn.prepare_cached(
                "INSERT INTO artifacts (build_id, name, size, sha256, stored_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT(build_id, name) DO UPDATE SET size = excluded.size, \
                 sha256 = excluded.sha256, stored_at = excluded.stored_at",
            )?
            .execute(params![id as i64, row_name, length as i64, row_sha, now.as_second()])?;
            let pushed_out = if keep > 0 {
                push_out(conn, &builder, keep)?
            } else {
                Vec::new()
            };
            Ok(Ok(pushed_out))
        })
        .await;
    match recorded {
        Ok(Ok(pushed_out)) => {
            METRICS.artifact_stored(length);
            artifacts.stored.notify_one();
            remove_files(artifacts, pushed_out).await;
            tracing::info!(
                "build {id}: artifact `{name}` stored ({length} bytes, sha256 {sha256})"
            );
            Ok(ArtifactInfo {
                name: name.to_owned(),
                size: length,
                sha256,
                stored_at: now,
            })
        }
        Ok(Err(why)) => {
            let _ = tokio::fs::remove_file(&target).await;
            Err(refused(id, name, &workers, why))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&target).await;
            Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
        }
    }
}

/// An upload for a build that is not the worker's: logged and counted.
fn refused(id: BuildId, name: &str, workers: &[String], why: RefusalReason) -> Refusal {
    METRICS.refused(Refused::Artifact, why);
    let who = workers.join(", ");
    let text = match why {
        RefusalReason::UnknownOrFinished => {
            format!("build {id} is unknown or finished: it takes no artifacts")
        }
        _ => format!(
            "build {id} is not running on worker {who}: its artifacts are not yours to upload"
        ),
    };
    tracing::warn!("artifact `{name}` from {who} refused: {text}");
    Refusal(StatusCode::FORBIDDEN, text)
}

/// Streams `body` into `path`, at most `length` bytes; answers the SHA-256.
async fn write_body(path: &Path, body: Body, length: u64, name: &str) -> Result<String, Refusal> {
    let io = |e: std::io::Error| {
        Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("artifact `{name}`: cannot write {}: {e}", path.display()),
        )
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            rejected(
                StatusCode::BAD_REQUEST,
                format!("artifact `{name}`: the upload broke off after {received} bytes: {e}"),
            )
        })?;
        received += chunk.len() as u64;
        if received > length {
            return Err(rejected(
                StatusCode::BAD_REQUEST,
                format!("artifact `{name}`: more bytes than its Content-Length ({length})"),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    if received != length {
        return Err(rejected(
            StatusCode::BAD_REQUEST,
            format!("artifact `{name}`: received {received} of its {length} bytes"),
        ));
    }
    file.sync_all().await.map_err(io)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Moves a complete upload to its place (replacing an earlier upload of the
/// same name by the same build).
async fn place(incoming: &Path, target: &Path) -> std::io::Result<()> {
    if let Some(dir) = target.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::rename(incoming, target).await
}

/// Deletes the rows of builds of `builder` past its newest `keep` builds
/// with artifacts; answers what to delete from disk.
fn push_out(
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
async fn remove_files(artifacts: &Artifacts, rows: Vec<(BuildId, String)>) {
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

/// `GET /api/v1/builds/{id}/artifacts`.
pub async fn list(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(id) = id.parse::<BuildId>() else {
        return Refusal(StatusCode::BAD_REQUEST, format!("`{id}` is not a build id"))
            .into_response();
    };
    let listed = state
        .artifacts
        .store
        .call(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM builds WHERE id = ?1")?
                .query_row(params![id as i64], |_| Ok(()))
                .optional()?
                .is_some();
            if !exists {
                return Ok(None);
            }
            list_rows(conn, id).map(Some)
        })
        .await;
    match listed {
        Ok(Some(artifacts)) => Json(ArtifactList {
            build_id: id,
            artifacts,
        })
        .into_response(),
        Ok(None) => Refusal(StatusCode::NOT_FOUND, format!("no build {id}")).into_response(),
        Err(e) => Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}

/// `GET /api/v1/builds/{id}/artifacts/{*name}` (admin token) and
/// `GET /builds/{id}/artifacts/{*name}` (the build page's link): the file,
/// streamed, with its length and SHA-256.
pub async fn download(
    State(state): State<AppState>,
    UrlPath((id, name)): UrlPath<(String, String)>,
) -> Response {
    match open(&state, &id, &name).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

async fn open(state: &AppState, id: &str, name: &str) -> Result<Response, Refusal> {
    let id: BuildId = id
        .parse()
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, format!("`{id}` is not a build id")))?;
    check_artifact_name(name).map_err(|why| Refusal(StatusCode::BAD_REQUEST, why))?;
    let key = name.to_owned();
    let info = state
        .artifacts
        .store
        .call(move |conn| {
            conn.prepare_cached(
                "SELECT name, size, sha256, stored_at FROM artifacts WHERE build_id = ?1 AND name = ?2",
            )?
            .query_row(params![id as i64, key], artifact_row)
            .optional()
        })
        .await
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        .ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                format!("build {id} has no artifact `{name}`"),
            )
        })?;
    let path = state.artifacts.path(id, name);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("artifact `{name}` of build {id}: its file is unreadable: {e}"),
        )
    })?;
    let base = name.rsplit('/').next().unwrap_or(name);
    let ascii: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        nightshift_proto::wire::encode_path(base)
    );
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&info.sha256) {
        headers.insert(ARTIFACT_SHA256_HEADER, value.clone());
    }
    if let Ok(value) = HeaderValue::from_str(&format!("\"{}\"", info.sha256)) {
        headers.insert(header::ETAG, value);
    }
    Ok(response)
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
fn expire(conn: &Connection, before: i64) -> rusqlite::Result<Vec<(BuildId, String)>> {
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
    use crate::dashboard::esc;
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
