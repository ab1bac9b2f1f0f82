//! The agent's local control plane: status page, JSON API, metrics, and the CLI client.

pub mod client;
