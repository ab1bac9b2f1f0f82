//! The JSON API under `/api/v1`: `GET status`, `POST set-availability`,
//! `POST stop` — request shapes, their validation (errors name the field),
//! and the hand-off to the daemon as [`ControlCommand`]s.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use jiff::{SignedDuration, Timestamp};
use nightshift_policy::{Presence, PresenceState};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::error::ApiError;
use super::state::Shared;
use super::when;
use crate::handle::{AgentStatus, ControlCommand, ManualRequest};

/// The longest `reason` accepted, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// How long a request waits for the daemon's answer before giving up.
const DAEMON_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of `POST /api/v1/set-availability`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAvailabilityBody {
    /// `available`, `reluctant`, `away` or `auto`.
    pub state: String,
    /// A duration such as `1h` (exclusive with `until`).
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    /// `19:00`, `tomorrow`, a local date-time or an RFC 3339 instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of `POST /api/v1/stop`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    #[serde(default)]
    pub graceful: bool,
    /// With `graceful`: cancel (and re-queue) running builds after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
}

/// The answer to `POST /api/v1/stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopAnswer {
    pub stopping: bool,
    pub graceful: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
}

/// Parses a JSON body into `T`, naming the offending field on error.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    empty_is: Option<&str>,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !(is_json || (body.is_empty() && empty_is.is_some())) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    let body = match (body.iter().all(u8::is_ascii_whitespace), empty_is) {
        (true, Some(default)) => default.as_bytes(),
        _ => body,
    };
    if body.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object, e.g. {\"state\":\"away\"}",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path.is_empty() || path == "." || path.contains('?') {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON body: {inner}"),
            )
        } else {
            ApiError::field(&path, inner.to_string())
        }
    })?;
    deserializer.end().map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {error}"),
        )
    })?;
    Ok(value)
}

/// Turns a set-availability body into the daemon's manual request
/// (`None` = back to automatic), with `now` and `tz` for relative times.
pub fn manual_request(
    body: &SetAvailabilityBody,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
) -> Result<Option<ManualRequest>, ApiError> {
    let state = match body.state.trim() {
        "auto" => None,
        word => match word.parse::<PresenceState>() {
            Ok(PresenceState::Offline) | Err(_) => {
                return Err(ApiError::field(
                    "state",
                    format!(
                        "`{word}` is not a state you can set; use `available`, `reluctant`, `away` or `auto`"
                    ),
                ));
            }
            Ok(state) => Some(state),
        },
    };
    if body.for_.is_some() && body.until.is_some() {
        return Err(ApiError::field(
            "for",
            "give either `for` or `until`, not both",
        ));
    }
    let reason = match body.reason.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) if text.chars().count() > MAX_REASON_CHARS => {
            return Err(ApiError::field(
                "reason",
                format!("is longer than {MAX_REASON_CHARS} characters"),
            ));
        }
        Some(text) if text.chars().any(char::is_control) => {
            return Err(ApiError::field("reason", "must be one line of text"));
        }
        Some(text) => Some(text.to_owned()),
    };
    let Some(state) = state else {
        if body.for_.is_some() {
            return Err(ApiError::field(
                "for",
                "`auto` lasts until changed; it takes no `for`",
            ));
        }
        if body.until.is_some() {
            return Err(ApiError::field(
                "until",
                "`auto` lasts until changed; it takes no `until`",
            ));
        }
        if reason.is_some() {
            return Err(ApiError::field(
                "reason",
                "`auto` takes no reason: the policies give it",
            ));
        }
        return Ok(None);
    };
    let until = match (&body.for_, &body.until) {
        (Some(text), _) => {
            let span = when::parse_for(text).map_err(|error| ApiError::field("for", error))?;
            Some(now.checked_add(span).map_err(|error| {
                ApiError::field("for", format!("`{text}` is too long: {error}"))
            })?)
        }
        (None, Some(text)) => Some(
            when::parse_until(text, now, tz).map_err(|error| ApiError::field("until", error))?,
        ),
        (None, None) => None,
    };
    Ok(Some(ManualRequest {
        state,
        until,
        reason,
    }))
}

