//! Dashboard logins: the admin token exchanged for a session cookie (random
//! id, `HttpOnly`, `SameSite=Strict`, `Secure` on the TLS port), server-side
//! sessions bounded in number with an expiry, each with its own CSRF token;
//! the same-origin check every dashboard form passes; and the gate in front
//! of the dashboard's pages, which sends a viewer without a session to
//! `/login` when `dashboard = "login"`.

use std::fmt::Write;
use std::time::{Duration, Instant};

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use crate::config::{DashboardAccess, TlsMode};
use crate::logins::SESSION_LIFETIME;
use crate::state::{AppState, is_admin, is_admin_token};
use crate::style::STYLE;
use nightshift_proto::html::escape;
use nightshift_proto::secret::constant_time_eq;

/// The cookie's name on the TLS port (`__Host-`: the browser keeps it only
/// when it is `Secure`, for this host, for path `/`).
const SECURE_COOKIE: &str = "__Host-nightshift_session";
/// The cookie's name on a plain-HTTP master (`insecure = true`).
const PLAIN_COOKIE: &str = "nightshift_session";

/// Who is looking at a dashboard page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Viewer {
    /// Logged in (a session, or the admin token as a bearer token).
    pub authenticated: bool,
    /// The session's CSRF token: only a session may act from the page.
    pub csrf: Option<String>,
}

fn tls_on(state: &AppState) -> bool {
    state.config.get().tls != TlsMode::Insecure
}

fn cookie_name(tls: bool) -> &'static str {
    if tls { SECURE_COOKIE } else { PLAIN_COOKIE }
}

/// The value of cookie `name` among the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
}

/// The session id the request's cookie names, when that session is live,
/// with its CSRF token.
fn session_of(state: &AppState, headers: &HeaderMap) -> Option<(String, String)> {
    let id = cookie(headers, cookie_name(tls_on(state)))?;
    let csrf = state.sessions.csrf_of(id, Instant::now())?;
    Some((id.to_owned(), csrf))
}

/// Whether `next` is a path on this site (not `//host`, not a URL), so a
/// login link cannot send the browser elsewhere.
pub fn local_path(next: &str) -> Option<&str> {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control);
    ok.then_some(next)
}

/// Percent-encodes a path for a query value.
fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn see_other(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// In front of `/`, `/builds/{id}` and its events: finds the viewer (a
/// session cookie, or the admin bearer token) and, when the dashboard is
/// `login`, sends anyone else to `/login` (the event stream answers 401).
pub async fn gate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let viewer = match session_of(&state, request.headers()) {
        Some((_, csrf)) => Viewer {
            authenticated: true,
            csrf: Some(csrf),
        },
        None => Viewer {
            authenticated: is_admin(&state, request.headers()),
            csrf: None,
        },
    };
    if !viewer.authenticated && state.config.get().dashboard == DashboardAccess::Login {
        let path = request.uri().path();
        if path.ends_with("/events") {
            return (
                StatusCode::UNAUTHORIZED,
                "log in first: this master's dashboard is `login` (open /login)",
            )
                .into_response();
        }
        let wanted = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        return see_other(&format!("/login?next={}", query_value(&wanted)));
    }
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

/// Whether a state-changing request comes from a page of this master:
/// `Sec-Fetch-Site` (when sent) says same-origin, and `Origin` — or, when a
/// browser left it out, `Referer` — names the scheme and `Host` it was sent
/// to. Errors say what was wrong.
pub fn same_origin(headers: &HeaderMap, tls: bool) -> Result<(), String> {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| "a header that is not text".to_owned())
            })
            .transpose()
    };
    let host = text(header::HOST)?.ok_or("no Host header")?;
    let scheme = if tls { "https" } else { "http" };
    let expected = format!("{scheme}://{}", host.to_ascii_lowercase());
    if let Some(site) = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .filter(|site| *site != "same-origin")
    {
        return Err(format!(
            "cross-site request refused (Sec-Fetch-Site: {site}): use the form on this dashboard"
        ));
    }
    if let Some(origin) = text(header::ORIGIN)? {
        return if origin.to_ascii_lowercase() == expected {
            Ok(())
        } else {
            Err(format!(
                "cross-origin request refused: Origin `{origin}` is not this dashboard ({expected})"
            ))
        };
    }
    match text(header::REFERER)? {
        Some(referer) => {
            let referer = referer.to_ascii_lowercase();
            if referer == expected || referer.starts_with(&format!("{expected}/")) {
                Ok(())
            } else {
                Err(format!(
                    "cross-origin request refused: it came from `{referer}`, not this dashboard \
                     ({expected})"
                ))
            }
        }
        None => Err(
            "no Origin or Referer header: cannot tell that the form came from this dashboard"
                .into(),
        ),
    }
}

