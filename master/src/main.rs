//! The `master` binary: parses the command line and runs one verb. Exit
//! codes ([`ExitStatus`]): 0 ok, 1 failure, 2 usage or config error.

mod actions;
mod api;
mod artifacts;
mod auth;
mod build_page;
mod cli;
mod client;
mod config;
#[cfg(test)]
mod config_fuzz;
mod connection_limits;
mod dashboard;
mod enrolment;
mod live_log;
mod locate;
mod logins;
mod run;
mod scheduler;
mod server;
mod session;
mod snapshot;
mod state;
mod store;
mod style;
mod triggers;
mod webhook;
mod worker_groups;

mod latent;
mod locks;
mod master_schedule;
mod metrics;
mod outbox;
mod reconfig;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use nightshift_proto::exit::ExitStatus;

use crate::cli::{Cli, Command};
use crate::config::ConfigErrors;

fn main() -> ExitCode {
    nightshift_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    nightshift_proto::log::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitStatus::Failure.into();
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(status) => status.into(),
        Err(e) => {
            if let Some(config) = e.downcast_ref::<ConfigErrors>() {
                eprintln!("{config}");
                return ExitStatus::Usage.into();
            }
            if let Some(usage) = e.downcast_ref::<cli::UsageError>() {
                eprintln!("error: {usage}");
                return ExitStatus::Usage.into();
            }
            eprintln!("error: {e:#}");
            ExitStatus::Failure.into()
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitStatus> {
    match cli.command {
        Command::Run {
            config,
            local_worker,
            listen,
        } => run::run(config.as_deref(), local_worker, listen).await,
        Command::Submit {
            builder,
            props,
            revision,
            branch,
            wait,
            json,
            conn,
        } => {
            client::submit(
                &client::connect(&conn)?,
                &builder,
                props,
                (revision, branch),
                wait,
                json,
            )
            .await
        }
        Command::Workers {
            json,
            state,
            name,
            offset,
            limit,
            conn,
        } => {
            let query = nightshift_proto::api::WorkerQuery {
                state,
                name,
                offset,
                limit,
            };
            client::workers(&client::connect(&conn)?, &query, json).await
        }
        Command::Builds { json, limit, conn } => {
            client::builds(&client::connect(&conn)?, limit, json).await
        }
        Command::Log {
            build_id,
            json,
            conn,
        } => client::log(&client::connect(&conn)?, build_id, json).await,
        Command::Artifacts {
            build_id,
            get,
            output,
            json,
            conn,
        } => {
            let client = client::connect(&conn)?;
            match get {
                Some(name) => {
                    client::get_artifact(&client, build_id, &name, output.as_deref(), json).await
                }
                None => client::artifacts(&client, build_id, json).await,
            }
        }
        Command::Cancel {
            build_id,
            reason,
            conn,
        } => client::cancel(&client::connect(&conn)?, build_id, reason.as_deref()).await,
        Command::Pause { json, conn } => {
            client::set_paused(&client::connect(&conn)?, true, json).await
        }
        Command::Resume { json, conn } => {
            client::set_paused(&client::connect(&conn)?, false, json).await
        }
        Command::Reconfig { json, conn } => client::reconfig(&client::connect(&conn)?, json).await,
        Command::AddWorker { name, url, config } => {
            run::add_worker(&name, url.as_deref(), config.as_deref())
        }
        Command::AddWorkerGroup { name, url, config } => {
            run::add_worker_group(&name, url.as_deref(), config.as_deref())
        }
        Command::RevokeWorker { name, json, conn } => {
            client::revoke_worker(&client::connect(&conn)?, &name, json).await
        }
        Command::Check { config } => run::check(config.as_deref()),
        Command::Init { path, force } => run::init(&path, force),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "master", &mut std::io::stdout());
            Ok(ExitStatus::Ok)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitStatus::Ok)
        }
    }
}
