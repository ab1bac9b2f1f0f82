//! The worker agent as a library: the `worker` binary is [`run`] (parse the
//! command line, hand each verb to its module); [`demo`] serves the status
//! page with made-up data for the `status-page-demo` example.

mod build_processes;
mod cli;
mod config;
mod control;
mod daemon;
pub mod demo;
mod enroll;
mod handle;
mod offline;
mod outlook;
mod supervise;

use nightshift_proto::exit::ExitStatus;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};

/// The `worker` command: parses the command line and runs its verb.
pub fn run() -> ExitStatus {
    dispatch(Cli::parse())
}

fn dispatch(cli: Cli) -> ExitStatus {
    match cli.command {
        Command::Run(config) => daemon::main(&config),
        Command::Status { config, json } => control::client::status(&config, json),
        Command::SetAvailability {
            config,
            state,
            for_,
            until,
            reason,
            json,
        } => control::client::set_availability(&config, state, for_, until, reason, json),
        Command::Stop {
            config,
            graceful,
            deadline,
        } => control::client::stop(&config, graceful, deadline),
        Command::Check(config) => offline::check(&config),
        Command::Enroll(config) => enroll::main(&config),
        Command::Schedule {
            config,
            from,
            days,
            json,
        } => offline::schedule(&config, from.as_deref(), days, json),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "worker", &mut std::io::stdout());
            ExitStatus::Ok
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitStatus::Ok,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitStatus::Failure
                }
            }
        }
    }
}
