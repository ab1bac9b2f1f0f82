//! Keeping a presence's `since` across evaluations.

use super::*;

/// Keeps `since` across evaluations: a fresh presence with the same state and
/// source as the current one keeps the current `since`.
#[derive(Debug, Clone, Default)]
pub struct PresenceTracker {
    current: Option<Presence>,
}

/// What an update changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// Nothing visible changed.
    Unchanged,
    /// Same state and source; reason or until changed.
    Details,
    /// State or source changed (or the first presence).
    State,
}

impl PresenceTracker {
    pub fn new() -> PresenceTracker {
        PresenceTracker::default()
    }

    pub fn current(&self) -> Option<&Presence> {
        self.current.as_ref()
    }

    /// Takes a fresh evaluation and says what changed.
    pub fn update(&mut self, mut fresh: Presence) -> PresenceChange {
        let change = match &self.current {
            Some(current) if current.state == fresh.state && current.source == fresh.source => {
                fresh.since = current.since;
                if current.reason == fresh.reason && current.until == fresh.until {
                    PresenceChange::Unchanged
                } else {
                    PresenceChange::Details
                }
            }
            _ => PresenceChange::State,
        };
        self.current = Some(fresh);
        change
    }
}
