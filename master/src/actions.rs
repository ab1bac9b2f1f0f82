//! What a logged-in admin can do from the dashboard and the build page:
//! cancel a build, rebuild one (same builder, revision and properties), and
//! pause or resume the farm. Each is a form `POST` that passes
//! [`crate::session::authorize_form`] (same origin, a session, its CSRF
//! token) and goes through the same scheduler paths as the admin API; the
//! answer is a redirect to the page that shows the result.

use std::fmt::Write;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nightshift_proto::api::{BuildInfo, BuildState};
use nightshift_proto::wire::BuildId;
use tokio::sync::oneshot;

use crate::scheduler::Event;
use crate::session::{CsrfForm, Refusal, Viewer, authorize_form};
use crate::state::AppState;
use crate::store::NewBuild;
use nightshift_proto::html::escape;

fn redirect(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn fail(status: StatusCode, why: String) -> Response {
    Refusal::new(status, why).into_response()
}

fn parse_id(text: &str) -> Result<BuildId, Refusal> {
    text.parse().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("bad build id `{text}`: expected a number"),
        )
    })
}

/// Checks the form (same origin, session, CSRF) before anything is read.
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<(), Refusal> {
    let csrf = form.ok().and_then(|Form(f)| f.csrf);
    authorize_form(state, headers, csrf.as_deref()).map(|_| ())
}

/// `POST /builds/{id}/cancel`.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if let Err(refused) = authorize(&state, &headers, form) {
        return refused.into_response();
    }
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(bad) => return bad.into_response(),
    };
    let (reply, answer) = oneshot::channel();
    let reason = "cancelled from the dashboard".to_owned();
    if state
        .events
        .send(Event::Cancel { id, reason, reply })
        .is_err()
    {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into());
    }
    match answer.await {
        Ok(Ok(())) => {
            tracing::info!("dashboard: build {id} cancelled");
            redirect(&format!("/builds/{id}"))
        }
        Ok(Err(why)) => fail(StatusCode::CONFLICT, format!("cannot cancel: {why}")),
        Err(_) => fail(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into()),
    }
}

/// `POST /builds/{id}/rebuild`: a new request of the same builder with the
/// same properties and, for a builder with a source, the same revision.
pub async fn rebuild(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if let Err(refused) = authorize(&state, &headers, form) {
        return refused.into_response();
    }
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(bad) => return bad.into_response(),
    };
    let old = match state.store.get_build(id).await {
        Ok(Some(build)) => build,
        Ok(None) => return fail(StatusCode::NOT_FOUND, format!("no build {id}")),
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let build = match rebuild_request(&state.config.get(), &old) {
        Ok(build) => build,
        Err(why) => return fail(StatusCode::CONFLICT, why),
    };
    match crate::triggers::queue_builds(&state.store, &state.events, vec![build], Vec::new()).await
    {
        Ok(ids) => match ids.first() {
            Some(new) => {
                tracing::info!("dashboard: build {id} rebuilt as build {new}");
                redirect(&format!("/builds/{new}"))
            }
            None => fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no build id returned".into(),
            ),
        },
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// The request that builds `old` again under `config`: its builder, its
/// properties, its branch and revision (checked out the builder's way now).
pub fn rebuild_request(
    config: &crate::config::MasterConfig,
    old: &BuildInfo,
) -> Result<NewBuild, String> {
    let builder = config.builder(&old.builder).ok_or_else(|| {
        format!(
            "cannot rebuild: builder `{}` is no longer in master.toml",
            old.builder
        )
    })?;
    let source = match (&builder.source, &old.branch, &old.revision) {
        (Some(_), Some(branch), Some(revision)) => {
            crate::triggers::source_for(builder, branch, revision)
        }
        (Some(_), _, _) => {
            return Err(format!(
                "cannot rebuild: build {} has no revision, and builder `{}` now checks out a \
                 source; submit a new build instead",
                old.id, old.builder
            ));
        }
        (None, _, _) => None,
    };
    Ok(NewBuild {
        builder: builder.name.clone(),
        properties: old.properties.clone(),
        source,
        trigger: format!("rebuild of #{}", old.id),
    })
}

async fn set_paused(
    state: AppState,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
    paused: bool,
) -> Response {
    if let Err(refused) = authorize(&state, &headers, form) {
        return refused.into_response();
    }
    match crate::api::set_paused(&state, paused).await {
        Ok(_) => {
            tracing::info!(
                "dashboard: farm {}",
                if paused { "paused" } else { "resumed" }
            );
            redirect("/")
        }
        Err(failure) => failure.into_response(),
    }
}

/// `POST /farm/pause`.
pub async fn pause(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    set_paused(state, headers, form, true).await
}

/// `POST /farm/resume`.
pub async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    set_paused(state, headers, form, false).await
}

/// A one-button form posting to `action` with the session's CSRF token.
pub fn button(action: &str, label: &str, id: &str, class: &str, csrf: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"act\"><input type=\"hidden\" name=\"csrf\" \
         value=\"{}\"><button type=\"submit\" id=\"{}\" class=\"{}\">{}</button></form>",
        escape(action),
        escape(csrf),
        escape(id),
        escape(class),
        escape(label)
    )
}

