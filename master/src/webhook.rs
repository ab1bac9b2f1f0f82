//! Webhooks at `POST /hooks/<name>` on the master's port: GitHub and
//! Gitea/Forgejo push events (HMAC-SHA256 of the body with the hook's
//! secret), GitLab push events (`X-Gitlab-Token`), and a generic JSON form
//! (`Authorization: Bearer <secret>`). A push to a branch that builders
//! follow queues one request per builder for the pushed revision; anything
//! else gets a 4xx naming what is wrong, queues nothing, and is counted.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use nightshift_proto::wire::{BuildId, is_full_revision};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

use crate::auth::bearer;
use crate::config::{HookDef, HookKind, MasterConfig};
use crate::state::AppState;
use crate::store::NewBuild;
use crate::triggers::{HookResult, TriggerCounters, queue_builds, source_for};
use nightshift_proto::secret::constant_time_eq;

/// Largest body a hook accepts (a push event with 20 commits is ~30 KiB).
pub const MAX_HOOK_BODY: usize = 1 << 20;

/// What a delivery did, as JSON.
#[derive(Debug, Serialize)]
struct HookAnswer {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    queued: Vec<QueuedBuild>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ignored: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct QueuedBuild {
    builder: String,
    build_id: BuildId,
    revision: String,
}

fn refuse(status: StatusCode, why: String) -> Response {
    tracing::warn!("webhook refused ({status}): {why}");
    (
        status,
        Json(HookAnswer {
            queued: Vec::new(),
            ignored: None,
            error: Some(why),
        }),
    )
        .into_response()
}

fn ignore(counters: &TriggerCounters, why: String) -> Response {
    TriggerCounters::bump(&counters.hook_ignored, 1);
    tracing::info!("webhook: nothing to build: {why}");
    (
        StatusCode::OK,
        Json(HookAnswer {
            queued: Vec::new(),
            ignored: Some(why),
            error: None,
        }),
    )
        .into_response()
}

/// A push as the forges describe it, reduced to what triggers builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Every URL or path the payload names the repository by.
    pub repository_names: Vec<String>,
    /// `None` when the pushed ref is not a branch (a tag).
    pub branch: Option<String>,
    /// The new head; `None` when the branch was deleted.
    pub revision: Option<String>,
}

/// Why a delivery was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    BadSignature(String),
    Malformed(String),
    /// Authentic, but not a push (a ping, another event).
    NotAPush(String),
}

/// Checks the delivery's signature or token against `secret`.
pub fn authenticate(
    kind: HookKind,
    headers: &HeaderMap,
    body: &[u8],
    secret: &[u8],
) -> Result<(), Rejection> {
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match kind {
        HookKind::Github | HookKind::Gitea => {
            let (name, hex_sig) = if let Some(v) = header_text("x-hub-signature-256") {
                let hex_sig = v.strip_prefix("sha256=").ok_or_else(|| {
                    Rejection::BadSignature(
                        "X-Hub-Signature-256 must look like `sha256=<hex>`".into(),
                    )
                })?;
                ("X-Hub-Signature-256", hex_sig)
            } else if kind == HookKind::Gitea
                && let Some((name, v)) = [
                    ("X-Gitea-Signature", "x-gitea-signature"),
                    ("X-Forgejo-Signature", "x-forgejo-signature"),
                ]
                .into_iter()
                .find_map(|(name, key)| Some((name, header_text(key)?)))
            {
                (name, v)
            } else {
                return Err(Rejection::BadSignature(match kind {
                    HookKind::Gitea => "missing signature header (X-Hub-Signature-256, X-Gitea-Signature or X-Forgejo-Signature)".into(),
                    _ => "missing X-Hub-Signature-256 header (set the hook's secret in the forge)".into(),
                }));
            };
            let signature = hex::decode(hex_sig.trim())
                .map_err(|_| Rejection::BadSignature(format!("{name} is not hex")))?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret)
                .map_err(|_| Rejection::BadSignature("unusable secret".into()))?;
            mac.update(body);
            // `verify_slice` compares in constant time.
            mac.verify_slice(&signature).map_err(|_| {
                Rejection::BadSignature(format!(
                    "{name} does not match the body and the hook's secret"
                ))
            })
        }
        HookKind::Gitlab => {
            let token = header_text("x-gitlab-token").ok_or_else(|| {
                Rejection::BadSignature(
                    "missing X-Gitlab-Token header (set the hook's secret token in GitLab)".into(),
                )
            })?;
            if constant_time_eq(token.as_bytes(), secret) {
                Ok(())
            } else {
                Err(Rejection::BadSignature(
                    "X-Gitlab-Token does not match the hook's secret".into(),
                ))
            }
        }
        HookKind::Generic => {
            let token = bearer(headers).ok_or_else(|| {
                Rejection::BadSignature("missing `Authorization: Bearer <secret>` header".into())
            })?;
            if constant_time_eq(token.as_bytes(), secret) {
                Ok(())
            } else {
                Err(Rejection::BadSignature(
                    "the bearer token does not match the hook's secret".into(),
                ))
            }
        }
    }
}

