//! The enrolment and revocation endpoints of worker groups:
//! `POST /api/v1/enroll` (a group's enrolment token; rate-limited per source
//! address and in all) and `POST /api/v1/workers/{name}/revoke` (admin).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nightshift_proto::api::{ApiError, EnrollRequest, EnrollResponse, RevokeResponse};

use crate::auth::{bearer, token_sha256};
use crate::scheduler::Event;
use crate::state::AppState;
use crate::worker_groups::{EnrolLimit, Member};

/// An error answer: status and [`ApiError`] JSON.
fn failure(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

/// `429 Too Many Requests` with a `Retry-After` of `wait` (whole seconds,
/// at least one).
fn too_many(limit: EnrolLimit, wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let whose = match limit {
        EnrolLimit::Source => "from this address",
        EnrolLimit::Global => "on this master",
    };
    let mut response = failure(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many enrolments {whose}; retry after {seconds} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// `POST /api/v1/enroll`, authorized by a group's enrolment token: records a
/// new member of that group under the name it asks for and answers its own
/// token, shown this once (only the hash is stored). The enrolment token
/// itself opens no agent session.
pub async fn enroll(
    State(state): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Response {
    // The accept loop puts the peer's address on every request.
    let source = peer.map_or(
        IpAddr::from([0, 0, 0, 0]),
        |axum::Extension(ConnectInfo(addr))| addr.ip(),
    );
    if let Err((limit, wait)) = state.enrol_limiter.check(source, Instant::now()) {
        crate::metrics::METRICS.enrolment_rate_limited(limit);
        tracing::warn!(
            "enrolment from {source} refused: over the {} rate limit",
            limit.label()
        );
        return too_many(limit, wait);
    }
    let Some(token) = bearer(&headers) else {
        return failure(
            StatusCode::UNAUTHORIZED,
            "no enrolment token (Authorization: Bearer <the worker group's enrolment token>)"
                .into(),
        );
    };
    let config = state.config.get();
    let Some(group) = config.group_with_enroll_token(&token_sha256(&token)) else {
        tracing::warn!("enrolment refused: not a worker group's enrolment token");
        return failure(
            StatusCode::UNAUTHORIZED,
            "not the enrolment token of any [[worker_group]]".into(),
        );
    };
    let Json(request) = match body {
        Ok(body) => body,
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let name = request.name;
    if !group.may_name(&name) {
        return failure(
            StatusCode::BAD_REQUEST,
            format!(
                "`{name}` is not a name for group `{0}`: its workers are named `{0}-<suffix>` \
                 (letters, digits, `-`, `_`, `.`; at most 64 characters)",
                group.name
            ),
        );
    }
    if config.worker(&name).is_some() || state.enrolled.member(&name).is_some() {
        return failure(
            StatusCode::CONFLICT,
            format!(
                "worker `{name}` exists already; to enrol a machine under that name again, \
                 revoke it first (`master revoke-worker {name}`)"
            ),
        );
    }
    if state.enrolled.count(&group.name) >= group.max_workers {
        return failure(
            StatusCode::CONFLICT,
            format!(
                "group `{}` is full (max_workers = {}); revoke a worker or raise max_workers",
                group.name, group.max_workers
            ),
        );
    }
    let worker_token = crate::locate::new_token();
    let member = Member {
        name: name.clone(),
        group: group.name.clone(),
        token_sha256: token_sha256(&worker_token),
    };
    match state
        .store
        .enroll(member.clone(), jiff::Timestamp::now())
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return failure(
                StatusCode::CONFLICT,
                format!("worker `{name}` exists already (enrolled at the same moment)"),
            );
        }
        Err(e) => {
            tracing::error!("enrolment of {name}: {e:#}");
            return failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        }
    }
    state.enrolled.insert(member.clone());
    let _ = state.events.send(Event::Enrolled { member });
    tracing::info!("worker {name} enrolled in group {}", group.name);
    (
        StatusCode::CREATED,
        Json(EnrollResponse {
            name,
            group: group.name.clone(),
            token: worker_token,
        }),
    )
        .into_response()
}

/// `POST /api/v1/workers/{name}/revoke` (admin): the enrolled worker's
/// token stops working at once, its connection is closed and its running
/// builds run elsewhere.
pub async fn revoke(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(member) = state.enrolled.member(&name) else {
        let hint = if state.config.get().worker(&name).is_some() {
            " (it is a [[worker]] of master.toml: remove it there and reconfig)"
        } else {
            ""
        };
        return failure(
            StatusCode::NOT_FOUND,
            format!("no enrolled worker `{name}`{hint}"),
        );
    };
    match state.store.revoke(name.clone()).await {
        Ok(_) => {}
        Err(e) => {
            tracing::error!("revocation of {name}: {e:#}");
            return failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        }
    }
    state.enrolled.remove(&name);
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state
        .events
        .send(Event::Revoked {
            name: name.clone(),
            reply,
        })
        .is_err()
        || answer.await.is_err()
    {
        return failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into());
    }
    Json(RevokeResponse {
        name,
        group: member.group,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_429_with_whole_seconds_to_wait() {
        let response = too_many(EnrolLimit::Source, Duration::from_millis(300));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = too_many(EnrolLimit::Global, Duration::from_millis(2100));
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }
}
