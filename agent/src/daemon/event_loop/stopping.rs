//! Stopping events of the event loop: signals, graceful stops with their
//! deadline, and exiting once the builds are done.

use std::time::Duration;

use nightshift_proto::wire::AgentMessage;
use tokio::time::Instant;

use super::{
    ACK_WAIT, Daemon, Disposition, Exit, SignalKind, StopMode, notify_systemd, seconds_text,
};

impl Daemon {
    pub(super) fn on_signal(&mut self, signal: SignalKind) {
        let name = match signal {
            SignalKind::Terminate => "SIGTERM",
            SignalKind::Interrupt => "SIGINT",
        };
        if self.stop.is_some() {
            self.stop_now(&format!("a second {name}"));
        } else {
            self.begin_stop(None, name);
        }
    }

    pub(super) fn begin_stop(&mut self, deadline: Option<Duration>, why: &str) {
        self.stop_requests += 1;
        if let Some(StopMode::Now) = self.stop {
            return;
        }
        let now = Instant::now();
        self.stop_began.get_or_insert(now);
        let deadline = deadline.map(|deadline| now + deadline);
        let deadline = match (self.stop, deadline) {
            // A later request can only bring the deadline closer.
            (
                Some(StopMode::Graceful {
                    deadline: Some(old),
                }),
                Some(new),
            ) => Some(old.min(new)),
            (
                Some(StopMode::Graceful {
                    deadline: Some(old),
                }),
                None,
            ) => Some(old),
            (_, new) => new,
        };
        tracing::info!(
            "stopping gracefully ({why}): away, finishing {} running build(s){}",
            self.builds.len(),
            match deadline {
                Some(deadline) => format!(
                    ", cancelling them in {} s",
                    seconds_text(deadline.saturating_duration_since(now))
                ),
                None => String::new(),
            }
        );
        self.stop = Some(StopMode::Graceful { deadline });
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        self.inputs.stopping = true;
        self.reevaluate();
        self.maybe_finish_stop();
    }

    pub(super) fn stop_now(&mut self, why: &str) {
        tracing::info!(
            "stopping now ({why}): cancelling {} running build(s)",
            self.builds.len()
        );
        self.stop = Some(StopMode::Now);
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        self.inputs.stopping = true;
        self.reevaluate();
        let reason = format!("the worker stopped at once ({why}); the master re-queues the build");
        for build in self.builds.values_mut() {
            // It ran: its result says so (cancelled, with the reason), and
            // the master re-queues it as a retry.
            build.disposition = Disposition::Report;
            build.control.cancel(&reason);
        }
        self.maybe_finish_stop();
    }

    pub(super) fn on_stop_timer(&mut self) {
        if let Some(StopMode::Graceful {
            deadline: Some(deadline),
        }) = self.stop
            && deadline <= Instant::now()
            && !self.builds.is_empty()
        {
            tracing::info!(
                "stop deadline reached: cancelling {} build(s) for the master to re-queue",
                self.builds.len()
            );
            self.stop = Some(StopMode::Now);
            let given = self.stop_began.map_or(Duration::ZERO, |began| {
                deadline.saturating_duration_since(began)
            });
            let reason = format!("its stop deadline of {} s ran out", seconds_text(given));
            for build in self.builds.values_mut() {
                // It ran: its result says so (cancelled, with the reason),
                // and the master re-queues it as a retry.
                build.disposition = Disposition::Report;
                build.control.cancel(&reason);
            }
        }
        if self
            .ack_wait_until
            .is_some_and(|until| until <= Instant::now())
        {
            tracing::warn!(
                "the master did not acknowledge {} result(s); they stay spooled for the next start",
                self.unacked.len()
            );
            self.finish_stop();
        }
    }

    /// Exits when stopping, no build runs, and every result is acknowledged
    /// (or the master is unreachable, or the wait for acks ran out).
    pub(super) fn maybe_finish_stop(&mut self) {
        if self.stop.is_none() || !self.builds.is_empty() || self.exit.is_some() {
            return;
        }
        if let Some(supervisor) = &self.supervisor {
            // The deadline, if any, travelled with the stop request: the
            // supervisor sends the hard signal itself.
            self.steer_supervisor();
            if !supervisor.is_idle() {
                return;
            }
        }
        if self.unacked.is_empty() || !self.link.connected {
            self.finish_stop();
        } else if self.ack_wait_until.is_none() {
            self.ack_wait_until = Some(Instant::now() + ACK_WAIT);
        }
    }

    pub(super) fn finish_stop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        let reason = if self.stop_requests > 0 || self.stop.is_some() {
            "the worker stopped".to_owned()
        } else {
            "the worker is shutting down".to_owned()
        };
        // Sent even while disconnected: the link task ends on a goodbye.
        let _ = self.to_master.send(AgentMessage::Goodbye {
            reason: reason.clone(),
        });
        tracing::info!("all builds done; exiting");
        self.exit = Some(Exit::Stopped(reason));
    }
}
