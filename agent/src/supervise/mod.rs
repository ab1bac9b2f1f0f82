//! Supervising a CI agent a farm already runs (buildbot-worker, GitLab
//! Runner, Buildkite agent, any command) on the owner's terms: the worker's
//! presence starts it, asks it to finish its job and exit, or stops it hard.
//!
//! `settings.rs` reads `[supervise]`; `process.rs` starts the agent in the
//! build accounting (its own process group, and the build cgroup when
//! delegated), keeps its pidfile, finds a leftover of a crashed run and
//! tells whether a job runs; `supervisor.rs` is the task that reconciles the
//! wanted state with the process.

mod process;
mod settings;
mod supervisor;

pub use process::claim_leftover;
pub use settings::{RawSuperviseSettings, ReluctantAction, SuperviseSettings, resolve};
pub use supervisor::{StopRequest, SupervisorLink, spawn};
