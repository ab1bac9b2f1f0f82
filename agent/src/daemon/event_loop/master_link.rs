//! Master-link events of the event loop: the link coming up and down,
//! resending spooled results, and the master's frames.

use jiff::Timestamp;
use nightshift_policy::MasterOverride;
use nightshift_proto::wire::{AgentMessage, BuildId, MasterMessage};

use crate::daemon::link::LinkEvent;
use crate::daemon::runner::BuildRequest;

use crate::handle::MasterLink;

use tokio::time::Instant;

use super::{Daemon, Disposition};

impl Daemon {
    pub(super) fn on_link(&mut self, event: LinkEvent) {
        let now = self.clock.now();
        match event {
            LinkEvent::Up {
                presence,
                cancel,
                missing_timeout,
            } => {
                tracing::info!("connected to the master at {}", self.settings.master_url);
                self.fence.connected(missing_timeout);
                self.link = MasterLink {
                    url: self.settings.master_url.clone(),
                    connected: true,
                    since: Some(now),
                    error: None,
                };
                self.told_master = Some(presence);
                let current = self.tracker.current().cloned();
                if let Some(current) = current
                    && self.master_should_hear(&current)
                {
                    self.told_master = Some(current.clone());
                    self.send(AgentMessage::Presence {
                        presence: current,
                        outlook: Some(self.outlook.clone()),
                    });
                }
                for build_id in cancel {
                    if let Some(build) = self.builds.get_mut(&build_id) {
                        build.disposition = Disposition::Drop;
                        tracing::info!(
                            "the master no longer expects build {build_id}; cancelling it"
                        );
                        build
                            .control
                            .cancel("the master re-queued this build while the worker was away");
                    }
                }
                // Steps still waiting for their locks ask again: the master
                // answers at once when it granted them meanwhile.
                let waiting: Vec<(BuildId, u32)> = self
                    .builds
                    .iter()
                    .filter(|(_, build)| !matches!(build.disposition, Disposition::Drop))
                    .filter_map(|(id, build)| build.awaiting_grant.map(|step| (*id, step)))
                    .collect();
                for (build_id, step) in waiting {
                    self.send(AgentMessage::StepWaiting { build_id, step });
                }
                self.resend_spooled();
            }
            LinkEvent::Down { error } => {
                if self.link.connected {
                    tracing::warn!("lost the master: {error}; reconnecting");
                } else {
                    tracing::debug!("cannot reach the master: {error}");
                }
                self.link_down(now, error);
            }
            LinkEvent::Refused { reason } => {
                tracing::error!(
                    "the master refused this worker: {reason} (check `name` and the token in worker.toml); retrying"
                );
                self.link_down(now, format!("refused by the master: {reason}"));
            }
            LinkEvent::Frame(message) => self.on_master(message),
        }
    }

    pub(super) fn link_down(&mut self, now: Timestamp, error: String) {
        let changed = self.link.connected;
        self.link.connected = false;
        if changed {
            self.link.since = Some(now);
            self.fence.lost(Instant::now());
        }
        self.link.error = Some(error);
        // Nobody to wait for acks from.
        self.maybe_finish_stop();
    }

    pub(super) fn resend_spooled(&mut self) {
        let (results, problems) = self.spool.load_all();
        for problem in problems {
            tracing::error!("a spooled result is unreadable and was set aside: {problem}");
        }
        for result in results {
            if self.builds.contains_key(&result.build_id) {
                continue;
            }
            self.unacked.insert(result.build_id);
            self.send(AgentMessage::BuildFinished { result });
        }
    }

    pub(super) fn on_master(&mut self, message: MasterMessage) {
        match message {
            MasterMessage::StartBuild {
                build_id,
                builder,
                steps,
                properties,
                source,
                holds_locks,
                max_log_bytes,
            } => self.start_build(
                BuildRequest {
                    build_id,
                    builder,
                    steps,
                    properties,
                    source,
                    max_log_bytes,
                },
                holds_locks,
            ),
            MasterMessage::StepGranted { build_id, step } => match self.builds.get_mut(&build_id) {
                Some(build) => {
                    if build.awaiting_grant == Some(step) {
                        build.awaiting_grant = None;
                    }
                    build.granted_step = Some(step);
                    build.control.grant(step);
                }
                None => tracing::debug!("grant for build {build_id}, which is not running here"),
            },
            MasterMessage::CancelBuild { build_id, reason } => match self.builds.get(&build_id) {
                Some(build) => {
                    tracing::info!("the master cancels build {build_id}: {reason}");
                    build.control.cancel(reason);
                }
                None => tracing::debug!("cancel for build {build_id}, which is not running here"),
            },
            MasterMessage::ResultStored { build_id } => {
                self.unacked.remove(&build_id);
                if let Err(error) = self.spool.remove(build_id) {
                    tracing::warn!("cannot remove the spooled result of build {build_id}: {error}");
                }
                self.maybe_finish_stop();
            }
            MasterMessage::ResultRefused { build_id, reason } => {
                // Re-sending it on every reconnect would only be refused again.
                tracing::warn!(
                    "the master refused the result of build {build_id} ({reason}); \
                     dropped from the spool"
                );
                self.unacked.remove(&build_id);
                if let Err(error) = self.spool.remove(build_id) {
                    tracing::warn!("cannot remove the spooled result of build {build_id}: {error}");
                }
                self.maybe_finish_stop();
            }
            MasterMessage::Released { reason } => {
                if self.stop.is_some() && self.builds.is_empty() {
                    tracing::info!("the master released this worker: {reason}");
                    self.finish_stop();
                } else {
                    tracing::debug!("the master released this worker: {reason}");
                }
            }
            MasterMessage::MasterOverride { presence } => {
                self.inputs.master = presence.map(|presence| MasterOverride {
                    state: presence.state,
                    reason: presence.reason,
                    until: presence.until,
                });
                self.reevaluate();
            }
            MasterMessage::Welcome { .. }
            | MasterMessage::Refused { .. }
            | MasterMessage::Ping { .. }
            | MasterMessage::Pong { .. } => {}
        }
    }
}
