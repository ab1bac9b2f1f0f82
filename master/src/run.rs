//! `master run`: resolve the config (file or embedded default), prepare the
//! data dir (admin token, TLS certificate, SQLite), bind, start the scheduler
//! and the server, optionally spawn a local worker, and stop cleanly on
//! SIGTERM/SIGINT. Also `master add-worker` and `master check`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, bail};
use nightshift_proto::api::MasterUrl;
use nightshift_proto::exit::ExitStatus;
use nightshift_proto::tls::{self, ServerTls};
use tokio::sync::mpsc;

use crate::auth::token_sha256;
use crate::config::{ConfigErrors, MasterConfig, TlsMode};
use crate::locate::{
    ADMIN_TOKEN_FILE, ConfigSource, EMBEDDED_DATA_DIR, LOCAL_TOKEN_FILE, LOCAL_WORKER,
    config_search_order, find_config, local_url, new_token, pin_of_file, resolve_config,
    token_file,
};
use crate::scheduler::Scheduler;
use crate::state::AppState;
use crate::store::Store;
use nightshift_proto::clock::SystemClock;

/// The master.toml `master init` writes: the local worker (whose token
/// hash is filled in) and a sample builder whose steps succeed run after run.
pub const INIT_TEMPLATE: &str = r#"# master.toml, written by `master init`: a master on this machine with one
# local worker and a sample builder. Edit it, check it with `master check`,
# then start with `master run --local-worker` (the CLI finds this file here,
# or give --config / NIGHTSHIFT_MASTER_CONFIG). A running master takes edits
# with `master reconfig`. All keys: docs/reference.md.

# Where workers and the CLI reach the master. 0.0.0.0:8443 lets other
# machines' workers in (they trust its certificate by the pin `master run`
# prints).
listen = "127.0.0.1:8443"
# Relative to this file: master.db (queue and history), admin.token (the
# CLI's), tls/ (the self-signed certificate), local-worker.token.
data_dir = "nightshift-data"
# How long a disconnected worker's running build waits before it is re-queued.
missing_timeout = "5m"

# The worker `master run --local-worker` starts on this machine; its token is
# in data_dir/local-worker.token. Add more with `master add-worker NAME`.
[[worker]]
name = "local"
token_sha256 = "@LOCAL_TOKEN_SHA256@"
max_builds = 2

# A builder is a named list of shell steps run in the worker's workdir.
# `master submit hello --wait` runs it; `--prop k=v` reaches the steps as
# NIGHTSHIFT_PROP_K.
[[builder]]
name = "hello"
workers = ["local"]
steps = [
  { name = "greet", command = "echo hello from nightshift on $(hostname)" },
  { name = "stamp", command = "mkdir -p out && date -u > out/stamp && cat out/stamp" },
]
"#;

