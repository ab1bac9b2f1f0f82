//! The agent daemon (`worker run`): loads the config, starts the master
//! link, the load sampler, the control plane and signal handling around one
//! event loop, and exits 0 after a clean stop, 1 on failure, 2 on a bad config.

mod alarm;
pub mod checkout;
pub mod event_loop;
mod files;
pub mod link;
pub mod manual;
pub mod outgoing;
pub mod runner;
pub mod spawn;
pub mod spool;
pub mod upload;

use nightshift_proto::exit::ExitStatus;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::SignedDuration;
use tokio::sync::mpsc;

use self::event_loop::{Daemon, Exit, Settings, SignalKind, notify_systemd};
use self::link::LinkSettings;
use self::runner::RunnerSettings;
use self::spool::Spool;
use crate::build_processes::load::{BuildTrees, LoadMeasurement, LoadSampler, TreesError};
use crate::cli::ConfigArg;
use crate::config::WorkerConfig;
use nightshift_proto::clock::{Clock, SystemClock};

/// Between SIGTERM and SIGKILL for a cancelled or timed-out step.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest pause between attempts to reach the master.
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// CPU use is a difference between samples; closer than this is noise.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// Why the daemon could not run, mapped to the exit code.
enum Failure {
    /// Exit 2: the config (or something it names) is wrong.
    Config(String),
    /// Exit 1: anything else.
    Runtime(String),
}

pub fn main(arg: &ConfigArg) -> ExitStatus {
    nightshift_proto::log::init();
    let (path, config) = match WorkerConfig::load(arg.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitStatus::Usage;
        }
    };
    nightshift_proto::tls::install_crypto_provider();
    // One thread is plenty: the agent waits on timers and sockets, and the
    // blocking work (reading /proc, the spool) goes to the blocking pool.
    // It also keeps the idle agent small (no per-thread stacks and arenas).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitStatus::Failure;
        }
    };
    match runtime.block_on(run(&path, config)) {
        Ok(Exit::Stopped(reason)) => {
            tracing::info!("{reason}");
            ExitStatus::Ok
        }
        Err(Failure::Config(message)) => {
            eprintln!("error: {}: {message}", path.display());
            ExitStatus::Usage
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitStatus::Failure
        }
    }
}

