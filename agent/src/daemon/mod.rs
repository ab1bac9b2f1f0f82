//! The agent daemon (`worker run`): loads the config, starts the master
//! link, the load sampler, the control plane and signal handling around one
//! event loop, and exits 0 after a clean stop, 1 on failure, 2 on a bad config.

pub mod clock;
pub mod event_loop;
mod files;
pub mod link;
pub mod load;
pub mod manual;
pub mod runner;
pub mod spool;

use std::process::ExitCode;

use crate::cli::ConfigArg;

pub fn main(_config: &ConfigArg) -> ExitCode {
    eprintln!("error: `worker run` is not built yet");
    ExitCode::FAILURE
}
