//! The daemon's view of wall-clock time, injectable so tests choose the instants.

use jiff::Timestamp;

/// Where the daemon reads "now" from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A wall clock that starts at a chosen instant and moves with tokio's clock,
/// so tests with paused tokio time (`tokio::time::advance`, auto-advance)
/// see wall time move exactly as far as the timers do.
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct FakeClock {
    start_wall: Timestamp,
    start_instant: tokio::time::Instant,
}

#[cfg(test)]
impl FakeClock {
    pub fn starting_at(start_wall: Timestamp) -> FakeClock {
        FakeClock {
            start_wall,
            start_instant: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        let elapsed = tokio::time::Instant::now() - self.start_instant;
        let elapsed = jiff::SignedDuration::try_from(elapsed).unwrap_or(jiff::SignedDuration::MAX);
        self.start_wall
            .checked_add(elapsed)
            .unwrap_or(Timestamp::MAX)
    }
}
