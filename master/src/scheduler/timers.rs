//! The scheduler's one timer facility: a [`DelayQueue`] owned by the event
//! loop, holding at most one timer per [`TimerSlot`] (per worker and kind), so
//! resetting a timer replaces it and a flapping connection piles up nothing.

use std::collections::HashMap;
use std::future::poll_fn;
use std::time::Duration;

use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue::Key;

use super::Event;

/// What a timer is for; at most one timer per slot is armed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum TimerSlot {
    /// `missing_timeout` after the worker disconnected with builds.
    Missing(String),
    /// The grace after a reconnect for builds the hello did not list.
    Reconcile(String),
    /// The next boundary of any master-side schedule.
    ScheduleTick,
}

/// The armed timers; each fires as the [`Event`] it was armed with.
#[derive(Default)]
pub(super) struct Timers {
    queue: DelayQueue<(TimerSlot, Event)>,
    armed: HashMap<TimerSlot, Key>,
}

impl Timers {
    /// Arms `slot` to deliver `event` after `delay`, replacing the timer the
    /// slot had.
    pub(super) fn set(&mut self, slot: TimerSlot, delay: Duration, event: Event) {
        self.cancel(&slot);
        let key = self.queue.insert((slot.clone(), event), delay);
        self.armed.insert(slot, key);
    }

    /// Disarms `slot` (nothing happens if it is not armed).
    pub(super) fn cancel(&mut self, slot: &TimerSlot) {
        if let Some(key) = self.armed.remove(slot) {
            self.queue.remove(&key);
        }
    }

    /// How many timers are armed.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.armed.len()
    }

    /// The event of the next timer to fire, when it fires; `None` at once
    /// when no timer is armed (the event loop then waits for its inbox only,
    /// and polls again after the next event, which may arm one).
    pub(super) async fn next_expired(&mut self) -> Option<Event> {
        let expired = poll_fn(|cx| self.queue.poll_expired(cx)).await?;
        let (slot, event) = expired.into_inner();
        self.armed.remove(&slot);
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(worker: &str, epoch: u64) -> Event {
        Event::MissingTimeout {
            worker: worker.into(),
            epoch,
        }
    }

    fn fired(event: Option<Event>) -> (String, u64) {
        match event {
            Some(Event::MissingTimeout { worker, epoch }) => (worker, epoch),
            other => panic!("expected a missing timeout, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_replaces_the_timer_and_fires_once_at_the_new_deadline() {
        let mut timers = Timers::default();
        let slot = TimerSlot::Missing("a".into());
        timers.set(slot.clone(), Duration::from_secs(60), missing("a", 1));
        tokio::time::advance(Duration::from_secs(50)).await;
        timers.set(slot, Duration::from_secs(60), missing("a", 3));
        assert_eq!(timers.len(), 1);
        let start = tokio::time::Instant::now();
        assert_eq!(fired(timers.next_expired().await), ("a".into(), 3));
        assert_eq!(start.elapsed(), Duration::from_secs(60), "the new deadline");
        assert_eq!(timers.len(), 0);
        assert!(timers.next_expired().await.is_none(), "nothing else armed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_timer_never_fires_and_slots_are_independent() {
        let mut timers = Timers::default();
        timers.set(
            TimerSlot::Missing("a".into()),
            Duration::from_secs(10),
            missing("a", 1),
        );
        timers.set(
            TimerSlot::Missing("b".into()),
            Duration::from_secs(20),
            missing("b", 1),
        );
        timers.set(
            TimerSlot::Reconcile("a".into()),
            Duration::from_secs(5),
            Event::ReconcileDeadline {
                worker: "a".into(),
                conn: 7,
            },
        );
        timers.cancel(&TimerSlot::Missing("a".into()));
        timers.cancel(&TimerSlot::ScheduleTick); // not armed: no effect
        assert_eq!(timers.len(), 2);
        assert!(matches!(
            timers.next_expired().await,
            Some(Event::ReconcileDeadline { conn: 7, .. })
        ));
        assert_eq!(fired(timers.next_expired().await), ("b".into(), 1));
        assert!(timers.next_expired().await.is_none());
    }
}
