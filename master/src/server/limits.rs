//! Connection cap (shed with "retry after") and the per-connection frame rate limit.

use super::*;

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
