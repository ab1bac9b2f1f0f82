//! The master's HTTP JSON API under [`API_PREFIX`]: request and response
//! shapes shared by the master, its CLI (`--json` prints these) and the tests.
//!
//! Every request carries the admin token as `Authorization: Bearer <token>`.
//! Errors come back as [`ApiError`] with a 4xx/5xx status.

use std::collections::BTreeMap;

use jiff::Timestamp;
use nightshift_policy::{PresenceState, Source};
use serde::{Deserialize, Serialize};

use crate::wire::{BuildId, Outcome, StepResult};

/// Prefix of every API path.
pub const API_PREFIX: &str = "/api/v1";

/// `POST /api/v1/builds`: queue a build of `builder`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub builder: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Build this exact commit (full hex id) of the builder's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Build the head of this branch (resolved by the master with
    /// `git ls-remote` when no `revision` is given); default: the builder's
    /// `source.branch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

/// The answer to a submit: the request is committed to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub build_id: BuildId,
}

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for a worker (or handed out and not yet accepted).
    Queued,
    /// Handed to a worker.
    Running,
    /// Ended; `outcome` says how.
    Finished,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Finished => "finished",
        }
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BuildState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(BuildState::Queued),
            "running" => Ok(BuildState::Running),
            "finished" => Ok(BuildState::Finished),
            other => Err(format!("unknown build state `{other}`")),
        }
    }
}

/// One build as `master builds` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub id: BuildId,
    pub builder: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub state: BuildState,
    /// The worker it runs or ran on.
    #[serde(default)]
    pub worker: Option<String>,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// How many times it was re-queued after a worker lost it.
    pub retries: u32,
    /// Why it was last re-queued.
    #[serde(default)]
    pub retry_reason: Option<String>,
    /// What a queued build waits for, e.g. `no available worker: b1 away`.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Why it was cancelled, when it was.
    #[serde(default)]
    pub reason: Option<String>,
    pub submitted_at: Timestamp,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub steps: Vec<StepResult>,
    /// The builder's estimated duration in seconds (a high percentile of its
    /// recent successful builds) for a queued or running build, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_secs: Option<u64>,
    /// The repository, branch and revision it builds (builders with a source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// What queued it: `submit`, `webhook <name>`, `poll`, `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// A newer request for the same builder and branch that this waiting one
    /// was collapsed into (it then ended `cancelled` without running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapsed_into: Option<BuildId>,
    /// The files the build uploaded (`artifacts` of its builder), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactInfo>,
}

/// One stored artifact of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// Its path relative to the build directory, e.g. `dist/x.tar.gz`.
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the content, verified by the master.
    pub sha256: String,
    pub stored_at: Timestamp,
}

/// `GET /api/v1/builds/{id}/artifacts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactList {
    pub build_id: BuildId,
    pub artifacts: Vec<ArtifactInfo>,
}

/// `GET /api/v1/builds`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildList {
    pub builds: Vec<BuildInfo>,
}

/// `GET /api/v1/builds/{id}/log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildLog {
    pub build_id: BuildId,
    pub log: String,
}

/// One worker as `master workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub state: PresenceState,
    pub reason: String,
    #[serde(default)]
    pub source: Option<Source>,
    #[serde(default)]
    pub since: Option<Timestamp>,
    #[serde(default)]
    pub until: Option<Timestamp>,
    pub connected: bool,
    pub max_builds: u32,
    pub running: Vec<BuildId>,
    /// For a latent (on-demand) worker: where its instance is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentInfo>,
}

/// A latent worker's instance as `master workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentInfo {
    /// `stopped`, `starting`, `running`, `lingering` or `stopping`.
    pub state: String,
    pub reason: String,
    pub since: Timestamp,
    /// When a back-off after a failed start (or a "not now") ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Timestamp>,
    /// `command`, `process`, …
    pub provider: String,
}

/// `GET /api/v1/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub paused: bool,
    pub workers: Vec<WorkerInfo>,
}

/// Largest page `GET /api/v1/workers` returns (also its default).
pub const MAX_WORKER_PAGE: usize = 1000;

/// `GET /api/v1/workers?state=…&name=…&offset=…&limit=…`: which workers, and
/// which page of them (in name order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerQuery {
    /// Only workers in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PresenceState>,
    /// Only workers whose name contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Skip this many matching workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    /// At most this many (1 to [`MAX_WORKER_PAGE`]; default the maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl WorkerQuery {
    /// The query string (without `?`), percent-encoded.
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(state) = self.state {
            parts.push(format!("state={}", state.as_str()));
        }
        if let Some(name) = &self.name {
            parts.push(format!("name={}", percent_encode(name)));
        }
        if let Some(offset) = self.offset {
            parts.push(format!("offset={offset}"));
        }
        if let Some(limit) = self.limit {
            parts.push(format!("limit={limit}"));
        }
        parts.join("&")
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The answer of `GET /api/v1/workers`: a [`WorkerList`] (same fields) plus
/// how many workers matched and where this page starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerPage {
    pub paused: bool,
    pub workers: Vec<WorkerInfo>,
    /// Workers matching the query, all pages together.
    pub total: usize,
    pub offset: usize,
    /// Workers by state, over all workers (not only this page or filter).
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
}

