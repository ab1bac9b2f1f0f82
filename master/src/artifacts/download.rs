//! Listing and streaming a build's artifacts (admin API and build page).

use super::*;

/// `GET /api/v1/builds/{id}/artifacts`.
pub async fn list(State(state): State<ArtifactAccess>, UrlPath(id): UrlPath<String>) -> Response {
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
    State(state): State<ArtifactAccess>,
    UrlPath((id, name)): UrlPath<(String, String)>,
) -> Response {
    match open(&state, &id, &name).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

pub(super) async fn open(
    state: &ArtifactAccess,
    id: &str,
    name: &str,
) -> Result<Response, Refusal> {
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