/// How the agent reaches its master: a nightshift master link, or a
/// supervised CI agent (`[supervise]`) that talks to its own.
enum Upstream {
    Master {
        url: String,
        token: String,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    Supervised(Arc<crate::supervise::SuperviseSettings>),
}

async fn run(path: &Path, config: WorkerConfig) -> Result<Exit, Failure> {
    let policy = config.policy().map_err(|errors| {
        Failure::Config(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    if config.supervise.is_none() && crate::enroll::needed(&config) {
        let answer = crate::enroll::enroll(&config)
            .await
            .map_err(|error| Failure::Runtime(format!("{error:#}")))?;
        tracing::info!(
            "enrolled as {} in group {}; token kept in token_file",
            answer.name,
            answer.group
        );
    }
    let upstream = match &config.supervise {
        Some(supervise) => Upstream::Supervised(Arc::new(supervise.clone())),
        None => master_upstream(&config)?,
    };

    for (what, dir) in [
        ("workdir", &config.workdir),
        ("state_dir", &config.state_dir),
    ] {
        fs_err::create_dir_all(dir)
            .map_err(|error| Failure::Runtime(format!("cannot create the {what}: {error}")))?;
    }
    let _lock = lock_state_dir(&config.state_dir)?;
    // Before the leftover builds are killed: a CI agent left by a crashed
    // run is asked to finish its job instead.
    let leftover = match upstream {
        Upstream::Supervised(_) => crate::supervise::claim_leftover(&config.state_dir),
        Upstream::Master { .. } => None,
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let manual = manual::load(&config.state_dir, clock.now()).map_err(|error| {
        Failure::Runtime(format!(
            "the saved manual state is unreadable: {error} (fix or delete the file)"
        ))
    })?;
    let spool = Spool::open(&config.state_dir)
        .map_err(|error| Failure::Runtime(format!("cannot open the result spool: {error}")))?;
    let trees = Arc::new(
        BuildTrees::detect(&config.state_dir, &config.builds).map_err(|error| match error {
            TreesError::Records(message) => Failure::Runtime(message),
            TreesError::NoCgroup(message) => Failure::Config(message),
        })?,
    );
    for line in trees.kill_leftovers() {
        tracing::warn!("{line}");
    }
    tracing::info!(
        "worker `{}` (config {}): builds in {}, accounted as {}",
        config.name,
        path.display(),
        config.workdir.display(),
        trees.describe()
    );

    let settings = Settings {
        worker: config.name.clone(),
        master_url: config.master.clone(),
        max_builds: config.max_builds,
        state_dir: config.state_dir.clone(),
        overrun: config
            .availability
            .overrun
            .map_or(SignedDuration::ZERO, |o| o.get()),
    };
    let artifacts = match &upstream {
        Upstream::Master { url, token, tls } => Some(
            nightshift_proto::api::MasterUrl::parse(url)
                .and_then(|url| {
                    nightshift_proto::api::ApiClient::new(url, token.clone(), tls.clone())
                })
                .map_err(|error| Failure::Config(format!("master: {error:#}")))?,
        ),
        Upstream::Supervised(_) => None,
    };
    let runner_settings = Arc::new(RunnerSettings {
        workdir: config.workdir.clone(),
        kill_grace: KILL_GRACE,
        git: config.git.clone(),
        credit: outgoing::OutputCredit::default(),
        artifacts,
    });
    let (mut daemon, inbox, wiring) = Daemon::new(
        settings,
        clock.clone(),
        policy,
        manual,
        spool,
        runner_settings,
        trees.clone(),
    );
    let sample_every = config
        .load_sample_interval
        .to_std()
        .max(MIN_SAMPLE_INTERVAL);
    if let Upstream::Supervised(settings) = &upstream {
        tracing::info!(
            "supervising `{}` ({}) in {}; the presence starts and stops it",
            settings.command_line(),
            settings.kind.name(),
            settings.workdir.display()
        );
        daemon = daemon.with_supervisor(crate::supervise::spawn(
            settings.clone(),
            config.state_dir.clone(),
            trees.clone(),
            clock.clone(),
            sample_every,
            leftover,
        ));
    }
    let daemon = match alarm::WallAlarm::new() {
        Ok(alarm) => daemon.with_wall_alarm(alarm),
        Err(error) => {
            tracing::warn!(
                "no wall-clock alarm ({error}): after a suspend or a clock change the presence is re-checked within a minute"
            );
            daemon
        }
    };
    let presence = daemon.presence();
    tracing::info!(
        "presence: {} ({}) — {}",
        presence.state,
        presence.source,
        presence.reason
    );

    let control = crate::control::serve(wiring.handle.clone(), &config, &config.state_dir)
        .await
        .map_err(|error| Failure::Runtime(format!("control plane: {error:#}")))?;
    tracing::info!(
        "status page on http://{}/ ; CLI socket {}",
        control.local_addr(),
        control.socket_path().display()
    );

    spawn_signal_forwarder(wiring.signals.clone())?;
    let sampler = tokio::spawn(sample_load(
        trees,
        clock,
        sample_every,
        wiring.load_samples.clone(),
    ));
    let link_task = match upstream {
        Upstream::Master { url, token, tls } => Some(link::spawn(
            LinkSettings {
                url,
                token,
                worker: config.name.clone(),
                max_builds: config.max_builds,
                tls,
                backoff_max: RECONNECT_MAX,
            },
            wiring.hello.clone(),
            wiring.to_master,
            wiring.link_events.clone(),
        )),
        Upstream::Supervised(_) => None,
    };
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("{} ({})", presence.state, presence.reason)),
    ]);

    let exit = daemon.run(inbox).await;

    // The goodbye is on its way; give the link a moment to deliver it.
    if let Some(link_task) = link_task
        && tokio::time::timeout(Duration::from_secs(5), link_task)
            .await
            .is_err()
    {
        tracing::warn!("the master link did not close in time");
    }
    sampler.abort();
    if let Err(error) = control.shutdown().await {
        tracing::warn!("{error:#}");
    }
    Ok(exit)
}

/// The master URL, token and TLS settings of a worker with a nightshift master.
fn master_upstream(config: &WorkerConfig) -> Result<Upstream, Failure> {
    let token = config
        .token()
        .map_err(|error| Failure::Config(format!("{error:#}")))?;
    let url = link::endpoint(&config.master, config.insecure)
        .map_err(|error| Failure::Config(format!("master: {error}")))?;
    let tls = if url.starts_with("wss://") {
        Some(
            nightshift_proto::tls::client_config(
                config.tls.ca_file.as_deref(),
                config.tls.pin_sha256.as_deref(),
            )
            .map_err(|error| Failure::Config(format!("[tls]: {error:#}")))?,
        )
    } else {
        tracing::warn!("talking to the master without TLS (insecure = true)");
        None
    };
    Ok(Upstream::Master { url, token, tls })
}

/// One agent per state directory: a second one would fight over the spool
/// and the manual state.
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Failure> {
    let path: PathBuf = state_dir.join("agent.lock");
    let file = fs_err::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map(fs_err::File::into_file)
        .map_err(|error| Failure::Runtime(format!("cannot open {}: {error}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            Failure::Runtime(format!(
                "another agent already runs with state_dir {} ({}: {errno})",
                state_dir.display(),
                path.display()
            ))
        },
    )
}

fn spawn_signal_forwarder(signals: mpsc::UnboundedSender<SignalKind>) -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind as Kind, signal};
    let listen = |kind: Kind, name: &str| {
        signal(kind).map_err(|error| Failure::Runtime(format!("cannot handle {name}: {error}")))
    };
    let mut terminate = listen(Kind::terminate(), "SIGTERM")?;
    let mut interrupt = listen(Kind::interrupt(), "SIGINT")?;
    tokio::spawn(async move {
        loop {
            let kind = tokio::select! {
                Some(()) = terminate.recv() => SignalKind::Terminate,
                Some(()) = interrupt.recv() => SignalKind::Interrupt,
                else => return,
            };
            if signals.send(kind).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Samples foreign load on an interval and hands each sample to the loop.
/// The `/proc` and cgroup reads run on the blocking pool.
async fn sample_load(
    trees: Arc<BuildTrees>,
    clock: Arc<dyn Clock>,
    every: Duration,
    samples: mpsc::UnboundedSender<LoadMeasurement>,
) {
    let mut sampler = match LoadSampler::new() {
        Ok(sampler) => sampler,
        Err(error) => {
            tracing::warn!("{error}; load thresholds will not apply");
            return;
        }
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let trees = trees.clone();
        let at = clock.now();
        let sampled = tokio::task::spawn_blocking(move || {
            let sample = sampler.sample(&trees, at);
            (sampler, sample)
        })
        .await;
        let sample;
        (sampler, sample) = match sampled {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!("load sampling failed: {error}; load thresholds will not apply");
                return;
            }
        };
        if let Some(sample) = sample
            && samples.send(sample).is_err()
        {
            return;
        }
    }
}