/// `POST /api/v1/pause` and `/resume`: the master's state afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseState {
    pub paused: bool,
}

/// `POST /api/v1/reconfig`: what the reload changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconfigResponse {
    /// One line per change (`builders changed: app`), or `no changes`.
    pub changes: Vec<String>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// Where a master's API is: scheme, host and port of `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl MasterUrl {
    /// Parses `https://host:port` or `http://host:port` (a path is ignored;
    /// `wss://`/`ws://` are accepted as their HTTP twins).
    pub fn parse(url: &str) -> anyhow::Result<MasterUrl> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else {
            anyhow::bail!(
                "master URL `{url}` must start with https:// (or http:// for an insecure master)"
            );
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow::anyhow!("master URL `{url}`: unclosed `[` in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => port
                    .parse()
                    .map_err(|_| anyhow::anyhow!("master URL `{url}`: bad port"))?,
                None => default_port,
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_owned(),
                    port.parse()
                        .map_err(|_| anyhow::anyhow!("master URL `{url}`: bad port `{port}`"))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            anyhow::bail!("master URL `{url}` has no host");
        }
        Ok(MasterUrl { tls, host, port })
    }
}

impl std::fmt::Display for MasterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A failed API call: the HTTP status when the master answered, and its message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiCallError {
    pub status: Option<u16>,
    pub message: String,
}

impl ApiCallError {
    pub(crate) fn io(url: &MasterUrl, what: impl std::fmt::Display) -> ApiCallError {
        ApiCallError {
            status: None,
            message: format!("cannot reach the master at {url}: {what}"),
        }
    }
}

/// A typed client of the master's API: one connection per call (the CLI
/// makes one or two calls per run), HTTP/1.1 over rustls or plain TCP.
#[derive(Clone)]
pub struct ApiClient {
    url: MasterUrl,
    token: String,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Shows where the client points, never its token.
impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("url", &self.url.to_string())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `tls` is required for an `https://` URL.
    pub fn new(
        url: MasterUrl,
        token: String,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<ApiClient> {
        if url.tls && tls.is_none() {
            anyhow::bail!("{url} is https: say how to trust its certificate (CA file or pin)");
        }
        Ok(ApiClient { url, token, tls })
    }

    pub fn url(&self) -> &MasterUrl {
        &self.url
    }

    /// A request to `path` carrying the Host and the token.
    pub fn request(&self, method: &str, path: &str) -> hyper::http::request::Builder {
        let host_header = self.url.to_string();
        let host_header = host_header
            .split("://")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host_header)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
    }

    /// Sends one request on a new connection and returns the response with
    /// its body still streaming (uploads and downloads never hold a whole
    /// file in memory).
    pub async fn send<B>(
        &self,
        request: hyper::Request<B>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ApiCallError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use hyper_util::rt::TokioIo;

        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| ApiCallError::io(&self.url, e))?;
        let _ = tcp.set_nodelay(true);

