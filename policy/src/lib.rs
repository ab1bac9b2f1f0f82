//! The availability model of a nightshift worker: given its owner's policies
//! and an instant, what is its presence, why, and when will that change?
//!
//! Architecture Invariant: this crate does no I/O, reads no clock and starts
//! no threads. Every instant is a parameter; every measurement is an input.

mod config;
mod cron;
pub mod duration;
mod firing;
mod load;
mod policy;
mod state;
mod window;

pub use config::{AvailabilityConfig, LoadConfig, ScheduleConfig};
pub use cron::CronSchedule;
pub use duration::{DurationSpec, format_duration, parse_duration};
pub use load::{ForeignLoadSample, LoadMonitor, LoadVerdict};
pub use policy::{
    CompileOptions, Inputs, Interval, MAX_PREVIEW_CHANGES, MAX_UNTIL_STEPS, ManualOverride,
    MasterOverride, Policy, PolicyError, PolicyOwner, PresenceChange, PresenceTracker, Preview,
};
pub use state::{Presence, PresenceState, Source, UnknownSource, UnknownState};
