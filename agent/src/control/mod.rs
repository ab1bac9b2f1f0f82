//! The agent's local control plane: status page, JSON API, metrics, and the CLI client.
//!
//! One axum router serves the status page (`/`, live via `/events`), the
//! JSON API (`/api/v1/…`) and `/metrics`, on TCP (`[control] listen`, for
//! the browser) and on the private Unix socket `state_dir/control.sock`
//! (for the CLI in [`client`]). Every request passes [`guard`]: a loopback
//! `Host`, no foreign `Origin`, and for anything that changes state the
//! control token or the page's CSRF token.

pub mod api;
pub mod client;
pub mod error;
pub mod guard;
pub mod metrics;
pub mod page;
pub mod server;
pub mod state;
pub mod when;

pub use server::serve;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