/// `master init [FILE] [--force]`: writes master.toml (the local worker and
/// a sample builder) and the local worker's token next to it, so that
/// `master run --local-worker` works at once. An existing local-worker token
/// (from an earlier embedded-default run here) is kept, so a running local
/// worker still matches.
pub fn init(path: &Path, force: bool) -> anyhow::Result<ExitStatus> {
    if path.exists() && !force {
        return Err(crate::cli::UsageError(format!(
            "{} exists; edit it, or give --force to overwrite it",
            path.display()
        ))
        .into());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let token_path = dir.join(EMBEDDED_DATA_DIR).join(LOCAL_TOKEN_FILE);
    let token = token_file(&token_path, true)?.unwrap_or_default();
    let text = INIT_TEMPLATE.replace("@LOCAL_TOKEN_SHA256@", &token_sha256(&token));
    // The template must stay a valid config: check before writing anything.
    let base = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
    MasterConfig::parse(&text, path, &base)?;
    fs_err::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    let config_flag = if path == Path::new("master.toml") {
        String::new()
    } else {
        format!(" --config {}", path.display())
    };
    println!(
        "wrote {} (worker `local`, builder `hello`); the local worker's token is in {}",
        path.display(),
        token_path.display()
    );
    println!("next: master check{config_flag} && master run{config_flag} --local-worker");
    Ok(ExitStatus::Ok)
}

/// `master check`.
pub fn check(path: Option<&Path>) -> anyhow::Result<ExitStatus> {
    let (config, embedded) = resolve_config(path, false)?;
    println!(
        "{}: ok ({} workers, {} builders, {} locks){}",
        config.source.display(),
        config.workers.len(),
        config.builders.len(),
        config.locks.len(),
        if embedded {
            format!(
                " — no master.toml found ({}), this is the embedded default",
                config_search_order()
            )
        } else {
            String::new()
        }
    );
    for warning in schedule_warnings(&config) {
        println!("warning: {warning}");
    }
    Ok(ExitStatus::Ok)
}

/// What the workers' master-side schedules compile to with a caveat (a cron
/// day field Linux crontab reads differently, a window that never opens),
/// each located in the file like a config error.
fn schedule_warnings(config: &MasterConfig) -> Vec<String> {
    let text = fs_err::read_to_string(&config.source).unwrap_or_default();
    let mut lines = Vec::new();
    for (index, worker) in config.workers.iter().enumerate() {
        if worker.schedule.is_empty() {
            continue;
        }
        let availability = nightshift_policy::AvailabilityConfig {
            timezone: worker.timezone.clone(),
            default: None,
            schedule: worker.schedule.clone(),
            load: None,
            overrun: None,
        };
        let Ok(policy) = nightshift_policy::Policy::compile_for_master(
            &availability,
            jiff::tz::TimeZone::system(),
            &format!("worker[{index}]"),
        ) else {
            continue;
        };
        for warning in policy.warnings() {
            let (_, mut place) =
                nightshift_proto::diag::parse_toml::<serde::de::IgnoredAny>(&config.source, &text);
            place.push_at_path(&warning.path, warning.message.clone());
            lines.push(
                place
                    .errors()
                    .last()
                    .map_or_else(|| warning.to_string(), |e| e.to_string()),
            );
        }
    }
    lines
}

/// `master add-worker NAME`.
pub fn add_worker(
    name: &str,
    url: Option<&str>,
    config: Option<&Path>,
) -> anyhow::Result<ExitStatus> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(crate::cli::UsageError(format!(
            "`{name}` is not a valid worker name (letters, digits, `-`, `_`, `.`)"
        ))
        .into());
    }
    // A broken config is reported as such, never hidden behind "give --url".
    let (resolved, source) = find_config(config, false)?;
    let master_url = match url {
        Some(url) => {
            MasterUrl::parse(url).map_err(|e| crate::cli::UsageError(format!("--url: {e}")))?
        }
        None => local_url(resolved.listen, &resolved.tls),
    };
    let resolved = Some(resolved);
    let ws_url = master_url
        .to_string()
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    let config = resolved.as_ref().context("no config")?;
    let token = add_worker_token(name, config, &source)?;
    println!("# Add to master.toml (then restart or reconfig the master):");
    println!("[[worker]]");
    println!("name = {}", toml::Value::String(name.to_owned()));
    println!("token_sha256 = \"{}\"", token_sha256(&token));
    println!("max_builds = 1");
    println!();
    println!("# The worker's worker.toml (keep it private: it holds the token):");
    println!("name = {}", toml::Value::String(name.to_owned()));
    println!("master = \"{ws_url}\"");
    println!("token = \"{token}\"");
    print_trust_lines(&master_url, config);
    Ok(ExitStatus::Ok)
}

/// `master add-worker-group NAME`: a fresh enrolment token, the group's
/// entry for master.toml, and the worker.toml lines every machine of the
/// group shares.
pub fn add_worker_group(
    name: &str,
    url: Option<&str>,
    config: Option<&Path>,
) -> anyhow::Result<ExitStatus> {
    if !crate::config::valid_name(name) {
        return Err(crate::cli::UsageError(format!(
            "`{name}` is not a valid group name (letters, digits, `-`, `_`, `.`)"
        ))
        .into());
    }
    let (config, _) = find_config(config, false)?;
    let master_url = match url {
        Some(url) => {
            MasterUrl::parse(url).map_err(|e| crate::cli::UsageError(format!("--url: {e}")))?
        }
        None => local_url(config.listen, &config.tls),
    };
    let ws_url = master_url
        .to_string()
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    let token = new_token();
    let quoted = toml::Value::String(name.to_owned());
    println!("# Add to master.toml (then restart or reconfig the master), and list");
    println!("# the group by its name in the `workers` of the builders it serves:");
    println!("[[worker_group]]");
    println!("name = {quoted}");
    println!("enroll_token_sha256 = \"{}\"", token_sha256(&token));
    println!("max_builds = 1");
    println!();
    println!("# The group's enrolment token (it only enrols; it runs no build):");
    println!("# {token}");
    println!("# Put it in a file (mode 0600) on each machine, e.g. /etc/nightshift/enroll.token.");
    println!();
    println!("# Each machine's worker.toml; `name` must start with \"{name}-\":");
    println!("name = \"{name}-HOSTNAME\"");
    println!("master = \"{ws_url}\"");
    println!("enroll_token_file = \"/etc/nightshift/enroll.token\"");
    println!("token_file = \"/var/lib/nightshift/worker.token\"  # written at enrolment");
    print_trust_lines(&master_url, &config);
    Ok(ExitStatus::Ok)
}

