//! The read-only views of the scheduler the API and the dashboard show: a
//! page of workers with their effective presence (`master workers`, the
//! dashboard: rows built for the page only, from the workers filed by
//! state unless a name filter asks for a search), the
//! whole [`Snapshot`], and what each waiting build waits for.

use std::collections::BTreeMap;

use nightshift_policy::{PresenceState, Source};
use nightshift_proto::api::{LatentInfo, WorkerInfo, WorkerList, WorkerPage, WorkerQuery};
use nightshift_proto::wire::BuildId;

use super::{BuildWaits, Scheduler, Snapshot, WorkerSlot};

/// One page of `workers` (given in name order): those matching `query`
/// (state, a substring of the name), `offset` of them skipped, at most
/// `limit`; with how many matched and how many workers are in each state.
/// One pass, and nothing is kept but the page's items.
pub(super) fn page_of<'a, T>(
    workers: impl Iterator<Item = (&'a str, PresenceState, T)>,
    query: &WorkerQuery,
    limit: usize,
) -> (Vec<T>, usize, usize, BTreeMap<String, usize>) {
    let offset = query.offset.unwrap_or(0);
    let mut by_state = [0usize; PresenceState::ALL.len()];
    let mut page = Vec::new();
    let mut total = 0;
    for (name, state, item) in workers {
        by_state[state as usize] += 1;
        let matches = query.state.is_none_or(|wanted| wanted == state)
            && query.name.as_deref().is_none_or(|part| name.contains(part));
        if !matches {
            continue;
        }
        if total >= offset && page.len() < limit {
            page.push(item);
        }
        total += 1;
    }
    let counts = PresenceState::ALL
        .into_iter()
        .zip(by_state)
        .filter(|(_, n)| *n > 0)
        .map(|(state, n)| (state.as_str().to_owned(), n))
        .collect();
    (page, total, offset.min(total), counts)
}

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

    /// The state `worker` is shown in: its effective presence's, or, for one
    /// removed from master.toml and still draining, the last it pushed.
    pub(super) fn shown_state(&self, worker: &str, slot: &WorkerSlot) -> PresenceState {
        if self.is_known(worker) {
            self.effective_presence(worker, &slot.presence).state
        } else {
            slot.presence.state
        }
    }

    /// `worker`'s row as the API shows it.
    fn worker_info(&self, name: &str, slot: &WorkerSlot) -> WorkerInfo {
        if !self.is_known(name) {
            return WorkerInfo {
                name: name.to_owned(),
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
            };
        }
        let presence = self.effective_presence(name, &slot.presence);
        let max_builds = self.configured_max_builds(name).unwrap_or(1);
        WorkerInfo {
            name: name.to_owned(),
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
        }
    }

    /// One page of the workers in name order (see [`page_of`]): a pass
    /// over the workers' states, rows built for the page only.
    /// Filtered by state alone, or not filtered, it costs O(offset + page)
    /// (the [`ShownStates`](super::shown::ShownStates) index); a name filter
    /// is a search, one pass over the workers.
    pub(super) fn workers_page(&self, query: &WorkerQuery, limit: usize) -> WorkerPage {
        let (page, total, offset, counts) = if query.name.is_some() {
            let rows = self
                .workers
                .iter()
                .map(|(name, slot)| (name.as_str(), self.shown_state(name, slot), (name, slot)));
            page_of(rows, query, limit)
        } else {
            let offset = query.offset.unwrap_or(0);
            let (names, total): (Vec<&str>, usize) = match query.state {
                Some(state) => (
                    self.shown
                        .in_state(state)
                        .skip(offset)
                        .take(limit)
                        .collect(),
                    self.shown.count(state),
                ),
                None => (
                    self.workers
                        .keys()
                        .map(String::as_str)
                        .skip(offset)
                        .take(limit)
                        .collect(),
                    self.workers.len(),
                ),
            };
            let page = names
                .into_iter()
                .filter_map(|name| self.workers.get_key_value(name))
                .collect();
            let counts = PresenceState::ALL
                .into_iter()
                .map(|state| (state, self.shown.count(state)))
                .filter(|(_, n)| *n > 0)
                .map(|(state, n)| (state.as_str().to_owned(), n))
                .collect();
            (page, total, offset.min(total), counts)
        };
        WorkerPage {
            paused: self.paused,
            workers: page
                .into_iter()
                .map(|(name, slot)| self.worker_info(name, slot))
                .collect(),
            total,
            offset,
            counts,
        }
    }

    /// The read-only view the API and the dashboard show.
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut said = std::collections::HashMap::new();
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
            // Workers removed by a reconfig that still run builds.
            .chain(self.workers.keys().filter(|name| !self.is_known(name)))
            .filter_map(|name| Some(self.worker_info(name, self.workers.get(name)?)))
            .collect();
        Snapshot {
            workers: WorkerList {
                paused: self.paused,
                workers,
            },
            waiting_for: self
                .queue
                .iter()
                .filter_map(|(id, q)| {
                    Some((
                        *id,
                        self.explain_with(*id, q.waiting_for.as_ref()?, &mut said),
                    ))
                })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Event;
    use crate::scheduler::test_harness::Harness;

    /// The page a full pass gives, for comparison with the indexed one.
    fn by_full_pass(h: &Harness, query: &WorkerQuery, limit: usize) -> (Vec<String>, usize) {
        let s = &h.scheduler;
        let rows = s
            .workers
            .iter()
            .map(|(name, slot)| (name.as_str(), s.shown_state(name, slot), name.clone()));
        let (page, total, _, _) = page_of(rows, query, limit);
        (page, total)
    }

    #[tokio::test]
    async fn pages_by_state_from_the_index_agree_with_a_full_pass() {
        use PresenceState::{Available, Away, Offline};
        let mut h = Harness::new();
        let (_, _rx_a) = h.connect("a", Available, vec![]);
        let (conn_b, _rx_b) = h.connect("b", Away, vec![]);
        // `r` never connects: offline.
        for (state, offset, limit) in [
            (Some(Available), 0, 10),
            (Some(Away), 0, 10),
            (Some(Offline), 0, 10),
            (Some(Available), 1, 10),
            (None, 1, 1),
            (None, 0, 10),
            (None, 5, 10),
        ] {
            let query = WorkerQuery {
                state,
                offset: Some(offset),
                ..WorkerQuery::default()
            };
            let page = h.scheduler.workers_page(&query, limit);
            let names: Vec<String> = page.workers.iter().map(|w| w.name.clone()).collect();
            assert_eq!(
                (names, page.total),
                by_full_pass(&h, &query, limit),
                "{query:?}"
            );
            assert_eq!(page.counts["available"], 1);
            assert_eq!(page.counts["away"], 1);
            assert_eq!(page.counts["offline"], 1);
        }
        // A worker that changes state moves in the index.
        h.scheduler.handle(Event::Agent {
            worker: "b".into(),
            conn: conn_b,
            message: nightshift_proto::wire::AgentMessage::Presence {
                presence: crate::scheduler::test_harness::presence(Available),
                outlook: None,
            },
        });
        let query = WorkerQuery {
            state: Some(Available),
            ..WorkerQuery::default()
        };
        let page = h.scheduler.workers_page(&query, 10);
        let names: Vec<&str> = page.workers.iter().map(|w| w.name.as_str()).collect();
        assert_eq!((names, page.total), (vec!["a", "b"], 2));
        assert!(!page.counts.contains_key("away"));
    }

    #[test]
    fn workers_are_filtered_and_paged_in_one_pass_with_totals() {
        use PresenceState::{Available, Away};
        let workers = [
            ("desk-1", Available),
            ("lab-1", Available),
            ("lab-2", Available),
            ("lab-3", Away),
        ];
        let rows = || workers.iter().map(|&(name, state)| (name, state, name));
        let query = WorkerQuery {
            state: Some(Available),
            name: Some("lab".into()),
            offset: Some(1),
            limit: Some(5),
        };
        let (page, total, offset, counts) = page_of(rows(), &query, 5);
        assert_eq!((page, total, offset), (vec!["lab-2"], 2, 1));
        assert_eq!(counts["available"], 3);
        assert_eq!(counts["away"], 1);
        assert!(!counts.contains_key("offline"));
        // An offset past the end is an empty page, not an error.
        let past = WorkerQuery {
            offset: Some(10),
            ..WorkerQuery::default()
        };
        let (page, total, offset, _) = page_of(rows(), &past, 2);
        assert_eq!((page.len(), total, offset), (0, 4, 4));
        // The first page, in the order given.
        let (page, total, _, _) = page_of(rows(), &WorkerQuery::default(), 2);
        assert_eq!((page, total), (vec!["desk-1", "lab-1"], 4));
    }
}
