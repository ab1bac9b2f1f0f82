//! An agent connection's outbox: the bounded queue of frames the scheduler
//! sends to one agent. The scheduler never waits on an agent: when an agent
//! does not read its frames and the outbox is full, the frame is not queued
//! and the connection is closed ("outbox full"); the agent reconnects and
//! the hello reconciles what it missed (unlisted builds are re-queued, lock
//! grants are asked for again, results re-sent).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nightshift_proto::wire::MasterMessage;
use tokio::sync::{Notify, mpsc, watch};

use crate::metrics::{DisconnectReason, METRICS};

/// What the scheduler sends a connection task.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    Message(MasterMessage),
    /// Close the connection, logging the reason.
    Close(String),
    /// Hold back the frames after this one until this store write is
    /// committed (what they tell the agent must survive a master crash).
    AfterCommit(Committed),
}

/// Frames one agent's outbox holds unless `[agent_limits] outbox_frames`
/// says otherwise.
#[cfg(test)]
pub const OUTBOX_FRAMES: usize = 1024;

/// The scheduler's end of an outbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentOutbox {
    frames: mpsc::Sender<Outbound>,
    overflow: Arc<Overflow>,
}

/// The connection task's end.
#[derive(Debug)]
pub struct OutboxReceiver {
    frames: mpsc::Receiver<Outbound>,
    overflow: Arc<Overflow>,
}

#[derive(Debug, Default)]
struct Overflow {
    full: AtomicBool,
    notify: Notify,
}

/// A new outbox holding `capacity` frames.
pub fn agent_outbox(capacity: usize) -> (AgentOutbox, OutboxReceiver) {
    let (frames, receiver) = mpsc::channel(capacity);
    let overflow = Arc::new(Overflow::default());
    (
        AgentOutbox {
            frames,
            overflow: Arc::clone(&overflow),
        },
        OutboxReceiver {
            frames: receiver,
            overflow,
        },
    )
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxError {
    /// The agent does not read: its connection is being closed.
    Full,
    /// The connection is gone.
    Closed,
}

impl AgentOutbox {
    /// Queues `frame` without waiting.
    pub fn send(&self, frame: Outbound) -> Result<(), OutboxError> {
        match self.frames.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(OutboxError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflow.full.swap(true, Ordering::Relaxed) {
                    METRICS.disconnected(DisconnectReason::OutboxFull);
                    self.overflow.notify.notify_one();
                }
                Err(OutboxError::Full)
            }
        }
    }
}

/// A store write an agent must not hear of before it is committed (a
/// hand-out: a master killed before the commit would forget a build the
/// agent runs, and hand it out again). The scheduler queues it in an outbox
/// ahead of the frame that depends on it ([`Outbound::AfterCommit`]); the
/// connection task holds back that frame, and every later one, until the
/// write's transaction has ended.
#[derive(Debug, Clone)]
pub struct Committed(watch::Receiver<bool>);

/// The store's end of a [`Committed`].
#[derive(Debug)]
pub struct CommitSignal(watch::Sender<bool>);

/// A new pair: the store fires the signal after the transaction.
pub fn commit_signal() -> (CommitSignal, Committed) {
    let (sender, receiver) = watch::channel(false);
    (CommitSignal(sender), Committed(receiver))
}

impl CommitSignal {
    /// The transaction ended (committed, or failed and logged).
    pub fn fire(self) {
        let _ = self.0.send(true);
    }
}

impl Committed {
    /// Waits for the transaction's end (or for the store thread's, if it
    /// stopped without one).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|done| *done).await;
    }
}

impl PartialEq for Committed {
    fn eq(&self, other: &Committed) -> bool {
        self.0.same_channel(&other.0)
    }
}

/// What the connection task gets next.
#[derive(Debug, PartialEq)]
pub enum Next {
    Frame(Outbound),
    /// The outbox overflowed: close the connection.
    Overflowed,
    /// The scheduler dropped the outbox (the master is stopping, or a newer
    /// connection replaced this one).
    Dropped,
}

impl OutboxReceiver {
    /// The next queued frame, without waiting (for tests).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Result<Outbound, mpsc::error::TryRecvError> {
        self.frames.try_recv()
    }

    /// The next frame to send, or why there is none.
    pub async fn next(&mut self) -> Next {
        if self.overflow.full.load(Ordering::Relaxed) {
            return Next::Overflowed;
        }
        tokio::select! {
            frame = self.frames.recv() => match frame {
                Some(frame) => Next::Frame(frame),
                None => Next::Dropped,
            },
            () = self.overflow.notify.notified() => Next::Overflowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_outbox_refuses_the_frame_and_closes_the_connection() {
        let (outbox, mut receiver) = agent_outbox(2);
        assert_eq!(outbox.send(Outbound::Close("a".into())), Ok(()));
        assert_eq!(outbox.send(Outbound::Close("b".into())), Ok(()));
        assert_eq!(
            outbox.send(Outbound::Close("c".into())),
            Err(OutboxError::Full)
        );
        assert_eq!(receiver.next().await, Next::Overflowed);
        drop(receiver);
        assert_eq!(
            outbox.send(Outbound::Close("d".into())),
            Err(OutboxError::Closed)
        );
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_a_dropped_outbox_says_so() {
        let (outbox, mut receiver) = agent_outbox(4);
        outbox.send(Outbound::Close("1".into())).unwrap();
        outbox.send(Outbound::Close("2".into())).unwrap();
        drop(outbox);
        assert_eq!(
            receiver.next().await,
            Next::Frame(Outbound::Close("1".into()))
        );
        assert_eq!(
            receiver.next().await,
            Next::Frame(Outbound::Close("2".into()))
        );
        assert_eq!(receiver.next().await, Next::Dropped);
    }
}