/// Reads the push out of an authentic delivery.
pub fn parse_push(kind: HookKind, headers: &HeaderMap, body: &[u8]) -> Result<Push, Rejection> {
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = match kind {
        HookKind::Github => header_text("x-github-event"),
        HookKind::Gitea => header_text("x-gitea-event")
            .or_else(|| header_text("x-forgejo-event"))
            .or_else(|| header_text("x-github-event")),
        HookKind::Gitlab => header_text("x-gitlab-event"),
        HookKind::Generic => Some("push"),
    };
    let is_push = match kind {
        HookKind::Gitlab => event == Some("Push Hook"),
        _ => event == Some("push"),
    };
    if !is_push {
        return Err(Rejection::NotAPush(match event {
            Some(event) => format!("event `{event}` is not a push"),
            None => "the delivery names no event (no event header)".into(),
        }));
    }
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| Rejection::Malformed(format!("the body is not JSON: {e}")))?;
    let text = |pointer: &str| {
        json.pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let (reference, revision, names) = match kind {
        HookKind::Generic => {
            let repository = text("/repository")
                .ok_or_else(|| Rejection::Malformed("missing string field `repository`".into()))?;
            let branch = text("/branch")
                .ok_or_else(|| Rejection::Malformed("missing string field `branch`".into()))?;
            let revision = text("/revision")
                .ok_or_else(|| Rejection::Malformed("missing string field `revision`".into()))?;
            (format!("refs/heads/{branch}"), revision, vec![repository])
        }
        _ => {
            let reference = text("/ref")
                .ok_or_else(|| Rejection::Malformed("missing string field `ref`".into()))?;
            let revision = text("/after")
                .or_else(|| text("/checkout_sha"))
                .ok_or_else(|| Rejection::Malformed("missing string field `after`".into()))?;
            let names = [
                "/repository/clone_url",
                "/repository/ssh_url",
                "/repository/git_url",
                "/repository/html_url",
                "/repository/full_name",
                "/repository/git_http_url",
                "/repository/git_ssh_url",
                "/repository/url",
                "/repository/homepage",
                "/project/git_http_url",
                "/project/git_ssh_url",
                "/project/web_url",
                "/project/path_with_namespace",
            ]
            .iter()
            .filter_map(|p| text(p))
            .collect();
            (reference, revision, names)
        }
    };
    let revision = revision.to_ascii_lowercase();
    if !is_full_revision(&revision) {
        return Err(Rejection::Malformed(format!(
            "`{revision}` is not a full commit id (40 or 64 hex digits)"
        )));
    }
    let deleted = revision.bytes().all(|b| b == b'0');
    let branch = reference.strip_prefix("refs/heads/").map(str::to_owned);
    if let Some(branch) = &branch
        && let Err(why) = crate::config::check_branch_name(branch)
    {
        return Err(Rejection::Malformed(why));
    }
    Ok(Push {
        repository_names: names,
        branch,
        revision: (!deleted).then_some(revision),
    })
}

