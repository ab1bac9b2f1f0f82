//! `nightshift-soak`: runs the fault soak (see `nightshift_tests::soak`)
//! against the `master` and `worker` binaries next to it and prints one
//! summary line; exits 1 on any violation, 2 when the soak itself could not run.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nightshift_tests::soak::{SoakConfig, run};

/// Runs a real master and real agents through many builds under random
/// faults and checks that nothing is lost, duplicated, started while away,
/// over-locked, forged or started where a window's close would cut it.
#[derive(Debug, Parser)]
#[command(name = "nightshift-soak", version)]
struct Args {
    /// How many builds to submit.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// How many real agents.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// How many workers take builds only in short windows (1-4 s) their
    /// owner opens now and then; admission must not start a build there
    /// that a window's close would cut.
    #[arg(long, default_value_t = 2)]
    windowed: usize,
    /// Seed of the faults and builds (the same seed injects the same faults).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Never SIGKILL the master.
    #[arg(long)]
    no_master_faults: bool,
    /// Seconds to wait for the last builds after the faults stop.
    #[arg(long, default_value_t = 300)]
    drain_secs: u64,
    /// Print the report as JSON instead of the summary line.
    #[arg(long)]
    json: bool,
    /// Keep the farm's directory (master and worker logs, database, ledger,
    /// report.json) even after a clean run; after a violation it is always
    /// kept, and its path printed.
    #[arg(long)]
    keep_dir: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = SoakConfig {
        builds: args.builds,
        workers: args.workers.max(1),
        windowed: args.windowed,
        seed: args.seed,
        master_faults: !args.no_master_faults,
        drain_deadline: Duration::from_secs(args.drain_secs),
        keep_dir: args.keep_dir,
    };
    match run(config).await {
        Ok(report) => {
            for violation in &report.violations {
                eprintln!("violation: {violation}");
            }
            for line in &report.ran_past {
                eprintln!("ran past its window: {line}");
            }
            for line in &report.ledger_torn {
                eprintln!(
                    "a torn ledger line (its step was killed while writing), skipped: {line:?}"
                );
            }
            if let Some(dir) = &report.kept_dir {
                eprintln!(
                    "the farm's directory is kept: {dir} (master.log, workers/*/worker.log, \
                     ledger, report.json with every fault and when)"
                );
            }
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("the report serializes")
                );
            } else {
                println!("{}", report.summary());
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("nightshift-soak: {error:#}");
            ExitCode::from(2)
        }
    }
}
