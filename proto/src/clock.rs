//! The one source of "now" for both binaries, injectable so tests choose the
//! instants: [`Clock`], the real [`SystemClock`], a [`FixedClock`] that never
//! moves, and a [`TestClock`] that moves with tokio's (pausable) time.

use jiff::{SignedDuration, Timestamp};

/// Where wall-clock time is read from.
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

/// A clock stopped at one chosen instant (for tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub Timestamp);

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// A wall clock that starts at a chosen instant and moves with tokio's clock
/// (for tests), so tests with paused tokio time (`tokio::time::advance`,
/// auto-advance) see wall time move exactly as far as the timers do.
#[derive(Debug, Clone)]
pub struct TestClock {
    start_wall: Timestamp,
    start_instant: tokio::time::Instant,
}

impl TestClock {
    /// A clock reading `start_wall` now (tokio's now).
    pub fn starting_at(start_wall: Timestamp) -> TestClock {
        TestClock {
            start_wall,
            start_instant: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        let elapsed = tokio::time::Instant::now() - self.start_instant;
        let elapsed = SignedDuration::try_from(elapsed).unwrap_or(SignedDuration::MAX);
        self.start_wall
            .checked_add(elapsed)
            .unwrap_or(Timestamp::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_test_clock_moves_with_tokio_time_and_the_fixed_one_not_at_all() {
        let start: Timestamp = "2026-11-23T23:59:30Z".parse().unwrap();
        let (moving, fixed) = (TestClock::starting_at(start), FixedClock(start));
        assert_eq!(moving.now(), start);
        tokio::time::advance(std::time::Duration::from_secs(45)).await;
        assert_eq!(moving.now(), "2026-11-24T00:00:15Z".parse().unwrap());
        assert_eq!(fixed.now(), start);
    }
}