/// A form post that did nothing: its status and the reason, sent as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub why: String,
}

impl Refusal {
    pub fn new(status: StatusCode, why: impl Into<String>) -> Refusal {
        Refusal {
            status,
            why: why.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let text = if self.status == StatusCode::FORBIDDEN {
            tracing::warn!("dashboard: refused: {}", self.why);
            format!("refused: {}\n", self.why)
        } else {
            format!("{}\n", self.why)
        };
        (self.status, [(header::CACHE_CONTROL, "no-store")], text).into_response()
    }
}

/// A refused action or login: 403 with the reason.
pub fn forbidden(why: &str) -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, why)
}

/// The session behind a form post, checked in full: same origin, a live
/// session cookie, and the session's CSRF token in the form. Returns the
/// session id.
pub fn authorize_form(
    state: &AppState,
    headers: &HeaderMap,
    form_csrf: Option<&str>,
) -> Result<String, Refusal> {
    same_origin(headers, tls_on(state)).map_err(|why| forbidden(&why))?;
    let Some((id, csrf)) = session_of(state, headers) else {
        return Err(forbidden(
            "no session: log in at /login first (actions need a login even on a public dashboard)",
        ));
    };
    match form_csrf {
        Some(given) if constant_time_eq(given.as_bytes(), csrf.as_bytes()) => Ok(id),
        Some(_) => Err(forbidden(
            "the form's CSRF token is not this session's: reload the page and try again",
        )),
        None => Err(forbidden("the form has no CSRF token")),
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct NextQuery {
    next: Option<String>,
}

/// `GET /login`: the form (or straight on, for a browser already logged in).
pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<NextQuery>, QueryRejection>,
) -> Response {
    let next = query
        .ok()
        .and_then(|Query(q)| q.next)
        .filter(|n| local_path(n).is_some())
        .unwrap_or_else(|| "/".to_owned());
    if session_of(&state, &headers).is_some() {
        return see_other(&next);
    }
    login_html(StatusCode::OK, &next, None, state.config.get().dashboard)
}

fn login_html(
    status: StatusCode,
    next: &str,
    error: Option<&str>,
    access: DashboardAccess,
) -> Response {
    let mut html = String::with_capacity(4096);
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Log in · nightshift</title><style>{STYLE}</style></head><body><div class=\"wrap\">\
         <header class=\"top\"><h1><span class=\"brand\">nightshift</span> log in</h1></header>\
         <section class=\"card\">"
    );
    if let Some(error) = error {
        let _ = write!(
            html,
            "<p class=\"error\" role=\"alert\" id=\"login-error\">{}</p>",
            escape(error)
        );
    }
    let _ = write!(
        html,
        "<form method=\"post\" action=\"/login\" class=\"login\">\
         <input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" \
         autocomplete=\"current-password\" required autofocus></label> \
         <button type=\"submit\" id=\"login\">Log in</button></form>\
         <p class=\"soft\">The admin token is in <code>data_dir/admin.token</code> on the master \
         (or the one whose SHA-256 is <code>admin_token_sha256</code> in master.toml). \
         {}</p></section></div></body></html>",
        if access == DashboardAccess::Login {
            "This dashboard is visible only after a login (<code>dashboard = \"login\"</code>)."
        } else {
            "Anyone may read this dashboard; cancelling, rebuilding and pausing need a login."
        },
        next = escape(next),
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /login`: the admin token for a session cookie.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let tls = tls_on(&state);
    if let Err(why) = same_origin(&headers, tls) {
        return forbidden(&why).into_response();
    }
    let access = state.config.get().dashboard;
    let Ok(Form(form)) = form else {
        return login_html(
            StatusCode::BAD_REQUEST,
            "/",
            Some("the login form was not understood: send `token` (and `next`) as a form"),
            access,
        );
    };
    let next = local_path(&form.next).unwrap_or("/").to_owned();
    let token = form.token.trim();
    if !is_admin_token(&state, token) {
        tracing::warn!("dashboard: a login with a wrong admin token");
        return login_html(
            StatusCode::FORBIDDEN,
            &next,
            Some("wrong admin token"),
            access,
        );
    }
    // A fixed session id would survive the login: any old one ends here.
    if let Some(old) = cookie(&headers, cookie_name(tls)) {
        state.sessions.remove(old);
    }
    let session = state.sessions.create(Instant::now());
    tracing::info!("dashboard: logged in ({} sessions)", state.sessions.len());
    let mut response = see_other(&next);
    if let Ok(value) = HeaderValue::from_str(&set_cookie(tls, &session.id, SESSION_LIFETIME)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The `Set-Cookie` value of a session (`max_age` zero clears it).
pub fn set_cookie(tls: bool, id: &str, max_age: Duration) -> String {
    format!(
        "{}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        cookie_name(tls),
        max_age.as_secs(),
        if tls { "; Secure" } else { "" }
    )
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    pub csrf: Option<String>,
}

/// `POST /logout`: ends the session (same checks as every action).
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let csrf = form.ok().and_then(|Form(f)| f.csrf);
    let id = match authorize_form(&state, &headers, csrf.as_deref()) {
        Ok(id) => id,
        Err(refused) => return refused.into_response(),
    };
    state.sessions.remove(&id);
    let tls = tls_on(&state);
    let mut response = see_other(match state.config.get().dashboard {
        DashboardAccess::Login => "/login",
        DashboardAccess::Public => "/",
    });
    if let Ok(value) = HeaderValue::from_str(&set_cookie(tls, "", Duration::ZERO)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The viewer the gate found (a page outside the gate sees nobody).
pub fn viewer(extension: Option<Extension<Viewer>>) -> Viewer {
    extension.map(|Extension(v)| v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn cookies_are_found_among_several() {
        let h = headers(&[("cookie", "a=1; nightshift_session=abc"), ("cookie", "b=2")]);
        assert_eq!(cookie(&h, "nightshift_session"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn the_session_cookie_is_http_only_strict_and_secure_on_tls() {
        assert_eq!(
            set_cookie(true, "x", SESSION_LIFETIME),
            "__Host-nightshift_session=x; Path=/; Max-Age=43200; HttpOnly; SameSite=Strict; Secure"
        );
        assert_eq!(
            set_cookie(false, "", Duration::ZERO),
            "nightshift_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
        );
    }

    #[test]
    fn only_same_origin_forms_pass() {
        let ok = headers(&[
            ("host", "ci.example:8443"),
            ("origin", "https://ci.example:8443"),
        ]);
        assert_eq!(same_origin(&ok, true), Ok(()));
        // The scheme counts.
        assert!(
            same_origin(&ok, false)
                .unwrap_err()
                .contains("not this dashboard")
        );
        let evil = headers(&[
            ("host", "ci.example:8443"),
            ("origin", "https://evil.example"),
        ]);
        let why = same_origin(&evil, true).unwrap_err();
        assert!(why.contains("Origin `https://evil.example`"), "{why}");
        let null = headers(&[("host", "ci.example"), ("origin", "null")]);
        assert!(same_origin(&null, true).is_err());
        let referer = headers(&[
            ("host", "ci.example"),
            ("referer", "https://ci.example/builds/3"),
        ]);
        assert_eq!(same_origin(&referer, true), Ok(()));
        let lookalike = headers(&[
            ("host", "ci.example"),
            ("referer", "https://ci.example.evil/builds/3"),
        ]);
        assert!(same_origin(&lookalike, true).is_err());
        let neither = headers(&[("host", "ci.example")]);
        assert!(
            same_origin(&neither, true)
                .unwrap_err()
                .contains("no Origin or Referer")
        );
        let cross_site = headers(&[
            ("host", "ci.example"),
            ("origin", "https://ci.example"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(
            same_origin(&cross_site, true)
                .unwrap_err()
                .contains("Sec-Fetch-Site")
        );
        assert!(
            same_origin(&headers(&[]), true)
                .unwrap_err()
                .contains("no Host")
        );
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(local_path("/builds/3"), Some("/builds/3"));
        assert_eq!(local_path("//evil.example/"), None);
        assert_eq!(local_path("https://evil.example/"), None);
        assert_eq!(local_path("/\\evil.example"), None);
        assert_eq!(query_value("/builds/3?x=1"), "/builds/3%3Fx%3D1");
    }
}
