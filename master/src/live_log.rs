//! Live build output for the dashboard's build page: a bounded broadcast per
//! build that somebody watches, fed by the store thread right after each
//! output chunk is written, so a viewer that subscribes inside a store job
//! gets exactly the chunks its snapshot of the log did not contain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nightshift_proto::wire::BuildId;
use tokio::sync::broadcast;

/// Chunks held for the slowest viewer of one build; a viewer further behind
/// is told it skipped output (the stored log stays complete).
pub const LIVE_CHUNKS: usize = 64;

/// What a viewer of a build's live log receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// A chunk of output of step `step` (0-based).
    Output { step: u32, data: String },
    /// The build has finished (or was cancelled before it ran): no more output.
    Finished,
}

/// The broadcasts of the builds someone watches. Publishing to a build
/// nobody watches costs one map lookup.
#[derive(Clone, Default)]
pub struct LiveLogs {
    watched: Arc<Mutex<HashMap<BuildId, broadcast::Sender<LiveEvent>>>>,
}

impl LiveLogs {
    /// A receiver of `id`'s events from now on.
    pub fn subscribe(&self, id: BuildId) -> broadcast::Receiver<LiveEvent> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched
            .entry(id)
            .or_insert_with(|| broadcast::channel(LIVE_CHUNKS).0)
            .subscribe()
    }

    /// Hands a chunk to `id`'s viewers; forgets the build once nobody watches.
    pub fn publish(&self, id: BuildId, step: u32, data: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = watched.get(&id) else {
            return;
        };
        let event = LiveEvent::Output {
            step,
            data: data.to_owned(),
        };
        if sender.send(event).is_err() {
            watched.remove(&id);
        }
    }

    /// Tells `id`'s viewers the build is over and forgets it.
    pub fn finish(&self, id: BuildId) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = watched.remove(&id) {
            let _ = sender.send(LiveEvent::Finished);
        }
    }

    /// How many builds have a broadcast (for tests).
    #[cfg(test)]
    pub fn watched(&self) -> usize {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_get_chunks_and_the_end_and_unwatched_builds_cost_nothing() {
        let live = LiveLogs::default();
        live.publish(1, 0, "nobody sees this");
        assert_eq!(live.watched(), 0);
        let mut rx = live.subscribe(1);
        live.publish(1, 0, "a\n");
        live.publish(2, 0, "other build\n");
        live.finish(1);
        assert_eq!(
            rx.try_recv().unwrap(),
            LiveEvent::Output {
                step: 0,
                data: "a\n".into()
            }
        );
        assert_eq!(rx.try_recv().unwrap(), LiveEvent::Finished);
        assert_eq!(live.watched(), 0);
    }

    #[test]
    fn a_build_is_forgotten_when_its_last_viewer_leaves() {
        let live = LiveLogs::default();
        drop(live.subscribe(3));
        live.publish(3, 0, "x");
        assert_eq!(live.watched(), 0);
    }

    #[test]
    fn a_slow_viewer_lags_instead_of_growing() {
        let live = LiveLogs::default();
        let mut rx = live.subscribe(4);
        for i in 0..LIVE_CHUNKS + 10 {
            live.publish(4, 0, &format!("{i}\n"));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
    }
}