/// `https://Host/a/b.git`, `git@host:a/b`, `ssh://git@host/a/b/` → `host/a/b`;
/// a local path or file:// URL → the path.
pub fn normalize_repo(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix(".git").unwrap_or(url);
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest.to_owned(),
        None => match url.split_once(':') {
            Some((host, path)) if !url.starts_with('/') => format!("{host}/{path}"),
            _ => url.to_owned(),
        },
    };
    let rest = match rest.split_once('/') {
        Some((authority, path)) => {
            let host = authority.rsplit('@').next().unwrap_or(authority);
            let host = host.split(':').next().unwrap_or(host);
            format!(
                "{}/{}",
                host.to_ascii_lowercase(),
                path.trim_start_matches('/')
            )
        }
        None => rest,
    };
    rest.trim_end_matches('/').to_owned()
}

/// The builders a push to `branch` of the named repository triggers.
pub fn matching_builders<'c>(
    config: &'c MasterConfig,
    hook: &HookDef,
    push: &Push,
    branch: &str,
) -> Vec<&'c crate::config::BuilderDef> {
    let names: Vec<String> = push
        .repository_names
        .iter()
        .map(|n| normalize_repo(n))
        .collect();
    config
        .builders
        .iter()
        .filter(|b| {
            let Some(source) = &b.source else {
                return false;
            };
            if source.branch != branch {
                return false;
            }
            if hook.builders.is_empty() {
                let own = normalize_repo(&source.repo);
                names
                    .iter()
                    .any(|n| *n == own || own.ends_with(&format!("/{n}")))
            } else {
                hook.builders.contains(&b.name)
            }
        })
        .collect()
}

