//! The agent's streamed, checksummed artifact upload, accepted only for a build running on that worker.

use super::*;

/// The workers presenting `token` (configured ones, or a latent instance).
fn workers_of(state: &ArtifactAccess, token: &str) -> Vec<String> {
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
    State(state): State<ArtifactAccess>,
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
    state: &ArtifactAccess,
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
pub(super) fn refused(id: BuildId, name: &str, workers: &[String], why: RefusalReason) -> Refusal {
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
