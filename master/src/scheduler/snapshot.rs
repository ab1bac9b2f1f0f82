//! The read-only [`Snapshot`] of the scheduler the API and the dashboard
//! show: workers with their effective presence, what each waiting build
//! waits for, and where each running build runs.

use nightshift_policy::Source;
use nightshift_proto::api::{LatentInfo, WorkerInfo, WorkerList};
use nightshift_proto::wire::BuildId;

use super::{BuildWaits, Scheduler, Snapshot};

impl Scheduler {
    /// What each of `ids` waits for, if it waits: O(ids), whatever the
    /// number of workers (a build's API answer must not cost a snapshot).
    pub(super) fn waiting_for(&self, ids: &[BuildId]) -> BuildWaits {
        let waiting_for = ids
            .iter()
            .filter_map(|&id| {
                let why = match self.queue.get(&id) {
                    Some(queued) => Some(self.explain(id, queued.waiting_for.as_ref()?)),
                    None if self.running.contains_key(&id) => self.locks.waiting_text(id),
                    None => None,
                }?;
                Some((id, why))
            })
            .collect();
        let estimates = self
            .estimates
            .all()
            .map(|(builder, took)| (builder.to_owned(), took))
            .collect();
        BuildWaits {
            waiting_for,
            estimates,
        }
    }

    /// The read-only view the API and the dashboard show.
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut members: Vec<&String> = self
            .members
            .keys()
            .filter(|name| self.is_known(name))
            .collect();
        members.sort();
        let workers = self
            .config
            .workers
            .iter()
            .map(|def| &def.name)
            .chain(members)
            .filter_map(|name| {
                let slot = self.workers.get(name)?;
                let presence = self.effective_presence(name, &slot.presence);
                let max_builds = self.configured_max_builds(name).unwrap_or(1);
                Some(WorkerInfo {
                    name: name.clone(),
                    state: presence.state,
                    reason: presence.reason.clone(),
                    source: Some(presence.source.clone()),
                    since: Some(presence.since),
                    until: presence.until,
                    connected: slot.conn.is_some(),
                    max_builds: max_builds.min(slot.agent_max_builds),
                    running: slot.running.iter().copied().collect(),
                    latent: self.latent.status(name).map(|s| LatentInfo {
                        state: s.state.as_str().to_owned(),
                        reason: s.reason,
                        since: s.since,
                        retry_after: s.retry_after,
                        provider: s.provider.to_owned(),
                    }),
                })
            })
            // Workers removed by a reconfig that still run builds.
            .chain(
                self.workers
                    .iter()
                    .filter(|(name, _)| !self.is_known(name))
                    .map(|(name, slot)| WorkerInfo {
                        name: name.clone(),
                        state: slot.presence.state,
                        reason: format!(
                            "removed from master.toml; released after its running builds ({})",
                            slot.presence.reason
                        ),
                        source: Some(Source::Master),
                        since: Some(slot.presence.since),
                        until: None,
                        connected: slot.conn.is_some(),
                        max_builds: slot.agent_max_builds,
                        running: slot.running.iter().copied().collect(),
                        latent: None,
                    }),
            )
            .collect();
        Snapshot {
            workers: WorkerList {
                paused: self.paused,
                workers,
            },
            waiting_for: self
                .queue
                .iter()
                .filter_map(|(id, q)| Some((*id, self.explain(*id, q.waiting_for.as_ref()?))))
                // Running builds whose next step waits for a lock.
                .chain(
                    self.running
                        .keys()
                        .filter_map(|id| Some((*id, self.locks.waiting_text(*id)?))),
                )
                .collect(),
            running: self
                .running
                .iter()
                .map(|(id, run)| (*id, run.worker.clone()))
                .collect(),
            estimates: self
                .estimates
                .all()
                .map(|(builder, took)| (builder.to_owned(), took))
                .collect(),
        }
    }
}
