//! Who may talk to the control plane: the control token, the page's CSRF
//! token, and the `Host` / `Origin` checks that keep other web sites (and DNS
//! rebinding) from changing anything.

use std::fs::Permissions;

use fs_err as fs;
use fs_err::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;

use fs_err::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};

use nightshift_proto::secret::constant_time_eq;

use super::error::ApiError;

/// The name of the generated token file inside the state dir.
pub const TOKEN_FILE_NAME: &str = "control.token";

/// The header the status page sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-nightshift-csrf";

/// The secrets that authorise state-changing requests.
#[derive(Clone)]
pub struct Secrets {
    /// The control token (`Authorization: Bearer …`), for the CLI and scripts.
    token: String,
    /// The token embedded in the status page, derived from the control token.
    csrf: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    pub fn new(token: String) -> Secrets {
        let csrf = derive_csrf(&token);
        Secrets { token, csrf }
    }

    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let Ok(value) = value.to_str() else {
            return false;
        };
        match value.strip_prefix("Bearer ") {
            Some(given) => constant_time_eq(given.trim().as_bytes(), self.token.as_bytes()),
            None => false,
        }
    }

    fn csrf_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), self.csrf.as_bytes()))
    }
}

/// The page token: a hash of the control token under a fixed label, so it is
/// stable across restarts (an open page keeps working) yet does not reveal
/// the control token.
fn derive_csrf(token: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"nightshift control-plane csrf v1\0");
    hasher.update(token.as_bytes());
    hex::encode(hasher.finalize())
}

/// Where the control token lives: the configured `token_file`, else
/// `state_dir/control.token`.
pub fn token_path(token_file: Option<&Path>, state_dir: &Path) -> PathBuf {
    match token_file {
        Some(path) => path.to_path_buf(),
        None => state_dir.join(TOKEN_FILE_NAME),
    }
}

/// Loads the control token for the server: reads the configured
/// `token_file`, or reads (creating it on first start, mode 0600)
/// `state_dir/control.token`.
pub fn load_or_create_token(token_file: Option<&Path>, state_dir: &Path) -> anyhow::Result<String> {
    if let Some(path) = token_file {
        return read_token(path).map_err(|error| {
            anyhow::anyhow!(
                "[control] token_file = {:?}: {error}",
                path.display().to_string()
            )
        });
    }
    let path = state_dir.join(TOKEN_FILE_NAME);
    match read_token(&path) {
        Ok(token) => {
            // Keep the generated token private even if someone loosened it.
            let mode = fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "control token file was readable by others; setting mode 0600");
                fs::set_permissions(&path, Permissions::from_mode(0o600))?;
            }
            Ok(token)
        }
        Err(TokenError::Missing) => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let token = hex::encode(bytes);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|error| anyhow::anyhow!("creating {}: {error}", path.display()))?;
            file.write_all(format!("{token}\n").as_bytes())
                .map_err(|error| anyhow::anyhow!("writing {}: {error}", path.display()))?;
            Ok(token)
        }
        Err(error) => Err(anyhow::anyhow!("{}: {error}", path.display())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token file does not exist")]
    Missing,
    #[error("the token file is empty")]
    Empty,
    #[error("cannot read the token file: {0}")]
    Io(std::io::Error),
}

/// Reads a token file: the first line, trimmed; must not be empty.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = fs::read_to_string(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => TokenError::Missing,
        _ => TokenError::Io(error),
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    Ok(token.to_owned())
}

/// What the guard needs to know about the listener.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub secrets: Secrets,
    /// `[control] allow_remote`: IP-literal `Host` headers and non-loopback
    /// peers (with the bearer token only) are accepted.
    pub allow_remote: bool,
}

/// Whether `host` (a `Host` header value) names this machine's loopback
/// interface: `localhost`, `*.localhost`, `127.x.y.z`, `[::1]`, each with an
/// optional port.
pub fn is_loopback_host(host: &str) -> bool {
    match split_host(host) {
        Some(HostName::Name(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        Some(HostName::Ip(ip)) => ip.is_loopback(),
        None => false,
    }
}

enum HostName<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

/// Splits a `Host` value into the host part, rejecting anything malformed.
fn split_host(host: &str) -> Option<HostName<'_>> {
    if host.is_empty() {
        return None;
    }
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let ip: std::net::Ipv6Addr = inside.parse().ok()?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        if let Some(port) = port {
            port.parse::<u16>().ok()?;
        }
        return Some(HostName::Ip(IpAddr::V6(ip)));
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        port.parse::<u16>().ok()?;
    }
    if let Ok(ip) = name.parse::<std::net::Ipv4Addr>() {
        return Some(HostName::Ip(IpAddr::V4(ip)));
    }
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then_some(HostName::Name(name))
}