/// Validates a stop body: the deadline as a duration, only with `graceful`.
pub fn stop_request(body: &StopBody) -> Result<Option<SignedDuration>, ApiError> {
    match &body.deadline {
        None => Ok(None),
        Some(_) if !body.graceful => Err(ApiError::field(
            "deadline",
            "only a graceful stop has a deadline; add `\"graceful\": true`",
        )),
        Some(text) => when::parse_for(text)
            .map(Some)
            .map_err(|error| ApiError::field("deadline", error)),
    }
}

/// Sends a command and waits for the daemon's answer.
async fn ask<T>(
    shared: &Shared,
    command: ControlCommand,
    reply: oneshot::Receiver<Result<T, String>>,
) -> Result<T, ApiError> {
    let gone = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    };
    shared
        .handle
        .commands
        .send(command)
        .await
        .map_err(|_| gone())?;
    match tokio::time::timeout(DAEMON_REPLY_TIMEOUT, reply).await {
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent did not answer in time; try again",
        )),
        Ok(Err(_)) => Err(gone()),
        Ok(Ok(Err(message))) => Err(ApiError::new(StatusCode::CONFLICT, message)),
        Ok(Ok(Ok(value))) => Ok(value),
    }
}

/// `GET /api/v1/status`.
pub async fn get_status(State(shared): State<Shared>) -> Json<AgentStatus> {
    Json(shared.handle.status.borrow().clone())
}

