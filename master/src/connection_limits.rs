//! Connection cap (shed with "retry after") and the per-connection frame rate limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nightshift_proto::wire::AgentMessage;

use crate::config::AgentLimits;

/// Counts open connections against the cap. A slot is given back when its
/// [`ConnectionSlot`] drops, however the connection ended.
#[derive(Debug)]
pub struct ConnectionGate {
    open: AtomicUsize,
    max: usize,
}

impl ConnectionGate {
    pub fn new(max: usize) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            open: AtomicUsize::new(0),
            max: max.max(1),
        })
    }

    /// Takes a slot unless `max` connections are open.
    pub fn enter(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(self)))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One open connection's place under the cap.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<ConnectionGate>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up. Its
/// clock is a parameter, so tests choose the instants.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token, going into debt if there is none; answers how long
    /// until the debt is paid (zero when there was a token).
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What to do with one frame from an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameVerdict {
    /// Handle it now.
    Pass,
    /// Handle it after this pause (the connection is over its rate).
    Throttle(Duration),
    /// Close the connection with this reason.
    Disconnect(String),
}

/// The per-connection frame rate limit (`[agent_limits]`): every frame
/// counts against `frames_per_second` (over it, reading slows down:
/// backpressure); control frames also count against
/// `control_frames_per_second`, and an agent that exhausts that burst is
/// flooding and is disconnected.
#[derive(Debug, Clone)]
pub struct FrameLimits {
    all: TokenBucket,
    control: TokenBucket,
}

impl FrameLimits {
    pub fn new(limits: &AgentLimits, now: Instant) -> FrameLimits {
        FrameLimits {
            all: TokenBucket::new(
                f64::from(limits.frames_per_second),
                f64::from(limits.frame_burst),
                now,
            ),
            control: TokenBucket::new(
                f64::from(limits.control_frames_per_second),
                f64::from(limits.control_frame_burst),
                now,
            ),
        }
    }

    pub fn check(&mut self, message: &AgentMessage, now: Instant) -> FrameVerdict {
        let control = matches!(
            message,
            AgentMessage::Hello { .. }
                | AgentMessage::Presence { .. }
                | AgentMessage::BuildAccepted { .. }
                | AgentMessage::BuildRefused { .. }
                | AgentMessage::StepWaiting { .. }
                | AgentMessage::Goodbye { .. }
        );
        if control && !self.control.take(now).is_zero() {
            return FrameVerdict::Disconnect(format!(
                "rate limit: more than {} control frames (presence, step waits, \
                 accepted/refused) at over {}/s",
                self.control.burst, self.control.rate
            ));
        }
        match self.all.take(now) {
            wait if wait.is_zero() => FrameVerdict::Pass,
            wait => FrameVerdict::Throttle(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_policy::{Presence, PresenceState, Source};

    fn presence_frame() -> AgentMessage {
        AgentMessage::Presence {
            presence: Presence {
                state: PresenceState::Available,
                reason: "flip".into(),
                source: Source::Manual,
                since: jiff::Timestamp::UNIX_EPOCH,
                until: None,
            },
            outlook: None,
        }
    }

    fn output_frame() -> AgentMessage {
        AgentMessage::Output {
            build_id: 1,
            step: 0,
            data: "y\n".into(),
        }
    }

    #[test]
    fn output_past_the_burst_is_throttled_to_the_rate_and_never_disconnected() {
        let start = Instant::now();
        let defaults = AgentLimits::default();
        let mut limits = FrameLimits::new(&defaults, start);
        for _ in 0..defaults.frame_burst {
            assert_eq!(limits.check(&output_frame(), start), FrameVerdict::Pass);
        }
        match limits.check(&output_frame(), start) {
            FrameVerdict::Throttle(wait) => {
                assert_eq!(
                    wait,
                    Duration::from_secs_f64(1.0 / f64::from(defaults.frames_per_second))
                );
            }
            other => panic!("expected a throttle, got {other:?}"),
        }
        // Far over the rate for long: still only throttled (a chatty build).
        for _ in 0..10_000 {
            assert!(matches!(
                limits.check(&output_frame(), start),
                FrameVerdict::Throttle(_)
            ));
        }
        // Once the debt is paid (at the sustained rate), frames pass again.
        let later =
            start + Duration::from_secs_f64(10_002.0 / f64::from(defaults.frames_per_second));
        assert_eq!(limits.check(&output_frame(), later), FrameVerdict::Pass);
    }

    #[test]
    fn a_presence_flood_is_disconnected_but_a_steady_pace_is_not() {
        let start = Instant::now();
        let defaults = AgentLimits::default();
        let mut steady = FrameLimits::new(&defaults, start);
        for i in 0..10_000u32 {
            let at = start
                + Duration::from_secs_f64(
                    f64::from(i) / f64::from(defaults.control_frames_per_second),
                );
            assert_eq!(
                steady.check(&presence_frame(), at),
                FrameVerdict::Pass,
                "frame {i}"
            );
        }
        let mut flood = FrameLimits::new(&defaults, start);
        for _ in 0..defaults.control_frame_burst {
            assert_eq!(flood.check(&presence_frame(), start), FrameVerdict::Pass);
        }
        match flood.check(&presence_frame(), start) {
            FrameVerdict::Disconnect(why) => assert!(why.contains("rate limit"), "{why}"),
            other => panic!("expected a disconnect, got {other:?}"),
        }
    }

    #[test]
    fn configured_limits_are_the_ones_applied() {
        let start = Instant::now();
        let limits = AgentLimits {
            frames_per_second: 4,
            frame_burst: 2,
            control_frames_per_second: 1,
            control_frame_burst: 3,
            outbox_frames: 8,
        };
        let mut frames = FrameLimits::new(&limits, start);
        assert_eq!(frames.check(&output_frame(), start), FrameVerdict::Pass);
        assert_eq!(frames.check(&output_frame(), start), FrameVerdict::Pass);
        assert_eq!(
            frames.check(&output_frame(), start),
            FrameVerdict::Throttle(Duration::from_millis(250))
        );
        let mut control = FrameLimits::new(&limits, start);
        for _ in 0..3 {
            assert!(!matches!(
                control.check(&presence_frame(), start),
                FrameVerdict::Disconnect(_)
            ));
        }
        match control.check(&presence_frame(), start) {
            FrameVerdict::Disconnect(why) => {
                assert!(why.contains("more than 3 control frames"), "{why}");
                assert!(why.contains("over 1/s"), "{why}");
            }
            other => panic!("expected a disconnect, got {other:?}"),
        }
    }
}