/// worker.toml's lines for trusting the master: `insecure` or `[tls]`.
fn print_trust_lines(master_url: &MasterUrl, config: &MasterConfig) {
    if !master_url.tls {
        println!("insecure = true");
    } else {
        let cert = Some(config).and_then(|c| match &c.tls {
            TlsMode::SelfSigned => Some(c.data_dir.join("tls").join(tls::SELF_SIGNED_CERT_FILE)),
            TlsMode::Files { cert, .. } => Some(cert.clone()),
            TlsMode::Insecure => None,
        });
        println!("[tls]");
        match cert.as_deref().map(pin_of_file) {
            Some(Ok(pin)) => println!("pin_sha256 = \"{pin}\""),
            _ => println!(
                "# pin_sha256 = \"...\"  (printed by `master run`; or ca_file = \"<the master's certificate>\")"
            ),
        }
    }
}

/// The token `add-worker NAME` prints. For `local`, the token
/// `master run --local-worker` uses (data_dir/local-worker.token; written
/// there when missing), so the entry printed matches the running local
/// worker. Any other name gets a fresh token; re-adding a configured worker
/// says what else to change.
fn add_worker_token(
    name: &str,
    config: &MasterConfig,
    source: &ConfigSource,
) -> anyhow::Result<String> {
    let configured = config.worker(name).map(|w| w.token_sha256.clone());
    if name != LOCAL_WORKER {
        if configured.is_some() {
            eprintln!(
                "note: worker `{name}` is already in {}: this is a NEW token. Replace its \
                 token_sha256 there with the one below, run `master reconfig`, and give the \
                 worker the new token (its old one stops working).",
                config.source.display()
            );
        }
        return Ok(new_token());
    }
    let path = config.data_dir.join(LOCAL_TOKEN_FILE);
    let existed = path.exists();
    let token = token_file(&path, true)?.context("no local-worker token")?;
    let hash = token_sha256(&token);
    if !existed {
        eprintln!(
            "note: wrote the local worker's token to {} (`master run --local-worker` uses it)",
            path.display()
        );
    }
    match configured {
        Some(configured) if configured == hash => eprintln!(
            "note: worker `{LOCAL_WORKER}` is already in {} with this token (from {}); \
             `master run --local-worker` starts it",
            config.source.display(),
            path.display()
        ),
        Some(_) if *source == ConfigSource::Embedded => {}
        Some(_) => eprintln!(
            "note: {}'s worker `{LOCAL_WORKER}` has a token_sha256 that does not match {}, \
             which `master run --local-worker` uses: replace it with the token_sha256 below \
             (then restart the master)",
            config.source.display(),
            path.display()
        ),
        None => eprintln!(
            "note: this is the token in {} (`master run --local-worker` uses it): add the \
             [[worker]] entry below to {}",
            path.display(),
            config.source.display()
        ),
    }
    Ok(token)
}

/// The TLS the master serves with, per its config, issuing session tickets
/// sealed with keys kept in the data directory (so agents resume after a
/// restart).
fn server_tls(config: &MasterConfig) -> anyhow::Result<Option<ServerTls>> {
    match &config.tls {
        TlsMode::Insecure => None,
        TlsMode::Files { cert, key } => Some(tls::load_server_tls(cert, key)?),
        TlsMode::SelfSigned => {
            let mut names = vec![];
            if !config.listen.ip().is_unspecified() {
                names.push(config.listen.ip().to_string());
            }
            if let Ok(host) = fs_err::read_to_string("/proc/sys/kernel/hostname") {
                let host = host.trim();
                if !host.is_empty() {
                    names.push(host.to_owned());
                }
            }
            Some(tls::load_or_create_self_signed(&config.data_dir, &names)?)
        }
    }
    .map(|tls| tls.with_session_tickets(&config.data_dir, Arc::new(SystemClock)))
    .transpose()
}