/// `POST /hooks/{name}`.
pub async fn receive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let counters = Arc::clone(&state.trigger_counters);
    let config = state.config.get();
    let Some(hook) = config.hook(&name).cloned() else {
        TriggerCounters::bump(&counters.hook_unknown, 1);
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no hook `{name}` is configured"),
        );
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_HOOK_BODY as u64) {
        TriggerCounters::bump(&counters.hook_oversized, 1);
        counters.hook(&name, HookResult::Oversized, 1);
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("hook `{name}`: the body is larger than {MAX_HOOK_BODY} bytes"),
        );
    }
    let body = match axum::body::to_bytes(body, MAX_HOOK_BODY).await {
        Ok(body) => body,
        Err(_) => {
            TriggerCounters::bump(&counters.hook_oversized, 1);
            counters.hook(&name, HookResult::Oversized, 1);
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "hook `{name}`: the body is larger than {MAX_HOOK_BODY} bytes (or was cut off)"
                ),
            );
        }
    };
    let secret = match tokio::fs::read(&hook.secret_file).await {
        Ok(secret) => trim_secret(secret),
        Err(e) => {
            tracing::error!(
                "hook `{name}`: cannot read its secret file {}: {e}",
                hook.secret_file.display()
            );
            counters.hook(&name, HookResult::SecretUnavailable, 1);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "hook `{name}`: the master cannot read this hook's secret file (see its log)"
                ),
            );
        }
    };
    if secret.is_empty() {
        counters.hook(&name, HookResult::SecretUnavailable, 1);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("hook `{name}`: the hook's secret file is empty"),
        );
    }
    let push = authenticate(hook.kind, &headers, &body, &secret)
        .and_then(|()| parse_push(hook.kind, &headers, &body));
    let push = match push {
        Ok(push) => push,
        Err(Rejection::BadSignature(why)) => {
            TriggerCounters::bump(&counters.hook_bad_signature, 1);
            counters.hook(&name, HookResult::BadSignature, 1);
            return refuse(StatusCode::UNAUTHORIZED, format!("hook `{name}`: {why}"));
        }
        Err(Rejection::Malformed(why)) => {
            TriggerCounters::bump(&counters.hook_malformed, 1);
            counters.hook(&name, HookResult::Malformed, 1);
            return refuse(StatusCode::BAD_REQUEST, format!("hook `{name}`: {why}"));
        }
        Err(Rejection::NotAPush(why)) => {
            TriggerCounters::bump(&counters.hook_accepted, 1);
            counters.hook(&name, HookResult::Accepted, 1);
            return ignore(&counters, format!("hook `{name}`: {why}"));
        }
    };
    TriggerCounters::bump(&counters.hook_accepted, 1);
    counters.hook(&name, HookResult::Accepted, 1);
    let Some(branch) = push.branch.clone() else {
        return ignore(
            &counters,
            format!("hook `{name}`: the pushed ref is not a branch"),
        );
    };
    let Some(revision) = push.revision.clone() else {
        return ignore(
            &counters,
            format!("hook `{name}`: branch `{branch}` was deleted"),
        );
    };
    let builders = matching_builders(&config, &hook, &push, &branch);
    if builders.is_empty() {
        return ignore(
            &counters,
            format!("hook `{name}`: no builder follows branch `{branch}` of this repository"),
        );
    }
    let builds: Vec<NewBuild> = builders
        .iter()
        .map(|b| NewBuild {
            builder: b.name.clone(),
            properties: Default::default(),
            source: source_for(b, &branch, &revision),
            trigger: format!("webhook {name}"),
        })
        .collect();
    let names: Vec<String> = builds.iter().map(|b| b.builder.clone()).collect();
    // The head each matched repository now has: polling sees nothing new.
    let mut heads: Vec<(String, String, String)> = builders
        .iter()
        .filter_map(|b| b.source.as_ref())
        .map(|s| (s.repo.clone(), branch.clone(), revision.clone()))
        .collect();
    heads.sort();
    heads.dedup();
    match queue_builds(&state.store, &state.events, builds, heads).await {
        Ok(ids) => {
            TriggerCounters::bump(&counters.hook_builds_queued, ids.len() as u64);
            counters.hook(&name, HookResult::BuildQueued, ids.len() as u64);
            tracing::info!(
                "hook `{name}`: push of {revision} to `{branch}` queued builds {ids:?} ({})",
                names.join(", ")
            );
            let queued = names
                .into_iter()
                .zip(ids)
                .map(|(builder, build_id)| QueuedBuild {
                    builder,
                    build_id,
                    revision: revision.clone(),
                })
                .collect();
            (
                StatusCode::ACCEPTED,
                Json(HookAnswer {
                    queued,
                    ignored: None,
                    error: None,
                }),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!("hook `{name}`: cannot queue: {e:#}");
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("hook `{name}`: cannot queue: {e:#}"),
            )
        }
    }
}

