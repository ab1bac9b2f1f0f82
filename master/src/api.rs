//! The master's HTTP JSON API under `/api/v1` (admin token required): submit,
//! list, show, wait for and cancel builds, read logs, list workers, pause and
//! resume; and `/metrics` (same token) in the Prometheus text format. Shapes are in `nightshift_proto::api`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nightshift_proto::api::{
    ApiError, BuildInfo, BuildList, BuildLog, BuildState, MAX_WORKER_PAGE, PauseState,
    ReconfigResponse, SubmitRequest, SubmitResponse, WorkerPage, WorkerQuery,
};
use nightshift_proto::wire::{BuildId, is_full_revision};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::artifacts::{download as artifact, list as artifacts};
use crate::enrolment::revoke as revoke_worker;
use crate::scheduler::Event;
use crate::snapshot::{BuildWaits, Snapshot};
use crate::state::{AppState, is_admin};
use crate::store::NewBuild;

/// Longest a `wait` request is held open.
const MAX_WAIT_SECS: u64 = 300;

/// An error response: status plus [`ApiError`] JSON.
pub struct Failure(StatusCode, String);

impl Failure {
    fn internal(e: anyhow::Error) -> Failure {
        tracing::error!("API: {e:#}");
        Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
    fn not_found(id: BuildId) -> Failure {
        Failure(StatusCode::NOT_FOUND, format!("no build {id}"))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !is_admin(&state, request.headers()) {
        return Failure(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <token>)".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// The admin API routes (the agent endpoint is added by the server).
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/builds", post(submit).get(list_builds))
        .route("/api/v1/builds/{id}", get(show_build))
        .route("/api/v1/builds/{id}/wait", get(wait_build))
        .route("/api/v1/builds/{id}/log", get(build_log))
        .route("/api/v1/builds/{id}/cancel", post(cancel_build))
        .route("/api/v1/builds/{id}/artifacts", get(artifacts))
        .route("/api/v1/builds/{id}/artifacts/{*name}", get(artifact))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/workers/{name}/revoke", post(revoke_worker))
        .route("/api/v1/pause", post(pause))
        .route("/api/v1/resume", post(resume))
        .route("/api/v1/reconfig", post(reconfig))
        .route("/metrics", get(metrics))
        .route("/api/v1/triggers", get(trigger_counters))
        .route_layer(middleware::from_fn_with_state(state, require_admin))
}

/// `GET /api/v1/triggers`: what webhooks, polling and timed builds did.
async fn trigger_counters(
    State(state): State<AppState>,
) -> Json<crate::triggers::TriggerCountersSnapshot> {
    Json(state.trigger_counters.snapshot())
}

async fn snapshot(state: &AppState) -> Result<Snapshot, Failure> {
    let (reply, answer) = oneshot::channel();
    state
        .events
        .send(Event::Snapshot { reply })
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))?;
    answer
        .await
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))
}

fn parse_id(text: &str) -> Result<BuildId, Failure> {
    text.parse().map_err(|_| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("`{text}` is not a build id"),
        )
    })
}

