//! The control plane's listeners: TCP on `[control] listen` for the browser,
//! a private Unix socket `state_dir/control.sock` for the CLI, one router
//! behind both, and the [`ControlServer`] handle that shuts them down.

use std::fs::{DirBuilder, Permissions};

use fs_err as fs;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::api;
use super::error::ApiError;
use super::guard::{self, GuardConfig, Secrets};
use super::state::{Clock, PreviewFn, Shared};
use super::{metrics, page};
use crate::config::WorkerConfig;
use crate::handle::AgentHandle;

/// The Unix socket the CLI talks to, inside the state dir.
pub const SOCKET_FILE_NAME: &str = "control.sock";
/// The file holding the bound TCP address (`127.0.0.1:7878`), inside the state dir.
pub const ADDR_FILE_NAME: &str = "control.addr";
/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the control plane needs besides the daemon handle.
#[derive(Clone)]
pub struct ControlOptions {
    /// `[control] listen`.
    pub listen: SocketAddr,
    /// `[control] allow_remote`.
    pub allow_remote: bool,
    /// `[control] token_file`; `None` = generate `state_dir/control.token`.
    pub token_file: Option<PathBuf>,
    /// The policy's time zone: how times are shown and `19:00` is read.
    pub time_zone: TimeZone,
    pub clock: Clock,
    pub preview: Option<PreviewFn>,
}

impl ControlOptions {
    /// Options with the real clock, no preview and a generated token.
    pub fn new(listen: SocketAddr, time_zone: TimeZone) -> ControlOptions {
        ControlOptions {
            listen,
            allow_remote: false,
            token_file: None,
            time_zone,
            clock: Arc::new(Timestamp::now),
            preview: None,
        }
    }
}

/// The running control plane. Shut it down with [`ControlServer::shutdown`];
/// dropping it also stops the listeners and removes the socket and address
/// files.
pub struct ControlServer {
    local_addr: SocketAddr,
    socket_path: PathBuf,
    addr_path: PathBuf,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("local_addr", &self.local_addr)
            .field("socket_path", &self.socket_path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// The bound TCP address (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The CLI's Unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops accepting, ends live streams, lets running requests finish and
    /// removes the socket and address files.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let mut result = Ok(());
        for task in std::mem::take(&mut self.tasks) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => result = Err(anyhow::anyhow!("control server: {error}")),
                Err(error) => result = Err(anyhow::anyhow!("control server task: {error}")),
            }
        }
        self.remove_files();
        result
    }

    fn remove_files(&self) {
        for path in [&self.socket_path, &self.addr_path] {
            if let Err(error) = fs::remove_file(path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "could not remove control file");
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            self.shutdown.cancel();
            self.remove_files();
        }
    }
}

/// Starts the control plane for `worker run`: `[control]` from `config`,
/// times shown in the policy's zone, the week ahead from its `preview`.
/// See [`serve_with`].
pub async fn serve(
    handle: AgentHandle,
    config: &WorkerConfig,
    state_dir: &Path,
) -> anyhow::Result<ControlServer> {
    let policy = config.policy().map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|error| format!("{}: {}", error.path, error.message))
            .collect();
        anyhow::anyhow!("[availability]: {}", lines.join("; "))
    })?;
    let mut options = ControlOptions::new(config.control.listen, policy.time_zone().clone());
    options.allow_remote = config.control.allow_remote;
    options.token_file = config.control.token_file.clone();
    let policy = Arc::new(policy);
    options.preview = Some(Arc::new(move |from, to| policy.preview(from, to).intervals));
    serve_with(handle, options, state_dir).await
}

/// Starts the control plane: binds TCP and the Unix socket, writes
/// `control.addr`, creates the token on first start, and serves until
/// shut down. Must run inside a tokio runtime.
pub async fn serve_with(
    handle: AgentHandle,
    options: ControlOptions,
    state_dir: &Path,
) -> anyhow::Result<ControlServer> {
    if !(options.listen.ip().is_loopback()
        || (options.allow_remote && options.token_file.is_some()))
    {
        bail!(
            "[control] listen = \"{}\" is not a loopback address; to accept other machines set \
             [control] allow_remote = true and token_file (the token they must send)",
            options.listen
        );
    }
    if !state_dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
    }
    let token = guard::load_or_create_token(options.token_file.as_deref(), state_dir)?;
    let secrets = Secrets::new(token);

    let tcp = match TcpListener::bind(options.listen).await {
        Ok(tcp) => tcp,
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "[control] listen = \"{}\": the port is already in use (a second agent on this \
             machine?); set `listen` in the [control] table of worker.toml to a free port, or to \
             \"{}:0\" for any free one (the agent logs it and writes it to {})",
            options.listen,
            options.listen.ip(),
            state_dir.join(ADDR_FILE_NAME).display()
        ),
        Err(error) => {
            return Err(error).with_context(|| {
                format!("[control] listen = \"{}\": cannot listen", options.listen)
            });
        }
    };
    let local_addr = tcp
        .local_addr()
        .context("reading the control listener's address")?;

    let socket_path = state_dir.join(SOCKET_FILE_NAME);
    let unix = bind_private_socket(&socket_path)?;

    let addr_path = state_dir.join(ADDR_FILE_NAME);
    let temporary = state_dir.join(format!(".{ADDR_FILE_NAME}.tmp"));
    fs::write(&temporary, format!("{local_addr}\n"))
        .and_then(|()| fs::rename(&temporary, &addr_path))
        .with_context(|| format!("writing {}", addr_path.display()))?;

    let shutdown = CancellationToken::new();
    let shared = Shared {
        handle,
        clock: options.clock,
        time_zone: options.time_zone,
        preview: options.preview,
        secrets: secrets.clone(),
        shutdown: shutdown.clone(),
    };
    let app = router(
        shared,
        GuardConfig {
            secrets,
            allow_remote: options.allow_remote,
        },
    );

    let tcp_task = tokio::spawn(
        axum::serve(
            tcp,
            app.clone()
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future(),
    );
    let unix_task = tokio::spawn(
        axum::serve(unix, app.into_make_service())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(%local_addr, socket = %socket_path.display(), "control plane listening");
    Ok(ControlServer {
        local_addr,
        socket_path,
        addr_path,
        shutdown,
        tasks: vec![tcp_task, unix_task],
    })
}

/// Binds the CLI socket with mode 0600, replacing a stale socket file but
/// refusing when another agent answers on it.
fn bind_private_socket(path: &Path) -> anyhow::Result<UnixListener> {
    // sun_path holds 108 bytes including the terminating NUL.
    if path.as_os_str().len() >= 108 {
        bail!(
            "the control socket path {} is too long for a Unix socket (max 107 bytes); choose a shorter state_dir",
            path.display()
        );
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another worker agent is already running with this state dir (it answers on {})",
                path.display()
            );
        }
        fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(path, Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(listener)
}

/// Every route, behind the guard and the body limit.
pub fn router(shared: Shared, guard_config: GuardConfig) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/events", get(page::events))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/status", get(api::get_status))
        .route("/api/v1/set-availability", post(api::post_set_availability))
        .route("/api/v1/stop", post(api::post_stop))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            guard_config,
            guard::middleware,
        ))
        .with_state(shared)
}

async fn metrics_text(State(shared): State<Shared>) -> Response {
    let status = shared.handle.status.borrow().clone();
    let body = metrics::render(&status, (shared.clock)());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such page; try / (status page), /api/v1/status or /metrics",
    )
}