/// The secret file's content without its trailing newline.
fn trim_secret(mut secret: Vec<u8>) -> Vec<u8> {
    while secret.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        secret.pop();
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const REV: &str = "0123456789abcdef0123456789abcdef01234567";

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn github_body() -> Vec<u8> {
        serde_json::json!({
            "ref": "refs/heads/main",
            "before": "0000000000000000000000000000000000000001",
            "after": REV,
            "repository": {
                "full_name": "acme/app",
                "clone_url": "https://github.com/acme/app.git",
                "ssh_url": "git@github.com:acme/app.git"
            }
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn github_signature_is_checked() {
        let body = github_body();
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", HeaderValue::from_static("push"));
        assert!(matches!(
            authenticate(HookKind::Github, &headers, &body, b"s3cret"),
            Err(Rejection::BadSignature(m)) if m.contains("missing X-Hub-Signature-256")
        ));
        headers.insert(
            "x-hub-signature-256",
            HeaderValue::from_str(&sign(b"wrong", &body)).unwrap(),
        );
        assert!(matches!(
            authenticate(HookKind::Github, &headers, &body, b"s3cret"),
            Err(Rejection::BadSignature(m)) if m.contains("does not match")
        ));
        headers.insert(
            "x-hub-signature-256",
            HeaderValue::from_str(&sign(b"s3cret", &body)).unwrap(),
        );
        assert_eq!(
            authenticate(HookKind::Github, &headers, &body, b"s3cret"),
            Ok(())
        );
        // One changed byte of the body breaks it.
        let mut tampered = body.clone();
        tampered[3] ^= 1;
        assert!(authenticate(HookKind::Github, &headers, &tampered, b"s3cret").is_err());
        let push = parse_push(HookKind::Github, &headers, &body).unwrap();
        assert_eq!(push.branch.as_deref(), Some("main"));
        assert_eq!(push.revision.as_deref(), Some(REV));
        assert!(push.repository_names.contains(&"acme/app".to_string()));
    }

    #[test]
    fn gitea_plain_signature_and_gitlab_token() {
        let body = github_body();
        let mut headers = HeaderMap::new();
        let plain = sign(b"k", &body).trim_start_matches("sha256=").to_owned();
        headers.insert("x-gitea-signature", HeaderValue::from_str(&plain).unwrap());
        headers.insert("x-gitea-event", HeaderValue::from_static("push"));
        assert_eq!(authenticate(HookKind::Gitea, &headers, &body, b"k"), Ok(()));
        assert!(parse_push(HookKind::Gitea, &headers, &body).is_ok());

        let gitlab = serde_json::json!({
            "object_kind": "push", "ref": "refs/heads/dev", "after": REV,
            "project": { "git_http_url": "https://gitlab.example.org/g/app.git" }
        })
        .to_string();
        let mut headers = HeaderMap::new();
        headers.insert("x-gitlab-event", HeaderValue::from_static("Push Hook"));
        headers.insert("x-gitlab-token", HeaderValue::from_static("tok"));
        assert_eq!(
            authenticate(HookKind::Gitlab, &headers, gitlab.as_bytes(), b"tok"),
            Ok(())
        );
        assert!(authenticate(HookKind::Gitlab, &headers, gitlab.as_bytes(), b"tok2").is_err());
        let push = parse_push(HookKind::Gitlab, &headers, gitlab.as_bytes()).unwrap();
        assert_eq!(push.branch.as_deref(), Some("dev"));
    }

    #[test]
    fn pings_tags_deletions_and_garbage() {
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", HeaderValue::from_static("ping"));
        assert!(matches!(
            parse_push(HookKind::Github, &headers, b"{}"),
            Err(Rejection::NotAPush(_))
        ));
        headers.insert("x-github-event", HeaderValue::from_static("push"));
        assert!(matches!(
            parse_push(HookKind::Github, &headers, b"{not json"),
            Err(Rejection::Malformed(m)) if m.contains("not JSON")
        ));
        let short = serde_json::json!({"ref": "refs/heads/main", "after": "abc"}).to_string();
        assert!(matches!(
            parse_push(HookKind::Github, &headers, short.as_bytes()),
            Err(Rejection::Malformed(m)) if m.contains("full commit id")
        ));
        let tag = serde_json::json!({"ref": "refs/tags/v1", "after": REV}).to_string();
        assert_eq!(
            parse_push(HookKind::Github, &headers, tag.as_bytes())
                .unwrap()
                .branch,
            None
        );
        let deleted =
            serde_json::json!({"ref": "refs/heads/x", "after": "0".repeat(40)}).to_string();
        assert_eq!(
            parse_push(HookKind::Github, &headers, deleted.as_bytes())
                .unwrap()
                .revision,
            None
        );
    }

    #[test]
    fn repository_names_normalize() {
        for url in [
            "https://github.com/acme/app.git",
            "https://GitHub.com/acme/app/",
            "git@github.com:acme/app.git",
            "ssh://git@github.com:22/acme/app",
        ] {
            assert_eq!(normalize_repo(url), "github.com/acme/app", "{url}");
        }
        assert_eq!(normalize_repo("file:///srv/git/app.git"), "/srv/git/app");
        assert_eq!(normalize_repo("/srv/git/app.git"), "/srv/git/app");
    }
}
