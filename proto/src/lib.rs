//! What the agent, the master and their CLIs share: the wire protocol, the
//! HTTP API shapes, TLS setup (and session tickets that survive a restart), config diagnostics, logging setup, the exit
//! statuses, the Prometheus text format, streaming artifact transfer and the
//! fuzzer for peer input.

pub mod api;
pub mod clock;
pub mod diag;
pub mod env;
pub mod exit;
pub mod fuzz;
pub mod html;
pub mod log;
pub mod prometheus;
pub mod secret;
pub mod tls;
pub mod tls_tickets;
pub mod transfer;
pub mod when;
pub mod wire;
