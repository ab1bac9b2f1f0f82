//! The `master` command line: every verb and flag, as clap derive types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The nightshift build master: queues builds and hands them to workers that
/// take them on their owners' terms.
#[derive(Debug, Parser)]
#[command(name = "master", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the master in the foreground. Without --config it uses
    /// ./master.toml, then /etc/nightshift/master.toml, else an embedded
    /// default (data in ./nightshift-data).
    Run {
        /// master.toml to use.
        #[arg(long, short, env = "NIGHTSHIFT_MASTER_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also start a local worker (the `worker` binary next to this one).
        #[arg(long)]
        local_worker: bool,
        /// Listen here instead of the config's `listen` (e.g. 127.0.0.1:9443;
        /// port 0 picks a free port, printed on the ready line).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Queue a build; prints its id.
    Submit {
        /// The builder to run.
        builder: String,
        /// A build property, `key=value` (repeatable).
        #[arg(long = "prop", value_name = "KEY=VALUE", value_parser = parse_prop)]
        props: Vec<(String, String)>,
        /// Build this exact commit (full id) of the builder's source.
        #[arg(long, value_name = "SHA")]
        revision: Option<String>,
        /// Build this branch of the builder's source (its head, resolved by
        /// the master with `git ls-remote`; default: the builder's branch).
        #[arg(long, value_name = "BRANCH")]
        branch: Option<String>,
        /// Wait until the build ends; exit 0 on success, 1 otherwise.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the workers: state, reason, source, since, until, running builds.
    Workers {
        #[arg(long)]
        json: bool,
        /// Only workers in this state (available, reluctant, away, offline).
        #[arg(long)]
        state: Option<nightshift_policy::PresenceState>,
        /// Only workers whose name contains this text.
        #[arg(long)]
        name: Option<String>,
        /// Skip this many (in name order).
        #[arg(long)]
        offset: Option<usize>,
        /// Show at most this many (1 to 1000; default 1000).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the latest builds.
    Builds {
        #[arg(long)]
        json: bool,
        /// How many (newest first).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a build's log.
    Log {
        build_id: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List a build's artifacts (name, size, SHA-256), or download one with
    /// --get, checking its SHA-256.
    Artifacts {
        build_id: u64,
        /// Download this artifact (its name as listed, e.g. dist/x.tar.gz).
        #[arg(long, value_name = "NAME")]
        get: Option<String>,
        /// Where to write the download (default: the artifact's file name in
        /// the current directory).
        #[arg(long, short, value_name = "PATH", requires = "get")]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel a queued or running build.
    Cancel {
        build_id: u64,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Stop handing out new builds (running ones go on).
    Pause {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Hand out builds again.
    Resume {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Reload master.toml without interrupting running builds (as SIGHUP
    /// does). An invalid file is refused whole and the running config stays.
    Reconfig {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Write a master.toml to start from: the local worker and a sample
    /// builder (and the local worker's token in nightshift-data/).
    Init {
        /// Where to write it.
        #[arg(default_value = "master.toml", value_name = "FILE")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Make a token for a new worker; print its [[worker]] entry for
    /// master.toml and the lines for its worker.toml. For `local`, the
    /// token `master run --local-worker` uses.
    AddWorker {
        /// The worker's name.
        name: String,
        /// The master's URL as the worker reaches it (default: from the config).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// master.toml (for the listen address and the certificate pin).
        #[arg(long, short, env = "NIGHTSHIFT_MASTER_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate master.toml; errors name file, line and key.
    Check {
        /// master.toml (default: ./master.toml, then /etc/nightshift/master.toml).
        #[arg(long, short, env = "NIGHTSHIFT_MASTER_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

/// How a CLI verb finds the master.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// master.toml: the listen address, the admin token file and the
    /// certificate to trust (default ./master.toml, then
    /// /etc/nightshift/master.toml, else the embedded default's ./nightshift-data).
    #[arg(long, short, env = "NIGHTSHIFT_MASTER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The master's URL, e.g. https://farm.example:8443.
    #[arg(long, env = "NIGHTSHIFT_MASTER_URL", value_name = "URL")]
    pub url: Option<String>,
    /// The admin token.
    #[arg(
        long,
        env = "NIGHTSHIFT_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Trust the master's certificate via this CA / certificate file.
    #[arg(long, env = "NIGHTSHIFT_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Trust exactly the master certificate with this SHA-256.
    #[arg(long, env = "NIGHTSHIFT_PIN_SHA256", value_name = "HEX")]
    pub pin_sha256: Option<String>,
}

/// A command line that is wrong in a way clap cannot see (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn parse_prop(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn props_parse() {
        assert_eq!(parse_prop("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_prop("=x").is_err());
        assert!(parse_prop("nokey").is_err());
    }
}