async fn submit(
    State(state): State<AppState>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), Failure> {
    let received = std::time::Instant::now();
    let Json(request) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let config = state.config.get();
    if config.builder(&request.builder).is_none() {
        let known: Vec<&str> = config.builders.iter().map(|b| b.name.as_str()).collect();
        return Err(Failure(
            StatusCode::NOT_FOUND,
            format!(
                "no builder `{}` (known: {})",
                request.builder,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    if let Some(key) = request
        .properties
        .keys()
        .find(|k| k.is_empty() || k.contains('='))
    {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("property name `{key}` must be non-empty and contain no `=`"),
        ));
    }
    let builder = config.builder(&request.builder).ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            format!("no builder `{}`", request.builder),
        )
    })?;
    let source = match &builder.source {
        None if request.revision.is_some() || request.branch.is_some() => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                format!(
                    "builder `{}` has no `source`; --revision and --branch apply to builders with one",
                    builder.name
                ),
            ));
        }
        None => None,
        Some(source) => {
            let branch = request
                .branch
                .clone()
                .unwrap_or_else(|| source.branch.clone());
            if let Err(why) = crate::config::check_branch_name(&branch) {
                return Err(Failure(StatusCode::BAD_REQUEST, why));
            }
            let revision = match &request.revision {
                Some(revision) => {
                    let revision = revision.trim().to_ascii_lowercase();
                    if !is_full_revision(&revision) {
                        return Err(Failure(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "revision `{revision}` is not a full commit id (40 or 64 hex digits; \
                                 `git rev-parse` prints one)"
                            ),
                        ));
                    }
                    revision
                }
                None => crate::triggers::git::branch_head(&source.repo, &branch)
                    .await
                    .map_err(|why| {
                        Failure(
                            StatusCode::BAD_GATEWAY,
                            format!("cannot resolve branch `{branch}`: {why}"),
                        )
                    })?,
            };
            crate::triggers::source_for(builder, &branch, &revision)
        }
    };
    let build = NewBuild {
        builder: request.builder,
        properties: request.properties,
        source,
        trigger: "submit".into(),
    };
    // Committed, then handed to the scheduler.
    let ids = crate::triggers::queue_builds(&state.store, &state.events, vec![build], Vec::new())
        .await
        .map_err(Failure::internal)?;
    let id = ids
        .first()
        .copied()
        .ok_or_else(|| Failure::internal(anyhow::anyhow!("no build id returned")))?;
    tracing::debug!(
        target: nightshift_proto::log::HANDOFF,
        "build {id}: answered, {} us after the request was read",
        received.elapsed().as_micros()
    );
    Ok((StatusCode::CREATED, Json(SubmitResponse { build_id: id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
}

/// What these builds wait for, from the scheduler (only the builds asked
/// about: the cost does not grow with the number of workers).
async fn waiting_for(state: &AppState, ids: Vec<BuildId>) -> Result<BuildWaits, Failure> {
    let (reply, answer) = oneshot::channel();
    state
        .events
        .send(Event::WaitingFor { ids, reply })
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))?;
    answer
        .await
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))
}

fn overlay(build: &mut BuildInfo, live: &BuildWaits) {
    match build.state {
        // A running build shows a wait only while a step waits for a lock.
        BuildState::Queued | BuildState::Running => {
            if let Some(why) = live.waiting_for.get(&build.id) {
                build.waiting_for = Some(why.clone());
            }
            build.estimate_secs = live
                .estimates
                .get(&build.builder)
                .and_then(|took| u64::try_from(took.as_secs()).ok());
        }
        BuildState::Finished => {}
    }
}

