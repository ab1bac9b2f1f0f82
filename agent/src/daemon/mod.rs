//! The agent daemon (`worker run`).

use std::process::ExitCode;

use crate::cli::ConfigArg;

pub fn main(_config: &ConfigArg) -> ExitCode {
    eprintln!("error: `worker run` is not built yet");
    ExitCode::FAILURE
}
