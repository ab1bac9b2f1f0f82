//! Applying a new config to the scheduler without interrupting running
//! builds: added and removed workers, lock definitions, latent workers and
//! master-side schedules.

use std::sync::Arc;

use super::{Scheduler, WorkerSlot, offline};
use crate::config::MasterConfig;
use crate::latent::Now;

impl Scheduler {
    /// Switches to a new config (reconfig). Running builds keep the steps and
    /// locks they started with; new and changed builders apply to builds
    /// handed out from now on; a removed worker gets no new build and is
    /// released once its running builds end; lock counts change for new
    /// acquisitions (holders are never evicted).
    pub(super) fn apply_config(&mut self, config: Arc<MasterConfig>) {
        let now = self.clock.now();
        self.config = config;
        self.store.set_log_cap(self.config.max_log_bytes);
        for def in &self.config.workers {
            self.workers.entry(def.name.clone()).or_insert_with(|| {
                WorkerSlot::new(
                    offline(now, "added by reconfig; not connected yet"),
                    def.max_builds,
                )
            });
        }
        let back: Vec<String> = self
            .members
            .iter()
            .filter(|(_, group)| self.config.worker_group(group).is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for name in back {
            self.ensure_member_slot(&name, "its group is back in master.toml; not connected yet");
        }
        let removed: Vec<String> = self
            .workers
            .keys()
            .filter(|name| !self.is_known(name))
            .cloned()
            .collect();
        for name in &removed {
            tracing::info!("worker {name} removed from master.toml: drained, then released");
            self.unbind_lock_waits(name);
            if self.latent.is_latent(name) {
                let actions = self.latent.remove(name, Now::system());
                self.run_latent(name, actions);
                if !self.latent.is_latent(name) {
                    self.latent_tokens.set(name, None);
                    self.latent_providers.remove(name);
                }
            }
            self.drop_if_drained(name);
        }
        let granted = self.locks.set_definitions(self.config.locks.clone());
        self.on_lock_grants(granted);
        self.configure_latent();
        let before = self.schedules.restricting();
        let schedules = self.compile_schedules();
        self.schedules.replace(schedules);
        let dropped = self.schedules.dropped_since(&before);
        self.clear_dropped_schedules(&dropped);
        self.refresh_schedules();
        self.rebuild_eligible();
        self.assign();
    }
}
