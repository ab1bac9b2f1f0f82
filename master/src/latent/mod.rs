//! Latent (on-demand) workers: the provider trait that starts and stops an
//! instance, and [`LatentPool`], the per-worker state machine
//! `stopped → starting → running → lingering → stopping → stopped` that the
//! scheduler drives.
//!
//! The pool is synchronous and reads no clock: every method takes a [`Now`]
//! and answers with [`LatentAction`]s (start or stop an instance, arm a
//! timer) for the caller to carry out. [`spawn_action`] carries one out on
//! tokio and reports its end as a [`LatentEvent`] through a callback, which
//! the scheduler turns into an event of its own loop (push, no polling).
//!
//! Adding a provider (a container runtime, a cloud API) is one new file that
//! implements [`LatentProvider`], plus its arm in [`ProviderSpec`] and
//! [`build_provider`].

pub mod command;
mod lifecycle;
mod pool;
pub mod process;
mod provider;
mod settings;
mod spawn;
mod tokens;

pub use lifecycle::{
    LatentAction, LatentChoice, LatentEvent, LatentState, LatentStatus, NotStartable, Now,
    TimerKind,
};
pub use pool::LatentPool;
pub use provider::{
    BoxFuture, Health, InstanceInfo, LatentProvider, MasterAccess, ProviderSpec, StartOutcome,
    build_provider,
};
pub use settings::{LatentSettings, NOT_NOW_RETRY, settings_from_config};
pub use spawn::spawn_action;
pub use tokens::LatentTokens;

#[cfg(test)]
mod tests;
