//! Fuzz target for `master.toml`, a file the admin controls: any text either
//! loads or is refused with errors that name the file, never a panic. A
//! seeded short pass runs with the tests; `NIGHTSHIFT_FUZZ_ITERS=1000000
//! cargo test --release -p nightshift-master fuzz_ -- --nocapture` runs a
//! long one.

use std::path::Path;

use nightshift_proto::fuzz::{self, Verdict};

use crate::config::MasterConfig;

/// The annotated example admins start from, and a small config that uses
/// master-side schedules and latent workers.
const SEEDS: &[&str] = &[
    include_str!("../../packaging/examples/master.toml"),
    r#"listen = "127.0.0.1:0"
data_dir = "data"
missing_timeout = "30s"
timezone = "America/New_York"

[[worker]]
name = "w1"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
schedule = [{ name = "day", open = "30 3,15 * * 6", close = "0 2,14 * * 0", state = "away" }]

[[worker]]
name = "l1"
latent = { provider = "process", build_wait_timeout = "2s" }

[[lock]]
name = "db"
max_count = 3

[[builder]]
name = "b"
workers = ["w1", "l1"]
locks = [{ name = "db", access = "counting" }]
steps = [{ name = "s", command = "true", timeout = "10s", workdir = "x" }]
"#,
];

const TOKENS: &[&str] = &[
    "[[worker]]",
    "[[builder]]",
    "[[lock]]",
    "name",
    "token_sha256",
    "max_builds",
    "latent",
    "provider",
    "command",
    "process",
    "start",
    "stop",
    "health",
    "build_wait_timeout",
    "start_timeout",
    "schedule",
    "timezone",
    "workers",
    "steps",
    "locks",
    "access",
    "exclusive",
    "counting",
    "scope",
    "master",
    "worker",
    "max_count",
    "timeout",
    "env",
    "workdir",
    "listen",
    "data_dir",
    "missing_timeout",
    "max_starting",
    "\"w1\"",
    "\"b\"",
    "\"db\"",
    "\"\"",
];

#[test]
fn fuzz_master_toml() {
    let seeds: Vec<String> = SEEDS.iter().map(|s| (*s).to_owned()).collect();
    let file = Path::new("/etc/nightshift/master.toml");
    let base = Path::new("/etc/nightshift");
    fuzz::run(
        "master.toml",
        &seeds,
        TOKENS,
        1_000,
        |input| match MasterConfig::parse(input, file, base) {
            Ok(_) => Verdict::Accepted,
            Err(error) => {
                let text = error.to_string();
                if !text.contains("master.toml") {
                    Verdict::Violation(format!("an error that does not name the file: {text}"))
                } else {
                    Verdict::Refused
                }
            }
        },
    );
}