/// `master run`. Returns the exit code.
pub async fn run(
    config_path: Option<&Path>,
    local_worker: bool,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitStatus> {
    let (mut config, embedded) = resolve_config(config_path, true)?;
    let test_clock =
        crate::triggers::test_clock_start(std::env::var_os(crate::triggers::TEST_CLOCK_ENV))?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let listener = crate::server::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Port 0 picks a free port: from here on the config says the real one
    // (the ready line, the latent workers' URL, reconfig's comparison).
    config.listen = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let config = Arc::new(config);
    fs_err::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    let data_dir = config
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| config.data_dir.clone());

    let local_token = if local_worker {
        let Some(def) = config.worker(LOCAL_WORKER) else {
            let mut errors = ConfigErrors::new(&config.source);
            errors.push_at_key(
                "worker",
                format!("--local-worker needs a [[worker]] named `{LOCAL_WORKER}`"),
            );
            return Err(errors.into());
        };
        let path = data_dir.join(LOCAL_TOKEN_FILE);
        let Some(token) = token_file(&path, embedded)? else {
            bail!(
                "--local-worker: no token for worker `{LOCAL_WORKER}` in {}; `master add-worker \
                 {LOCAL_WORKER}` writes one there and prints the token_sha256 for master.toml",
                path.display()
            );
        };
        if token_sha256(&token) != def.token_sha256 {
            bail!(
                "--local-worker: the token in {} does not match worker `{LOCAL_WORKER}`'s \
                 token_sha256 in {}; `master add-worker {LOCAL_WORKER}` prints the matching \
                 entry (token_sha256 = \"{}\")",
                path.display(),
                config.source.display(),
                token_sha256(&token)
            );
        }
        Some(token)
    } else {
        None
    };

    let admin_hash = match &config.admin_token_sha256 {
        Some(hash) => hash.clone(),
        None => {
            let path = data_dir.join(ADMIN_TOKEN_FILE);
            let token = token_file(&path, true)?.unwrap_or_default();
            token_sha256(&token)
        }
    };
    let tls = server_tls(&config)?;
    let store = Store::open(&data_dir.join("master.db"))?;
    store.set_log_cap(config.max_log_bytes);
    let unfinished = store.unfinished().await?;
    let step_grants = store.step_grants().await?;
    let paused = store.paused().await?;
    let last_seen = store.last_presences().await?;
    let enrolled = crate::worker_groups::Enrolled::of(store.enrolled_workers().await?);
    let durations = store
        .recent_durations(crate::scheduler::estimate::WINDOW)
        .await?;

    let (descriptors, room) = crate::server::raise_descriptor_limit();
    // Agents may take all but a share of the room, so that at the agents'
    // limit the admin API, the CLI and the dashboard still get in.
    let agent_room = room.saturating_sub((room / 16).clamp(1, 1024)).max(1);
    let max_agents = match config.max_agents {
        Some(max) if u64::from(max) > agent_room => {
            tracing::warn!(
                "max_agents = {max} is more than the descriptor limit ({descriptors}) leaves room for; holding {agent_room}"
            );
            agent_room
        }
        Some(max) => u64::from(max),
        None => agent_room,
    };
    tracing::info!(
        "descriptor limit {descriptors}: room for {max_agents} agents ({room} connections in all)"
    );
    let gate =
        crate::connection_limits::ConnectionGate::new(usize::try_from(room).unwrap_or(usize::MAX));
    let agent_slots = crate::connection_limits::ConnectionGate::new(
        usize::try_from(max_agents).unwrap_or(usize::MAX),
    );
    let url = local_url(config.listen, &config.tls);

    let (events, inbox) = mpsc::unbounded_channel();
    let (agent_events, agent_inbox) = mpsc::channel(crate::scheduler::AGENT_INBOX);
    let queued = unfinished.len();
    let mut scheduler = Scheduler::new(
        Arc::clone(&config),
        store.clone(),
        Arc::new(SystemClock),
        events.clone(),
        crate::scheduler::Restored {
            unfinished,
            last_seen,
            paused,
            enrolled: enrolled.all(),
        },
    );
    scheduler.seed_estimates(durations);
    // Latent instances reach the master as any worker would, with a token
    // made for each start (checked by the connection handler).
    let latent_tokens = crate::latent::LatentTokens::default();
    scheduler.set_latent_access(
        crate::latent::MasterAccess {
            url: url
                .to_string()
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1),
            ca_file: tls.as_ref().map(|t| t.cert_path.clone()),
            cert_sha256: tls.as_ref().map(|t| t.pin_sha256.clone()),
            insecure: tls.is_none(),
        },
        latent_tokens.clone(),
    );
    // Step lock holds from before a restart are held again before any
    // agent connects (a waiting step must not get them meanwhile).
    scheduler.restore_step_grants(step_grants);
    // The scheduler has a thread of its own. On the shared runtime it waited
    // its turn behind every connection task a farm-wide flip had woken
    // (60 ms and more at 10,000 agents), and each submit waited with it.
    // The tasks it starts (commits to await, latent providers' commands)
    // run on its thread too.
    let scheduler_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the scheduler's runtime")?;
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || scheduler_runtime.block_on(scheduler.run(inbox, agent_inbox)))
        .context("cannot start the scheduler thread")?;
    let trigger_counters = Arc::new(crate::triggers::TriggerCounters::default());
    let artifacts = crate::artifacts::Artifacts::new(&data_dir, store.clone())?;
    let state = AppState {
        artifacts: Arc::clone(&artifacts),
        trigger_counters: Arc::clone(&trigger_counters),
        latent_tokens,
        agent_slots,
        config: crate::reconfig::LiveConfig::new(Arc::clone(&config)),
        store,
        events,
        agent_events,
        admin_token_sha256: admin_hash,
        next_conn: Arc::new(AtomicU64::new(1)),
        enrolled,
        sessions: Arc::default(),
        enrol_limiter: Arc::new(crate::worker_groups::EnrolLimiter::new(
            std::time::Instant::now(),
        )),
    };
    tokio::spawn(crate::artifacts::retain(artifacts, state.config.clone()));
    // SIGHUP reloads master.toml, as `master reconfig` does.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    let (live, hup_events) = (state.config.clone(), state.events.clone());
    let shutdown_events = state.events.clone();
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            match crate::reconfig::reload(&live, &hup_events).await {
                Ok(changes) => {
                    tracing::info!("SIGHUP: master.toml reloaded: {}", changes.join("; "))
                }
                Err(refused) => tracing::error!("SIGHUP: {refused}"),
            }
        }
    });
    crate::triggers::start(
        crate::triggers::TriggerContext {
            config: state.config.clone(),
            store: state.store.clone(),
            events: state.events.clone(),
            counters: trigger_counters,
        },
        crate::triggers::trigger_clock(test_clock),
    );
    let router = crate::server::router(state);

    let ws_url = url
        .to_string()
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    println!("nightshift master ready on {url}");
    match (config.dashboard, &config.admin_token_sha256) {
        (crate::config::DashboardAccess::Public, _) => {
            println!("  dashboard:  {url}/  (public; actions need a login)")
        }
        (crate::config::DashboardAccess::Login, None) => println!(
            "  dashboard:  {url}/  (log in with the admin token in {})",
            data_dir.join(ADMIN_TOKEN_FILE).display()
        ),
        (crate::config::DashboardAccess::Login, Some(_)) => {
            println!("  dashboard:  {url}/  (log in with the admin token)")
        }
    }
    println!(
        "  config:     {}",
        if embedded {
            "embedded default (no master.toml here): builder `hello`, worker `local`".to_owned()
        } else {
            config.source.display().to_string()
        }
    );
    println!(
        "  data:       {} (master.db, admin.token, tls/){}",
        data_dir.display(),
        if queued > 0 {
            format!("; {queued} unfinished builds restored")
        } else {
            String::new()
        }
    );
    println!(
        "  capacity:   {max_agents} agents ({room} connections in all; descriptor limit {descriptors})"
    );
    if let Some(tls) = &tls {
        println!("  workers trust it with, in worker.toml:");
        println!("      master = \"{ws_url}\"");
        println!("      [tls]");
        println!("      pin_sha256 = \"{}\"", tls.pin_sha256);
        println!("    or ca_file = \"{}\"", tls.cert_path.display());
    } else {
        println!("  INSECURE: plain HTTP/ws (insecure = true); workers need insecure = true too");
    }
    let mut cli_config = match config_path {
        Some(path) => format!(" --config {}", path.display()),
        None => String::new(),
    };
    if listen.is_some() {
        // The CLI reads the config's listen address; tell it the real one.
        cli_config.push_str(&format!(" --url {url}"));
    }
    if let Some(builder) = config.builders.first() {
        println!(
            "  submit:     master submit {}{cli_config} --wait",
            builder.name
        );
    }
    println!("  see:        master workers{cli_config}   |   master builds{cli_config}");
    println!("  add a worker: master add-worker NAME{cli_config}");

    let mut child = match local_token {
        Some(token) => {
            let pin = tls.as_ref().map(|t| t.pin_sha256.clone());
            Some(spawn_local_worker(
                &data_dir,
                &ws_url,
                &token,
                pin.as_deref(),
                &config,
            )?)
        }
        None => None,
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(
        listener,
        tls.map(|t| t.config),
        router,
        gate,
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Stopping the local worker (`worker stop --graceful`, or a crash) does
    // not stop the farm: the master goes on and says how to start it again.
    let exit = loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break ExitStatus::Ok }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break ExitStatus::Ok }
            status = wait_child(&mut child) => {
                child = None;
                let again = format!(
                    "{} run --config {}",
                    sibling_worker().map(|p| p.display().to_string()).unwrap_or_else(|_| "worker".into()),
                    data_dir.join("local-worker").join("worker.toml").display()
                );
                if status.success() {
                    tracing::warn!("the local worker stopped; the master goes on (start it again: {again})");
                } else {
                    tracing::error!("the local worker exited ({status}); the master goes on (start it again: {again})");
                }
            }
        }
    };
    // Latent instances could not reconnect to the next run (their tokens
    // die with this one): stop them, within a bound.
    let (reply, stopped) = tokio::sync::oneshot::channel();
    if shutdown_events
        .send(crate::scheduler::Event::StopLatent { reply })
        .is_ok()
        && tokio::time::timeout(Duration::from_secs(60), stopped)
            .await
            .is_err()
    {
        tracing::warn!("latent instances did not all stop within 60s");
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    if let Some(child) = child.as_mut() {
        stop_child(child).await;
    }
    Ok(exit)
}

