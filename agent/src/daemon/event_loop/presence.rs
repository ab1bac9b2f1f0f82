//! Presence events of the event loop: policy boundaries, load samples, and
//! re-evaluating the presence and pushing it when it changed.

use nightshift_policy::{ForeignLoadSample, LoadVerdict, Presence, PresenceChange, Source};
use nightshift_proto::wire::AgentMessage;

use crate::build_processes::load::LoadMeasurement;
use crate::daemon::manual;

use crate::handle::LoadSnapshot;
use crate::outlook;

use super::{Daemon, notify_systemd};

impl Daemon {
    pub(super) fn on_policy_timer(&mut self) {
        let now = self.clock.now();
        if let Some(manual) = &self.inputs.manual
            && !manual.is_active(now)
        {
            tracing::info!(
                "the manual state `{}` ran out; back to the policies",
                manual.state
            );
            self.inputs.manual = None;
            if let Err(error) = manual::save(&self.settings.state_dir, None) {
                tracing::warn!("cannot remove the expired manual state: {error}");
            }
        }
        if let Some(monitor) = &mut self.load_monitor
            && self.inputs.load.is_some()
        {
            self.inputs.load = Some(monitor.verdict_at(now));
        }
        self.reevaluate();
    }

    pub(super) fn on_load(&mut self, sample: LoadMeasurement) {
        self.load_snapshot = Some(LoadSnapshot {
            at: sample.at,
            load1: sample.load1,
            cpu_percent: sample.cpu_percent,
            build_cpu_percent: sample.build_cpu_percent,
        });
        let Some(monitor) = &mut self.load_monitor else {
            return;
        };
        let verdict: LoadVerdict = monitor.observe(ForeignLoadSample {
            at: sample.at,
            load1: sample.load1,
            cpu_percent: sample.cpu_percent,
        });
        tracing::debug!(
            load1 = sample.load1,
            cpu = sample.cpu_percent,
            raw_load1 = sample.raw_load1,
            raw_cpu = sample.raw_cpu_percent,
            builds_cpu = sample.build_cpu_percent,
            high = verdict.high,
            "load sample"
        );
        self.inputs.load = Some(verdict);
        self.reevaluate();
    }

    /// Evaluates the policy now; pushes the presence to the master when its
    /// state, source or known end changed.
    pub(super) fn reevaluate(&mut self) {
        let now = self.clock.now();
        let fresh = self.policy.evaluate(now, &self.inputs);
        let change = self.tracker.update(fresh);
        let Some(presence) = self.tracker.current().cloned() else {
            return;
        };
        if change == PresenceChange::State {
            self.counters.presence_changes += 1;
            tracing::info!(
                "presence: {} ({}) — {}",
                presence.state,
                presence.source,
                presence.reason
            );
            notify_systemd(&[sd_notify::NotifyState::Status(&format!(
                "{} ({}): {}",
                presence.state, presence.source, presence.reason
            ))]);
        }
        if self.hello.borrow().presence != presence {
            self.outlook = outlook::outlook(&self.policy, now, &self.inputs, self.settings.overrun);
        }
        let outlook = self.outlook.clone();
        self.hello.send_if_modified(|hello| {
            if hello.presence == presence && hello.outlook == outlook {
                false
            } else {
                hello.presence = presence.clone();
                hello.outlook = outlook.clone();
                true
            }
        });
        if self.link.connected && self.master_should_hear(&presence) {
            self.told_master = Some(presence.clone());
            self.send(AgentMessage::Presence {
                presence,
                outlook: Some(outlook),
            });
        }
        self.steer_supervisor();
    }

    /// Whether `presence` differs from what the master knows in a way it
    /// cares about: state, source, or the known end. A reason that only
    /// re-words a load figure is not worth a frame.
    pub(super) fn master_should_hear(&self, presence: &Presence) -> bool {
        match &self.told_master {
            None => true,
            Some(told) => {
                told.state != presence.state
                    || told.source != presence.source
                    || told.until != presence.until
                    || (told.reason != presence.reason && presence.source != Source::Load)
            }
        }
    }
}
