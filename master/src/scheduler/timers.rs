//! The scheduler's one timer facility: a [`DelayQueue`] owned by the event
//! loop, holding at most one timer per [`TimerSlot`] (per worker and kind), so
//! resetting a timer replaces it and a flapping connection piles up nothing.

use std::collections::HashMap;
use std::future::poll_fn;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue::Key;

use super::Event;

/// The longest one stretch of a timer in the queue (whose range is about two
/// years); a longer timer is re-armed for the rest when a stretch ends.
const MAX_STRETCH: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a timer is for; at most one timer per slot is armed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum TimerSlot {
    /// `missing_timeout` after the worker disconnected with builds.
    Missing(String),
    /// The grace after a reconnect for builds the hello did not list.
    Reconcile(String),
    /// The next boundary of any master-side schedule.
    ScheduleTick,
    /// The lease of a build's step lock grant (one step holds at a time).
    StepLease(nightshift_proto::wire::BuildId),
    /// The end of a re-queued build's cool-off from the worker whose lease
    /// of it ended.
    CoolOff(nightshift_proto::wire::BuildId),
}

/// The armed timers; each fires as the [`Event`] it was armed with.
#[derive(Default)]
pub(super) struct Timers {
    /// Each timer with its deadline (it may fire in several stretches).
    queue: DelayQueue<(TimerSlot, Instant, Event)>,
    armed: HashMap<TimerSlot, Key>,
}

impl Timers {
    /// Arms `slot` to deliver `event` after `delay`, replacing the timer the
    /// slot had. A delay beyond the queue's range is waited out in
    /// [`MAX_STRETCH`] stretches; one beyond the clock's range never fires.
    pub(super) fn set(&mut self, slot: TimerSlot, delay: Duration, event: Event) {
        self.cancel(&slot);
        let Some(deadline) = Instant::now().checked_add(delay) else {
            return;
        };
        let key = self
            .queue
            .insert((slot.clone(), deadline, event), delay.min(MAX_STRETCH));
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
        loop {
            let expired = poll_fn(|cx| self.queue.poll_expired(cx)).await?;
            let (slot, deadline, event) = expired.into_inner();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.armed.remove(&slot);
                return Some(event);
            }
            // A long timer's stretch ended: wait for the rest.
            let key = self
                .queue
                .insert((slot.clone(), deadline, event), left.min(MAX_STRETCH));
            self.armed.insert(slot, key);
        }
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

    #[tokio::test(start_paused = true)]
    async fn a_timer_beyond_the_queues_range_fires_at_its_deadline() {
        let mut timers = Timers::default();
        let long = Duration::from_secs(1000 * 24 * 3600);
        let start = tokio::time::Instant::now();
        timers.set(TimerSlot::Missing("a".into()), long, missing("a", 1));
        timers.set(
            TimerSlot::Missing("b".into()),
            Duration::MAX,
            missing("b", 1),
        );
        assert_eq!(fired(timers.next_expired().await), ("a".into(), 1));
        assert_eq!(start.elapsed(), long);
        assert!(timers.next_expired().await.is_none(), "b never fires");
    }
}