async fn wait_child(child: &mut Option<tokio::process::Child>) -> std::process::ExitStatus {
    match child {
        Some(child) => match child.wait().await {
            Ok(status) => status,
            Err(e) => {
                tracing::error!("cannot wait for the local worker: {e}");
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// The `worker` executable next to this `master`.
pub fn sibling_worker() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate the master executable")?;
    let dir = me
        .parent()
        .context("the master executable has no directory")?;
    let worker = dir.join("worker");
    if !worker.exists() {
        bail!(
            "--local-worker: no `worker` executable next to {} (build or install both)",
            me.display()
        );
    }
    Ok(worker)
}

fn spawn_local_worker(
    data_dir: &Path,
    ws_url: &str,
    token: &str,
    pin: Option<&str>,
    config: &MasterConfig,
) -> anyhow::Result<tokio::process::Child> {
    let binary = sibling_worker()?;
    let dir = data_dir.join("local-worker");
    fs_err::create_dir_all(dir.join("work"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let quoted = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let max_builds = config.worker(LOCAL_WORKER).map_or(1, |w| w.max_builds);
    let mut text = format!(
        "# Generated by `master run --local-worker`; rewritten on every start.\n\
         name = \"{LOCAL_WORKER}\"\nmaster = \"{ws_url}\"\ntoken = \"{token}\"\n\
         workdir = {}\nstate_dir = {}\nmax_builds = {max_builds}\n",
        quoted(&dir.join("work")),
        quoted(&dir.join("state")),
    );
    if pin.is_none() {
        text.push_str("insecure = true\n");
    }
    // The agent's usual status page port, or any free one if that is taken.
    let control = std::net::TcpListener::bind(("127.0.0.1", 7878))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .context("cannot find a free port for the local worker's status page")?;
    text.push_str(&format!("\n[control]\nlisten = \"{control}\"\n"));
    if let Some(pin) = pin {
        text.push_str(&format!("\n[tls]\npin_sha256 = \"{pin}\"\n"));
    }
    let path = dir.join("worker.toml");
    tls::write_private(&path, text.as_bytes())?;
    println!(
        "  local worker: {} run --config {}",
        binary.display(),
        path.display()
    );
    println!(
        "    its status page: http://{control}/ (`worker status --config {}`)",
        path.display()
    );
    let child = tokio::process::Command::new(&binary)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(child)
}