/// `POST /api/v1/set-availability`: answers with the status after the change.
pub async fn post_set_availability(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AgentStatus>, ApiError> {
    let body: SetAvailabilityBody = parse_body(&headers, &body, None)?;
    let manual = manual_request(&body, (shared.clock)(), &shared.time_zone)?;
    let (reply, answer) = oneshot::channel::<Result<Presence, String>>();
    tracing::info!(?manual, "manual state requested over the control plane");
    let command = ControlCommand::SetManual {
        manual: manual.clone(),
        reply,
    };
    let presence = ask(&shared, command, answer).await?;
    let mut status = shared.handle.status.borrow().clone();
    // The daemon's reply (and the request it accepted) are the truth even if
    // its status update is not published yet.
    status.presence = presence;
    status.manual = manual;
    Ok(Json(status))
}

/// `POST /api/v1/stop`.
pub async fn post_stop(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<StopAnswer>), ApiError> {
    let body: StopBody = parse_body(&headers, &body, Some("{}"))?;
    let deadline = stop_request(&body)?;
    let (reply, answer) = oneshot::channel::<Result<(), String>>();
    tracing::info!(
        graceful = body.graceful,
        ?deadline,
        "stop requested over the control plane"
    );
    let now = (shared.clock)();
    ask(
        &shared,
        ControlCommand::Stop {
            graceful: body.graceful,
            deadline,
            reply,
        },
        answer,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(StopAnswer {
            stopping: true,
            graceful: body.graceful,
            deadline: deadline.and_then(|span| now.checked_add(span).ok()),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers
    }

    fn tz() -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get("Europe/Berlin").unwrap()
    }

    fn set(json: &str) -> Result<Option<ManualRequest>, ApiError> {
        let now: Timestamp = "2026-11-23T11:00:00Z".parse().unwrap();
        let body: SetAvailabilityBody = parse_body(&json_headers(), json.as_bytes(), None)?;
        manual_request(&body, now, &tz())
    }

    fn field_of(result: Result<Option<ManualRequest>, ApiError>) -> Option<String> {
        result.unwrap_err().body.field
    }

    #[test]
    fn valid_bodies() {
        assert_eq!(set(r#"{"state":"auto"}"#).unwrap(), None);
        let away = set(r#"{"state":"away","for":"1h","reason":" lunch "}"#)
            .unwrap()
            .unwrap();
        assert_eq!(away.state, PresenceState::Away);
        assert_eq!(away.until, Some("2026-11-23T12:00:00Z".parse().unwrap()));
        assert_eq!(away.reason.as_deref(), Some("lunch"));
        let until = set(r#"{"state":"reluctant","until":"19:00"}"#)
            .unwrap()
            .unwrap();
        // 19:00 in Berlin (UTC+1 in November).
        assert_eq!(until.until, Some("2026-11-23T18:00:00Z".parse().unwrap()));
        let plain = set(r#"{"state":"available"}"#).unwrap().unwrap();
        assert_eq!((plain.until, plain.reason), (None, None));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        assert_eq!(
            field_of(set(r#"{"state":"offline"}"#)).as_deref(),
            Some("state")
        );
        assert_eq!(
            field_of(set(r#"{"state":"sleepy"}"#)).as_deref(),
            Some("state")
        );
        assert_eq!(field_of(set(r#"{"state":7}"#)).as_deref(), Some("state"));
        assert_eq!(
            field_of(set(r#"{"state":"away","for":"soon"}"#)).as_deref(),
            Some("for")
        );
        assert_eq!(
            field_of(set(r#"{"state":"away","until":"later"}"#)).as_deref(),
            Some("until")
        );
        assert_eq!(
            field_of(set(r#"{"state":"away","for":"1h","until":"19:00"}"#)).as_deref(),
            Some("for")
        );
        assert_eq!(
            field_of(set(r#"{"state":"auto","for":"1h"}"#)).as_deref(),
            Some("for")
        );
        assert_eq!(
            field_of(set(r#"{"state":"away","reason":"a\nb"}"#)).as_deref(),
            Some("reason")
        );
        let long = format!(r#"{{"state":"away","reason":"{}"}}"#, "x".repeat(201));
        assert_eq!(field_of(set(&long)).as_deref(), Some("reason"));
        let unknown = set(r#"{"state":"away","color":"red"}"#).unwrap_err();
        assert!(
            unknown.body.error.contains("color"),
            "{}",
            unknown.body.error
        );
        let missing = set(r#"{}"#).unwrap_err();
        assert!(
            missing.body.error.contains("state"),
            "{}",
            missing.body.error
        );
        assert_eq!(missing.status, StatusCode::BAD_REQUEST);
        assert_eq!(set("not json").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(
            set(r#"{"state":"away"} trailing"#).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn content_type_must_be_json() {
        let result =
            parse_body::<SetAvailabilityBody>(&HeaderMap::new(), br#"{"state":"away"}"#, None);
        assert_eq!(
            result.unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let result = parse_body::<SetAvailabilityBody>(&headers, br#"{"state":"away"}"#, None);
        assert_eq!(
            result.unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(parse_body::<SetAvailabilityBody>(&headers, br#"{"state":"away"}"#, None).is_ok());
    }

    #[test]
    fn stop_bodies() {
        let parse =
            |json: &str| parse_body::<StopBody>(&json_headers(), json.as_bytes(), Some("{}"));
        assert_eq!(parse("").unwrap(), StopBody::default());
        let body = parse(r#"{"graceful":true,"deadline":"30m"}"#).unwrap();
        assert_eq!(
            stop_request(&body).unwrap(),
            Some(SignedDuration::from_mins(30))
        );
        let body = parse(r#"{"deadline":"30m"}"#).unwrap();
        assert_eq!(
            stop_request(&body).unwrap_err().body.field.as_deref(),
            Some("deadline")
        );
        let body = parse(r#"{"graceful":true,"deadline":"whenever"}"#).unwrap();
        assert_eq!(
            stop_request(&body).unwrap_err().body.field.as_deref(),
            Some("deadline")
        );
        assert_eq!(
            parse(r#"{"graceful":"yes"}"#)
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("graceful")
        );
    }
}
