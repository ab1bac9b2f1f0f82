//! What the agent, the master and their CLIs share: the wire protocol, the
//! HTTP API shapes, TLS setup, config diagnostics and logging setup.

pub mod api;
pub mod diag;
pub mod fuzz;
pub mod log;
pub mod tls;
pub mod wire;