/// The log in / log out line of a page for `viewer`; `here` is the page's
/// path (where a login returns to).
pub fn account_html(viewer: &Viewer, here: &str) -> String {
    match &viewer.csrf {
        Some(csrf) => format!(
            "<span class=\"account\">logged in {}</span>",
            button("/logout", "Log out", "logout", "quiet", csrf)
        ),
        None if viewer.authenticated => String::new(),
        None => format!(
            "<span class=\"account\"><a href=\"/login?next={}\" id=\"login-link\">Log in</a> to \
             act</span>",
            escape(here)
        ),
    }
}

/// The build page's actions for `viewer`: cancel while it is queued or
/// running, rebuild once it finished; a login link without a session.
pub fn build_controls(build: &BuildInfo, viewer: &Viewer) -> String {
    let mut html = String::from("<div class=\"controls\">");
    if let Some(csrf) = &viewer.csrf {
        if build.state == BuildState::Finished {
            html.push_str(&button(
                &format!("/builds/{}/rebuild", build.id),
                "Rebuild",
                "rebuild",
                "",
                csrf,
            ));
        } else {
            html.push_str(&button(
                &format!("/builds/{}/cancel", build.id),
                "Cancel build",
                "cancel",
                "danger",
                csrf,
            ));
        }
    }
    let _ = write!(
        html,
        "{}</div>",
        account_html(viewer, &format!("/builds/{}", build.id))
    );
    html
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::config::MasterConfig;

    fn build(state: BuildState) -> BuildInfo {
        BuildInfo {
            id: 7,
            builder: "app".to_owned(),
            properties: BTreeMap::from([("mode".to_owned(), "release".to_owned())]),
            state,
            worker: None,
            outcome: None,
            retries: 0,
            retry_reason: None,
            waiting_for: None,
            estimate_secs: None,
            reason: None,
            submitted_at: "2026-11-23T13:00:00Z".parse().unwrap(),
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
            repository: Some("file:///srv/app.git".to_owned()),
            branch: Some("main".to_owned()),
            revision: Some("a".repeat(40)),
            trigger: None,
            collapsed_into: None,
            artifacts: Vec::new(),
        }
    }

    fn config(extra: &str) -> MasterConfig {
        let text = format!(
            "[[worker]]\nname = \"w\"\ntoken_sha256 = \"{}\"\n{extra}",
            "a".repeat(64)
        );
        MasterConfig::parse(&text, Path::new("master.toml"), Path::new("/tmp")).unwrap()
    }

    #[test]
    fn a_rebuild_keeps_builder_revision_and_properties() {
        let config = config(
            "[[builder]]\nname = \"app\"\nworkers = [\"w\"]\n\
             source = { repo = \"file:///srv/app.git\", mode = \"fresh\" }\n\
             steps = [{ name = \"s\", command = \"true\" }]\n",
        );
        let request = rebuild_request(&config, &build(BuildState::Finished)).unwrap();
        assert_eq!(request.builder, "app");
        assert_eq!(request.properties["mode"], "release");
        assert_eq!(request.trigger, "rebuild of #7");
        let source = request.source.unwrap();
        assert_eq!(source.revision, "a".repeat(40));
        assert_eq!(source.branch, "main");

        let gone = rebuild_request(&config_without_app(), &build(BuildState::Finished));
        assert!(gone.unwrap_err().contains("no longer in master.toml"));

        let mut unsourced = build(BuildState::Finished);
        unsourced.revision = None;
        let why = rebuild_request(&config, &unsourced).unwrap_err();
        assert!(why.contains("has no revision"), "{why}");
    }

    fn config_without_app() -> MasterConfig {
        config("")
    }

    #[test]
    fn controls_need_a_session_and_carry_its_csrf_token() {
        let nobody = Viewer::default();
        let html = build_controls(&build(BuildState::Running), &nobody);
        assert!(!html.contains("<form"), "{html}");
        assert!(html.contains("href=\"/login?next=/builds/7\""), "{html}");

        let bearer = Viewer {
            authenticated: true,
            csrf: None,
        };
        assert!(!build_controls(&build(BuildState::Running), &bearer).contains("<form"));

        let session = Viewer {
            authenticated: true,
            csrf: Some("t0k\"en".to_owned()),
        };
        let running = build_controls(&build(BuildState::Running), &session);
        assert!(running.contains("action=\"/builds/7/cancel\""), "{running}");
        assert!(
            running.contains("name=\"csrf\" value=\"t0k&quot;en\""),
            "{running}"
        );
        assert!(!running.contains("rebuild"));
        assert!(running.contains("action=\"/logout\""));
        let finished = build_controls(&build(BuildState::Finished), &session);
        assert!(
            finished.contains("action=\"/builds/7/rebuild\""),
            "{finished}"
        );
        assert!(!finished.contains("/cancel"));
    }
}
