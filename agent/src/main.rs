//! The `worker` binary: the command line of the `nightshift_agent` library.

use std::process::ExitCode;

fn main() -> ExitCode {
    nightshift_agent::run().into()
}
