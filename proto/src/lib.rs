//! What the agent, the master and their CLIs share: the wire protocol, the
//! HTTP API shapes, TLS setup, config diagnostics, logging setup and the
//! exit statuses.

pub mod api;
pub mod diag;
pub mod exit;
pub mod log;
pub mod tls;
pub mod wire;
