//! What the agent, the master and their CLIs share: the wire protocol, the
//! HTTP API shapes, TLS setup and config diagnostics.

pub mod api;
pub mod diag;
pub mod tls;
pub mod wire;
