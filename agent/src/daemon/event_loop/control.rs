//! Control-plane events of the event loop: the owner's commands and manual
//! states.

use std::time::Duration;

use nightshift_policy::{ManualOverride, Presence};

use crate::daemon::manual;

use crate::handle::{ControlCommand, ManualRequest};

use super::Daemon;

impl Daemon {
    pub(super) fn on_control(&mut self, command: ControlCommand) {
        match command {
            ControlCommand::SetManual { manual, reply } => {
                let result = self.set_manual(manual);
                let _ = reply.send(result);
            }
            ControlCommand::Stop {
                graceful,
                deadline,
                reply,
            } => {
                let result = if graceful {
                    match deadline.map(Duration::try_from) {
                        Some(Err(_)) => Err(format!(
                            "the deadline must not be negative (got {deadline:?})"
                        )),
                        Some(Ok(deadline)) => {
                            self.begin_stop(Some(deadline), "`worker stop --graceful`");
                            Ok(())
                        }
                        None => {
                            self.begin_stop(None, "`worker stop --graceful`");
                            Ok(())
                        }
                    }
                } else {
                    self.stop_now("`worker stop`");
                    Ok(())
                };
                let _ = reply.send(result);
            }
        }
    }

    pub(super) fn set_manual(
        &mut self,
        request: Option<ManualRequest>,
    ) -> Result<Presence, String> {
        let now = self.clock.now();
        let manual = match request {
            None => None,
            Some(request) => {
                if request.until.is_some_and(|until| until <= now) {
                    return Err(format!(
                        "`until` ({}) is not in the future",
                        request.until.map(|t| t.to_string()).unwrap_or_default()
                    ));
                }
                if request.state == nightshift_policy::PresenceState::Offline {
                    return Err(
                        "a worker cannot set itself `offline`; use `away` (or `worker stop`)"
                            .to_owned(),
                    );
                }
                Some(ManualOverride {
                    state: request.state,
                    reason: request.reason.filter(|reason| !reason.trim().is_empty()),
                    set_at: now,
                    until: request.until,
                })
            }
        };
        manual::save(&self.settings.state_dir, manual.as_ref())
            .map_err(|error| format!("cannot save the manual state, nothing changed: {error}"))?;
        match &manual {
            Some(manual) => tracing::info!(
                "manual state set: {}{}",
                manual.state,
                manual
                    .until
                    .map(|until| format!(" until {until}"))
                    .unwrap_or_default()
            ),
            None => tracing::info!("manual state cleared: back to the policies"),
        }
        self.inputs.manual = manual;
        self.reevaluate();
        Ok(self
            .tracker
            .current()
            .cloned()
            .unwrap_or_else(|| self.presence()))
    }
}

pub(super) fn manual_request(manual: &ManualOverride) -> ManualRequest {
    ManualRequest {
        state: manual.state,
        until: manual.until,
        reason: manual.reason.clone(),
    }
}