        async fn exchange<S, B>(
            io: S,
            request: hyper::Request<B>,
        ) -> Result<hyper::Response<hyper::body::Incoming>, String>
        where
            S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
            B: hyper::body::Body + Send + 'static,
            B::Data: Send,
            B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())
        }

        let result = match &self.tls {
            Some(config) if self.url.tls => {
                let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|e| ApiCallError::io(&self.url, e))?;
                let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ApiCallError::io(&self.url, e))?;
                exchange(TokioIo::new(stream), request).await
            }
            _ => exchange(TokioIo::new(tcp), request).await,
        };
        result.map_err(|e| ApiCallError::io(&self.url, e))
    }

    /// One request; returns the status and body text.
    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), ApiCallError> {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;

        let request = self
            .request(method, path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiCallError {
                status: None,
                message: format!("bad request: {e}"),
            })?;
        let response = self.send(request).await?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiCallError::io(&self.url, e))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    pub(crate) async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T, ApiCallError> {
        let (status, text) = self.call_raw(method, path, body).await?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(ApiCallError {
                status: Some(status),
                message: format!("master answered {status}: {message}"),
            });
        }
        serde_json::from_str(&text).map_err(|e| ApiCallError {
            status: Some(status),
            message: format!("unexpected answer from the master: {e}"),
        })
    }

    pub async fn submit(
        &self,
        builder: &str,
        properties: BTreeMap<String, String>,
    ) -> Result<SubmitResponse, ApiCallError> {
        self.submit_request(&SubmitRequest {
            builder: builder.to_owned(),
            properties,
            revision: None,
            branch: None,
        })
        .await
    }

    /// Queues a build with every option of [`SubmitRequest`].
    pub async fn submit_request(
        &self,
        request: &SubmitRequest,
    ) -> Result<SubmitResponse, ApiCallError> {
        let body = serde_json::to_string(request).map_err(|e| ApiCallError {
            status: None,
            message: e.to_string(),
        })?;
        self.call("POST", &format!("{API_PREFIX}/builds"), Some(body))
            .await
    }

    pub async fn builds(&self, limit: u32) -> Result<BuildList, ApiCallError> {
        self.call("GET", &format!("{API_PREFIX}/builds?limit={limit}"), None)
            .await
    }

    pub async fn build(&self, id: BuildId) -> Result<BuildInfo, ApiCallError> {
        self.call("GET", &format!("{API_PREFIX}/builds/{id}"), None)
            .await
    }

    /// Long poll: the build once finished, or as it is after `timeout_secs`.
    pub async fn wait(&self, id: BuildId, timeout_secs: u64) -> Result<BuildInfo, ApiCallError> {
        self.call(
            "GET",
            &format!("{API_PREFIX}/builds/{id}/wait?timeout_secs={timeout_secs}"),
            None,
        )
        .await
    }

    /// Waits until the build is finished (successive long polls).
    pub async fn wait_finished(&self, id: BuildId) -> Result<BuildInfo, ApiCallError> {
        loop {
            let build = self.wait(id, 60).await?;
            if build.state == BuildState::Finished {
                return Ok(build);
            }
        }
    }

    pub async fn log(&self, id: BuildId) -> Result<BuildLog, ApiCallError> {
        self.call("GET", &format!("{API_PREFIX}/builds/{id}/log"), None)
            .await
    }

    pub async fn cancel(
        &self,
        id: BuildId,
        reason: Option<&str>,
    ) -> Result<serde_json::Value, ApiCallError> {
        let body = serde_json::json!({ "reason": reason }).to_string();
        self.call(
            "POST",
            &format!("{API_PREFIX}/builds/{id}/cancel"),
            Some(body),
        )
        .await
    }

    pub async fn workers(&self) -> Result<WorkerList, ApiCallError> {
        self.call("GET", &format!("{API_PREFIX}/workers"), None)
            .await
    }

    /// One filtered page of the workers.
    pub async fn workers_page(&self, query: &WorkerQuery) -> Result<WorkerPage, ApiCallError> {
        let query = query.to_query_string();
        let path = if query.is_empty() {
            format!("{API_PREFIX}/workers")
        } else {
            format!("{API_PREFIX}/workers?{query}")
        };
        self.call("GET", &path, None).await
    }

    pub async fn pause(&self) -> Result<PauseState, ApiCallError> {
        self.call("POST", &format!("{API_PREFIX}/pause"), None)
            .await
    }

    pub async fn resume(&self) -> Result<PauseState, ApiCallError> {
        self.call("POST", &format!("{API_PREFIX}/resume"), None)
            .await
    }

    /// Reloads the master's master.toml; a refusal is a 422 naming every error.
    pub async fn reconfig(&self) -> Result<ReconfigResponse, ApiCallError> {
        self.call("POST", &format!("{API_PREFIX}/reconfig"), None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_request_refuses_unknown_fields() {
        let err = serde_json::from_str::<SubmitRequest>(r#"{"builder":"a","prop":{}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prop"), "{err}");
        let ok: SubmitRequest = serde_json::from_str(r#"{"builder":"a"}"#).unwrap();
        assert!(ok.properties.is_empty());
    }

    #[test]
    fn master_urls_parse() {
        let url = MasterUrl::parse("https://farm.example:9443/x").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "farm.example", 9443)
        );
        let url = MasterUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!((url.tls, url.host.as_str(), url.port), (false, "::1", 8080));
        assert_eq!(url.to_string(), "http://[::1]:8080");
        assert_eq!(MasterUrl::parse("wss://h").unwrap().port, 443);
        assert!(MasterUrl::parse("ftp://h").is_err());
        assert!(MasterUrl::parse("https://h:notaport").is_err());
    }

    #[test]
    fn build_state_words_round_trip() {
        for state in [
            BuildState::Queued,
            BuildState::Running,
            BuildState::Finished,
        ] {
            assert_eq!(state.as_str().parse::<BuildState>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        assert!("done".parse::<BuildState>().is_err());
    }
}
