//! The CLI side of the control plane: `worker status`, `set-availability`, `stop`.

use std::process::ExitCode;

use crate::cli::{AvailabilityArg, ConfigArg};

pub fn status(_config: &ConfigArg, _json: bool) -> ExitCode {
    eprintln!("error: `worker status` is not built yet");
    ExitCode::FAILURE
}

pub fn set_availability(
    _config: &ConfigArg,
    _state: AvailabilityArg,
    _for: Option<String>,
    _until: Option<String>,
    _reason: Option<String>,
    _json: bool,
) -> ExitCode {
    eprintln!("error: `worker set-availability` is not built yet");
    ExitCode::FAILURE
}

pub fn stop(_config: &ConfigArg, _graceful: bool, _deadline: Option<String>) -> ExitCode {
    eprintln!("error: `worker stop` is not built yet");
    ExitCode::FAILURE
}
