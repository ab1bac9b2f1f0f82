//! What the agent, the master and their CLIs share: the wire protocol, the
//! HTTP API shapes, TLS setup, config diagnostics, logging setup and the
//! Prometheus text format.

pub mod api;
pub mod diag;
pub mod fuzz;
pub mod log;
pub mod prometheus;
pub mod tls;
pub mod wire;
