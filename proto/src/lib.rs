//! What the agent, the master and their CLIs share: the wire protocol, the
//! HTTP API shapes, TLS setup and config diagnostics.

pub mod diag;
pub mod wire;
pub mod tls;
pub mod api;
