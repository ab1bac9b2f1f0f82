//! The `worker` command line: every verb and flag, as clap derive types.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The nightshift worker agent: takes builds from a nightshift master on
/// its owner's terms.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (systemd friendly).
    Run(ConfigArg),
    /// Show the running agent's state, reason, builds and master link.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (the shape of GET /api/v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Take the machine back, lend it, or return to the policies.
    SetAvailability {
        #[command(flatten)]
        config: ConfigArg,
        /// available, reluctant, away, or auto (back to the policies).
        state: AvailabilityArg,
        /// For how long, e.g. `2h`, `30m`, `1h30m`.
        #[arg(long = "for", value_name = "DURATION", conflicts_with = "until")]
        for_: Option<String>,
        /// Until when, e.g. `19:00` (the next one) or `2026-12-24T08:00`.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Why, shown on the status page and to the master's admin.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Print the resulting status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running agent.
    Stop {
        #[command(flatten)]
        config: ConfigArg,
        /// Finish the running build first (away with source `stopping`).
        #[arg(long)]
        graceful: bool,
        /// With --graceful: cancel (and re-queue) the build after this long, e.g. `30m`.
        #[arg(long, value_name = "DURATION", requires = "graceful")]
        deadline: Option<String>,
    },
    /// Enrol this machine in its worker group: trade the group's enrolment
    /// token (`enroll_token_file`) for this worker's own token, written to
    /// `token_file`. `worker run` does it by itself on its first start.
    Enroll(ConfigArg),
    /// Validate worker.toml and say what its policies mean.
    Check(ConfigArg),
    /// Show the coming intervals the schedules give.
    Schedule {
        #[command(flatten)]
        config: ConfigArg,
        /// Start instant (RFC 3339, or a local date/time); default now.
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// How many days to show.
        #[arg(long, default_value_t = 7, value_name = "N")]
        days: u32,
        /// Print one JSON array of {from, to, state, source}.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Path of worker.toml [default: ./worker.toml, else /etc/nightshift/worker.toml]
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        env = "NIGHTSHIFT_WORKER_CONFIG"
    )]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AvailabilityArg {
    Available,
    Reluctant,
    Away,
    Auto,
}