fn is_ip_literal_host(host: &str) -> bool {
    matches!(split_host(host), Some(HostName::Ip(_)))
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    MissingHost,
    ForeignHost(String),
    ForeignOrigin(String),
    CrossSite,
    RemoteWithoutToken,
    NoCredentials,
}

impl Refusal {
    fn into_error(self) -> ApiError {
        match self {
            Refusal::MissingHost => ApiError::new(
                StatusCode::BAD_REQUEST,
                "the request has no valid `Host` header",
            ),
            Refusal::ForeignHost(host) => ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "`Host: {host}` is not this machine's loopback address; open the page as http://localhost:<port>/"
                ),
            ),
            Refusal::ForeignOrigin(origin) => ApiError::new(
                StatusCode::FORBIDDEN,
                format!("requests from `Origin: {origin}` may not use the control plane"),
            ),
            Refusal::CrossSite => ApiError::new(
                StatusCode::FORBIDDEN,
                "cross-site requests may not use the control plane",
            ),
            Refusal::RemoteWithoutToken => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "requests from other machines need `Authorization: Bearer <control token>`",
            ),
            Refusal::NoCredentials => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this request changes the agent's state: send `Authorization: Bearer <control token>` (see the state dir's control.token) or use the status page",
            ),
        }
    }
}

/// The whole decision, as a pure function of the request's parts, so it can
/// be tested case by case. `peer` is `None` for the Unix socket.
pub fn check(
    config: &GuardConfig,
    method: &Method,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<(), Refusal> {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .ok_or(Refusal::MissingHost)?;
    let host_ok = is_loopback_host(host) || (config.allow_remote && is_ip_literal_host(host));
    if !host_ok {
        return Err(Refusal::ForeignHost(host.to_owned()));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("<not text>");
        let own = format!("http://{host}");
        if !origin.eq_ignore_ascii_case(&own) {
            return Err(Refusal::ForeignOrigin(origin.to_owned()));
        }
    }
    if headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|site| site.eq_ignore_ascii_case("cross-site"))
    {
        return Err(Refusal::CrossSite);
    }
    let remote = peer.is_some_and(|ip| !ip.is_loopback());
    let bearer = config.secrets.bearer_ok(headers);
    if remote && !bearer {
        return Err(Refusal::RemoteWithoutToken);
    }
    let changes_state = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state && !bearer && !config.secrets.csrf_ok(headers) {
        return Err(Refusal::NoCredentials);
    }
    Ok(())
}

