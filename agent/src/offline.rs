//! The verbs that need no running agent: `worker check` and `worker schedule`.

use std::process::ExitCode;

use crate::cli::ConfigArg;

pub fn check(_config: &ConfigArg) -> ExitCode {
    eprintln!("error: `worker check` is not built yet");
    ExitCode::FAILURE
}

pub fn schedule(_config: &ConfigArg, _from: Option<&str>, _days: u32, _json: bool) -> ExitCode {
    eprintln!("error: `worker schedule` is not built yet");
    ExitCode::FAILURE
}
