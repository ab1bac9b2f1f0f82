//! The `worker` binary: parses the command line and hands each verb to its module.

mod build_processes;
mod cli;
mod config;
mod control;
mod daemon;
mod enroll;
mod handle;
mod offline;
mod outlook;
mod supervise;

use std::process::ExitCode;

use nightshift_proto::exit::ExitStatus;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    dispatch(Cli::parse()).into()
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
