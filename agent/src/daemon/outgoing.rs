//! What the daemon sends its master, and the bounds on it: build frames
//! (output, step starts and ends, step waits) travel with a byte credit
//! taken by the runner before it sends them, given back when the link has
//! written the frame to the socket or dropped it; the queue from the event
//! loop to the link is bounded, and overflowing it costs a reconnect.
//!
//! The credit is the backpressure: when the link to the master is slower
//! than a step's output, the runner waits for credit, stops reading the
//! step's pipe, and the step blocks on its next write (like a program
//! writing to a slow terminal). Nothing is dropped while the master is
//! reachable; while it is not, live output is dropped (the build's result
//! carries the tail of its log, and is spooled until acknowledged).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nightshift_proto::wire::AgentMessage;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

/// Bytes of build frames in flight between the runner and the socket, for
/// all builds of the agent together.
pub const OUTPUT_CREDIT_BYTES: usize = 1024 * 1024;
/// What a build frame costs beyond its output text: a frame of one byte
/// still has a header, an id and an allocation. It also bounds the number
/// of build frames in flight to `OUTPUT_CREDIT_BYTES / FRAME_COST`.
pub const FRAME_COST: usize = 1024;
/// Frames queued from the event loop to the link. Build frames take at most
/// `OUTPUT_CREDIT_BYTES / FRAME_COST` (1024) of them; the rest are the
/// loop's own (presence changes, results, lock requests), one per change.
pub const LINK_QUEUE: usize = 2048;

/// The agent's pool of output credit, shared by all its builds.
#[derive(Debug, Clone)]
pub struct OutputCredit {
    pool: Arc<Semaphore>,
    size: usize,
}

impl Default for OutputCredit {
    fn default() -> Self {
        OutputCredit::new(OUTPUT_CREDIT_BYTES)
    }
}

impl OutputCredit {
    pub fn new(bytes: usize) -> OutputCredit {
        let size = bytes.clamp(FRAME_COST, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        OutputCredit {
            pool: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Waits until `text_bytes` of output plus a frame's cost may be in
    /// flight. A frame larger than the whole pool waits for all of it.
    pub async fn take(&self, text_bytes: usize) -> Credit {
        let want = (text_bytes.saturating_add(FRAME_COST)).min(self.size) as u32;
        match self.pool.clone().acquire_many_owned(want).await {
            Ok(permit) => Credit(Some(Arc::new(permit))),
            // The pool is never closed; if it were, nothing would wait.
            Err(_) => Credit(None),
        }
    }

    /// Bytes not in flight now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.pool.available_permits()
    }
}

/// Credit held by one frame; given back when the last copy is dropped.
#[derive(Clone, Default)]
pub struct Credit(Option<Arc<OwnedSemaphorePermit>>);

impl Credit {
    /// No credit: a frame the loop itself sends.
    pub fn none() -> Credit {
        Credit(None)
    }

    /// Bytes this frame holds.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |permit| permit.num_permits())
    }
}

impl std::fmt::Debug for Credit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credit({} bytes)", self.bytes())
    }
}

/// Credit is bookkeeping, not content: two events are equal whatever they hold.
impl PartialEq for Credit {
    fn eq(&self, _: &Credit) -> bool {
        true
    }
}

/// A frame for the master and the credit it holds until written.
#[derive(Debug)]
pub struct Outgoing {
    pub message: AgentMessage,
    pub credit: Credit,
}

impl From<AgentMessage> for Outgoing {
    fn from(message: AgentMessage) -> Outgoing {
        Outgoing {
            message,
            credit: Credit::none(),
        }
    }
}

/// The event loop's end of the queue to the link. It never waits: a full
/// queue means the link has not written anything for a long time; the
/// frame is dropped and the link is told to reconnect, and its next hello
/// and the results re-sent after the welcome bring the master up to date.
#[derive(Debug, Clone)]
pub struct LinkSender {
    queue: mpsc::Sender<Outgoing>,
    overflow: Arc<Overflow>,
}

/// The link's end of the queue.
#[derive(Debug)]
pub struct LinkReceiver {
    queue: mpsc::Receiver<Outgoing>,
    overflow: Arc<Overflow>,
}

#[derive(Debug, Default)]
struct Overflow {
    happened: AtomicBool,
    wake: Notify,
}

/// The link's view of an overflow of its queue.
#[derive(Debug, Clone)]
pub struct OverflowSignal(Arc<Overflow>);

impl OverflowSignal {
    /// Resolves when the queue overflowed since the last
    /// [`LinkReceiver::forget_overflow`].
    pub async fn happened(&self) {
        loop {
            let notified = self.0.wake.notified();
            if self.0.happened.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// The bounded queue from the event loop to the link.
pub fn link_queue(capacity: usize) -> (LinkSender, LinkReceiver) {
    let (queue, receiver) = mpsc::channel(capacity);
    let overflow = Arc::new(Overflow::default());
    (
        LinkSender {
            queue,
            overflow: overflow.clone(),
        },
        LinkReceiver {
            queue: receiver,
            overflow,
        },
    )
}

impl LinkSender {
    /// Queues a frame; false when it was dropped (queue full or link gone).
    pub fn send(&self, frame: impl Into<Outgoing>) -> bool {
        match self.queue.try_send(frame.into()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflow.happened.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "the queue to the master is full ({} frames): dropping frames and reconnecting",
                        self.queue.max_capacity()
                    );
                }
                self.overflow.wake.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl LinkReceiver {
    pub async fn recv(&mut self) -> Option<Outgoing> {
        self.queue.recv().await
    }

    pub fn try_recv(&mut self) -> Result<Outgoing, mpsc::error::TryRecvError> {
        self.queue.try_recv()
    }

    /// What tells the link that the queue overflowed.
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal(self.overflow.clone())
    }

    /// A new connection starts with what is queued discarded and no overflow.
    pub fn forget_overflow(&self) {
        self.overflow.happened.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn credit_is_given_back_when_the_frame_is_dropped() {
        let credit = OutputCredit::new(OUTPUT_CREDIT_BYTES);
        let held = credit.take(OUTPUT_CREDIT_BYTES).await;
        assert_eq!(held.bytes(), OUTPUT_CREDIT_BYTES);
        assert_eq!(credit.available(), 0);
        // The pool is empty: the next frame waits...
        let waiting = tokio::spawn({
            let credit = credit.clone();
            async move { credit.take(10).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // ...until the frame holding it is written or dropped, copies too.
        let copy = held.clone();
        drop(held);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(copy);
        let next = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("credit comes back")
            .unwrap();
        assert_eq!(next.bytes(), 10 + FRAME_COST);
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_frame_and_asks_for_a_reconnect() {
        let (sender, mut receiver) = link_queue(2);
        let ping = |seq| AgentMessage::Ping { seq };
        assert!(sender.send(ping(1)));
        assert!(sender.send(ping(2)));
        assert!(!sender.send(ping(3)), "the third frame does not fit");
        let overflow = receiver.overflow_signal();
        tokio::time::timeout(Duration::from_secs(10), overflow.happened())
            .await
            .expect("the link hears of the overflow");
        receiver.forget_overflow();
        let quiet = tokio::time::timeout(Duration::from_millis(50), overflow.happened()).await;
        assert!(quiet.is_err(), "forgotten until the next overflow");
        assert_eq!(receiver.try_recv().unwrap().message, ping(1));
        assert_eq!(receiver.try_recv().unwrap().message, ping(2));
        assert!(receiver.try_recv().is_err());
    }
}
