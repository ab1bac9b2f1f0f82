//! Serves the worker's local status page with made-up data, to look at it in
//! a browser: `cargo run -p nightshift-agent --example status-page-demo`.
//! `NIGHTSHIFT_DEMO_LISTEN` (default `127.0.0.1:0`, any free port) and
//! `NIGHTSHIFT_DEMO_SECS` (default 600) say where and for how long; Ctrl-C
//! stops it sooner.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listen: SocketAddr = std::env::var("NIGHTSHIFT_DEMO_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:0".into())
        .parse()
        .context("NIGHTSHIFT_DEMO_LISTEN: not an address and port (e.g. 127.0.0.1:7878)")?;
    let secs: u64 = match std::env::var("NIGHTSHIFT_DEMO_SECS") {
        Ok(text) => text
            .parse()
            .context("NIGHTSHIFT_DEMO_SECS: not a whole number of seconds")?,
        Err(_) => 600,
    };
    let state_dir = tempfile::tempdir().context("a temporary state directory")?;
    nightshift_agent::demo::serve(listen, state_dir.path(), Duration::from_secs(secs)).await
}