async fn list_builds(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BuildList>, Failure> {
    let Query(query) = query.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let mut builds = state
        .store
        .list_builds(limit)
        .await
        .map_err(Failure::internal)?;
    let pending = builds
        .iter()
        .filter(|b| b.state != BuildState::Finished)
        .map(|b| b.id)
        .collect();
    let live = waiting_for(&state, pending).await?;
    for build in &mut builds {
        overlay(build, &live);
    }
    Ok(Json(BuildList { builds }))
}

async fn load_build(state: &AppState, id: BuildId) -> Result<BuildInfo, Failure> {
    let mut build = state
        .store
        .get_build(id)
        .await
        .map_err(Failure::internal)?
        .ok_or_else(|| Failure::not_found(id))?;
    if build.state != BuildState::Finished {
        let live = waiting_for(state, vec![id]).await?;
        overlay(&mut build, &live);
    }
    Ok(build)
}

async fn show_build(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BuildInfo>, Failure> {
    let id = parse_id(&id)?;
    Ok(Json(load_build(&state, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_secs: Option<u64>,
}

/// Long poll: answers when the build is finished, or with its current state
/// after `timeout_secs`. The wait is a notification from the scheduler.
async fn wait_build(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BuildInfo>, Failure> {
    let id = parse_id(&id)?;
    let Query(query) = query.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let timeout = Duration::from_secs(query.timeout_secs.unwrap_or(60).min(MAX_WAIT_SECS));
    let (reply, answer) = oneshot::channel();
    state
        .events
        .send(Event::Watch { id, reply })
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))?;
    let _ = tokio::time::timeout(timeout, answer).await;
    Ok(Json(load_build(&state, id).await?))
}

async fn build_log(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BuildLog>, Failure> {
    let id = parse_id(&id)?;
    let log = state
        .store
        .get_log(id)
        .await
        .map_err(Failure::internal)?
        .ok_or_else(|| Failure::not_found(id))?;
    Ok(Json(BuildLog { build_id: id, log }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel_build(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> Result<Json<BTreeMap<String, String>>, Failure> {
    let id = parse_id(&id)?;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| "cancelled by the admin".into());
    let (reply, answer) = oneshot::channel();
    state
        .events
        .send(Event::Cancel { id, reason, reply })
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))?;
    match answer.await {
        Ok(Ok(())) => Ok(Json(BTreeMap::from([(
            "status".to_owned(),
            "cancelling".to_owned(),
        )]))),
        Ok(Err(why)) => Err(Failure(StatusCode::CONFLICT, why)),
        Err(_) => Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "master is stopping".into(),
        )),
    }
}

/// `/metrics` (admin token): the Prometheus text format. It is on the
/// master's one TLS port behind the admin token rather than on a second
/// listener, because the farm's figures (worker names, queue depths,
/// refusals) are the admin's to read, and Prometheus sends a bearer token
/// (`authorization.credentials_file`) over TLS as easily as the CLI does.
async fn metrics(State(state): State<AppState>) -> Result<Response, Failure> {
    let live = snapshot(&state).await?;
    let depths = state
        .store
        .depth_by_builder()
        .await
        .map_err(Failure::internal)?;
    let builders: Vec<String> = state
        .config
        .get()
        .builders
        .iter()
        .map(|b| b.name.clone())
        .collect();
    let mut text = crate::metrics::METRICS.render(&live, &builders, &depths);
    let hooks: Vec<String> = state
        .config
        .get()
        .hooks
        .iter()
        .map(|h| h.name.clone())
        .collect();
    state.trigger_counters.render_metrics(&mut text, &hooks);
    Ok((
        [(
            header::CONTENT_TYPE,
            nightshift_proto::prometheus::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// `GET /api/v1/workers`: filtered by state and name, one page in name
/// order (at most [`MAX_WORKER_PAGE`]), with the total that matched.
async fn workers(
    State(state): State<AppState>,
    query: Result<Query<WorkerQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<WorkerPage>, Failure> {
    let Query(query) = query.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(MAX_WORKER_PAGE);
    if !(1..=MAX_WORKER_PAGE).contains(&limit) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("limit={limit}: must be 1 to {MAX_WORKER_PAGE}"),
        ));
    }
    let (reply, answer) = oneshot::channel();
    let stopping = || Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into());
    state
        .events
        .send(Event::WorkersPage {
            query,
            limit,
            reply,
        })
        .map_err(|_| stopping())?;
    Ok(Json(answer.await.map_err(|_| stopping())?))
}

/// Pauses or resumes the farm (stored, then told to the scheduler): the
/// API's and the dashboard's one way.
pub async fn set_paused(state: &AppState, paused: bool) -> Result<Json<PauseState>, Failure> {
    state
        .store
        .set_paused(paused)
        .await
        .map_err(Failure::internal)?;
    state
        .events
        .send(Event::SetPaused { paused })
        .map_err(|_| Failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()))?;
    Ok(Json(PauseState { paused }))
}

async fn pause(State(state): State<AppState>) -> Result<Json<PauseState>, Failure> {
    set_paused(&state, true).await
}

async fn resume(State(state): State<AppState>) -> Result<Json<PauseState>, Failure> {
    set_paused(&state, false).await
}

/// `POST /api/v1/reconfig`: reload master.toml. 422 with every error when
/// the new file is refused (the running config stays).
async fn reconfig(State(state): State<AppState>) -> Result<Json<ReconfigResponse>, Failure> {
    match crate::reconfig::reload(&state.config, &state.events).await {
        Ok(changes) => Ok(Json(ReconfigResponse { changes })),
        Err(refused) => Err(Failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            refused.to_string(),
        )),
    }
}

#[cfg(test)]
mod worker_page_tests {
    use nightshift_policy::PresenceState;
    use nightshift_proto::api::WorkerQuery;

    #[test]
    fn the_query_string_round_trips() {
        let query = WorkerQuery {
            state: Some(PresenceState::Away),
            name: Some("a b&c".into()),
            offset: Some(3),
            limit: Some(7),
        };
        let text = query.to_query_string();
        assert_eq!(text, "state=away&name=a%20b%26c&offset=3&limit=7");
        let parsed: WorkerQuery = parse_query(&text).expect("the master's extractor accepts it");
        assert_eq!(parsed, query);
    }

    fn parse_query(text: &str) -> Option<WorkerQuery> {
        let uri: axum::http::Uri = format!("/api/v1/workers?{text}").parse().ok()?;
        axum::extract::Query::<WorkerQuery>::try_from_uri(&uri)
            .ok()
            .map(|q| q.0)
    }
}