/// The axum middleware around every route.
pub async fn middleware(
    State(config): State<GuardConfig>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    match check(&config, request.method(), request.headers(), peer) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::info!(
                method = %request.method(),
                path = %request.uri().path(),
                ?refusal,
                "control request refused"
            );
            refusal.into_error().into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn config(allow_remote: bool) -> GuardConfig {
        GuardConfig {
            secrets: Secrets::new("s3cret".into()),
            allow_remote,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:7878",
            "LOCALHOST.",
            "app.localhost:80",
            "127.0.0.1",
            "127.0.0.1:7878",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:7878",
        ] {
            assert!(is_loopback_host(host), "{host} should be loopback");
        }
        for host in [
            "",
            "example.com",
            "localhost.example.com",
            "10.0.0.1:7878",
            "[::2]:7878",
            "localhost:99999",
            "localhost:",
            "[::1",
            "::1",
            "127.0.0.1.nip.io",
            "local host",
        ] {
            assert!(!is_loopback_host(host), "{host} should not be loopback");
        }
    }

    #[test]
    fn get_needs_only_a_loopback_host() {
        let config = config(false);
        assert_eq!(
            check(
                &config,
                &Method::GET,
                &headers(&[("host", "localhost:1")]),
                None
            ),
            Ok(())
        );
        assert_eq!(
            check(&config, &Method::GET, &headers(&[]), None),
            Err(Refusal::MissingHost)
        );
        assert_eq!(
            check(
                &config,
                &Method::GET,
                &headers(&[("host", "evil.example:7878")]),
                None
            ),
            Err(Refusal::ForeignHost("evil.example:7878".into()))
        );
    }

    #[test]
    fn post_needs_a_token_or_the_csrf_token() {
        let config = config(false);
        let host = ("host", "127.0.0.1:7878");
        assert_eq!(
            check(&config, &Method::POST, &headers(&[host]), None),
            Err(Refusal::NoCredentials)
        );
        assert_eq!(
            check(
                &config,
                &Method::POST,
                &headers(&[host, ("authorization", "Bearer wrong")]),
                None
            ),
            Err(Refusal::NoCredentials)
        );
        assert_eq!(
            check(
                &config,
                &Method::POST,
                &headers(&[host, ("authorization", "Bearer s3cret")]),
                None
            ),
            Ok(())
        );
        let csrf = config.secrets.csrf().to_owned();
        assert_ne!(csrf, "s3cret");
        assert_eq!(
            check(
                &config,
                &Method::POST,
                &headers(&[host, (CSRF_HEADER, &csrf)]),
                None
            ),
            Ok(())
        );
        // The control token is not a CSRF token and vice versa.
        assert_eq!(
            check(
                &config,
                &Method::POST,
                &headers(&[host, (CSRF_HEADER, "s3cret")]),
                None
            ),
            Err(Refusal::NoCredentials)
        );
        assert_eq!(
            check(
                &config,
                &Method::POST,
                &headers(&[host, ("authorization", &format!("Bearer {csrf}"))]),
                None
            ),
            Err(Refusal::NoCredentials)
        );
    }

    #[test]
    fn foreign_origin_is_refused_even_with_a_token() {
        let config = config(false);
        let base = [
            ("host", "localhost:7878"),
            ("authorization", "Bearer s3cret"),
        ];
        let mut map = headers(&base);
        map.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(
            check(&config, &Method::POST, &map, None),
            Err(Refusal::ForeignOrigin("https://evil.example".into()))
        );
        map.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(check(&config, &Method::POST, &map, None).is_err());
        map.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:7879"),
        );
        assert!(check(&config, &Method::POST, &map, None).is_err());
        map.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:7878"),
        );
        assert_eq!(check(&config, &Method::POST, &map, None), Ok(()));
        map.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert_eq!(
            check(&config, &Method::POST, &map, None),
            Err(Refusal::CrossSite)
        );
    }

    #[test]
    fn remote_peers_need_the_bearer_token_and_allow_remote() {
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        let host = ("host", "192.0.2.1:7878");
        assert!(matches!(
            check(
                &config(false),
                &Method::GET,
                &headers(&[host]),
                Some(remote)
            ),
            Err(Refusal::ForeignHost(_))
        ));
        let config = config(true);
        assert_eq!(
            check(&config, &Method::GET, &headers(&[host]), Some(remote)),
            Err(Refusal::RemoteWithoutToken)
        );
        let csrf = config.secrets.csrf().to_owned();
        assert_eq!(
            check(
                &config,
                &Method::POST,
                &headers(&[host, (CSRF_HEADER, &csrf)]),
                Some(remote)
            ),
            Err(Refusal::RemoteWithoutToken)
        );
        assert_eq!(
            check(
                &config,
                &Method::GET,
                &headers(&[host, ("authorization", "Bearer s3cret")]),
                Some(remote)
            ),
            Ok(())
        );
        // Names other than localhost stay refused: DNS rebinding needs a name.
        assert!(matches!(
            check(
                &config,
                &Method::GET,
                &headers(&[
                    ("host", "rebind.example:7878"),
                    ("authorization", "Bearer s3cret")
                ]),
                Some(remote)
            ),
            Err(Refusal::ForeignHost(_))
        ));
    }

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_token(None, dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let mode = fs::metadata(dir.path().join(TOKEN_FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(None, dir.path()).unwrap(), first);
        assert_eq!(
            read_token(&dir.path().join(TOKEN_FILE_NAME)).unwrap(),
            first
        );
    }

    #[test]
    fn configured_token_file_must_exist_and_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        let error = load_or_create_token(Some(&path), dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("token_file"), "{error}");
        fs::write(&path, "\n").unwrap();
        let error = load_or_create_token(Some(&path), dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("empty"), "{error}");
        fs::write(&path, "  abc \n").unwrap();
        assert_eq!(
            load_or_create_token(Some(&path), dir.path()).unwrap(),
            "abc"
        );
    }
}
