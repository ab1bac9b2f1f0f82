//! The lock fence: an agent that has lost the master stops, after half of
//! the master's `missing_timeout`, the builds that hold master-wide locks
//! (a step running on a grant, or a builder's whole-build locks). Once that
//! timeout ends the master re-queues the worker's builds and gives their
//! locks to others; stopping first means a lock never has two holders.

use std::time::Duration;

use tokio::time::Instant;

use super::{Daemon, Disposition, seconds_text};

/// What the fence knows: the master's `missing_timeout` (from its last
/// welcome) and when the link to it was lost.
#[derive(Debug, Default)]
pub(super) struct LockFence {
    missing_timeout: Option<Duration>,
    lost_at: Option<Instant>,
}

impl LockFence {
    /// Welcomed: `missing_timeout` as the master said (`None` from a
    /// master that does not say, which leaves the fence off).
    pub(super) fn connected(&mut self, missing_timeout: Option<Duration>) {
        self.missing_timeout = missing_timeout;
        self.lost_at = None;
    }

    /// The link was lost at `at`.
    pub(super) fn lost(&mut self, at: Instant) {
        self.lost_at.get_or_insert(at);
    }

    /// When builds holding locks must stop: half of the master's
    /// `missing_timeout` after the link was lost.
    fn falls_at(&self) -> Option<Instant> {
        Some(self.lost_at? + self.missing_timeout? / 2)
    }
}

impl Daemon {
    /// When the loop must wake for the fence: only while the master is
    /// lost and a build holds locks it has not cancelled yet.
    pub(super) fn fence_wake(&self) -> Option<Instant> {
        let at = self.fence.falls_at()?;
        self.builds
            .values()
            .any(|build| build.holds_locks() && !build.fenced)
            .then_some(at)
    }

    /// Cancels the builds holding locks once the fence has fallen. Each
    /// reports its result (cancelled, with the reason), so the master
    /// counts a retry.
    pub(super) fn on_lock_fence(&mut self) {
        let Some(at) = self.fence_wake() else {
            return;
        };
        if at > Instant::now() {
            return;
        }
        let timeout = self.fence.missing_timeout.unwrap_or_default();
        let reason = format!(
            "the master was lost for {} s while this build held locks; it gives them to \
             others after its missing_timeout of {} s",
            seconds_text(timeout / 2),
            seconds_text(timeout)
        );
        for (build_id, build) in &mut self.builds {
            if build.holds_locks() && !build.fenced {
                tracing::warn!("cancelling build {build_id}: {reason}");
                build.fenced = true;
                build.disposition = Disposition::Report;
                build.control.cancel(&reason);
            }
        }
    }
}
