//! The availability model of a nightshift worker: given its owner's policies
//! and an instant, what is its presence, why, and when will that change?
//!
//! Architecture Invariant: this crate does no I/O, reads no clock and starts
//! no threads. Every instant is a parameter; every measurement is an input.

mod state;

pub use state::{Presence, PresenceState, Source, UnknownSource, UnknownState};
