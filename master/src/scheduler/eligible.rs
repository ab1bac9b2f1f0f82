//! The workers that could take a build right now — connected, taking builds
//! (`available` or `reluctant`), with a free slot — kept per builder in the
//! pick's order, so that picking one costs O(log n) instead of a visit of
//! every worker the builder lists.
//!
//! The scheduler tells this index a worker's new [`Rank`] (or `None`: not
//! eligible) whenever something it is computed from changes; a worker that
//! changes costs O(builders listing it × log n).

use std::collections::{BTreeSet, HashMap};

use nightshift_policy::PresenceState;

use crate::config::MasterConfig;

/// What orders eligible workers for the pick: `available` before
/// `reluctant`, then fewest running builds, then the one given a build
/// longest ago (then, per builder, the first listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Rank {
    pub state: PresenceState,
    pub running: usize,
    pub last_assigned: u64,
}

/// One eligible worker in one builder's set: its rank, its position in the
/// builder's `workers` list, its name.
type Entry = (Rank, usize, String);

/// Eligible workers per builder, in pick order.
#[derive(Debug, Default)]
pub(super) struct Eligible {
    /// Builder name → index into `sets`.
    builders: HashMap<String, usize>,
    /// Per builder, its eligible workers in pick order.
    sets: Vec<BTreeSet<Entry>>,
    /// Worker (or worker group) → the builders listing it, with its
    /// position in each list; a group's members share the group's place.
    listed_in: HashMap<String, Vec<(usize, usize)>>,
    /// Worker → its rank, for the workers in the sets.
    current: HashMap<String, Rank>,
    /// Per builder, the latent workers it lists (asked when nobody else can
    /// take a build; few, unlike the listed workers).
    latent: Vec<Vec<String>>,
}

impl Eligible {
    /// An empty index for `config`'s builders (every worker not eligible);
    /// `members` are the enrolled workers with their group.
    pub fn new<'a>(
        config: &MasterConfig,
        members: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Eligible {
        let mut index = Eligible::default();
        for (at, builder) in config.builders.iter().enumerate() {
            index.builders.insert(builder.name.clone(), at);
            index.sets.push(BTreeSet::new());
            index.latent.push(
                builder
                    .workers
                    .iter()
                    .filter(|name| config.worker(name).is_some_and(|w| w.latent.is_some()))
                    .cloned()
                    .collect(),
            );
            for (position, worker) in builder.workers.iter().enumerate() {
                index
                    .listed_in
                    .entry(worker.clone())
                    .or_default()
                    .push((at, position));
            }
        }
        for (worker, group) in members {
            index.list_member(worker, group);
        }
        index
    }

    /// Lists enrolled `worker` wherever its `group` is listed.
    pub fn list_member(&mut self, worker: &str, group: &str) {
        if let Some(places) = self.listed_in.get(group).cloned() {
            self.listed_in.insert(worker.to_owned(), places);
        }
    }

    /// Forgets a worker (a revoked member); call after `set(worker, None)`.
    pub fn unlist(&mut self, worker: &str) {
        if !self.current.contains_key(worker) {
            self.listed_in.remove(worker);
        }
    }

    /// Sets `worker`'s rank (`None`: it cannot take a build now).
    pub fn set(&mut self, worker: &str, rank: Option<Rank>) {
        if self.current.get(worker) == rank.as_ref() {
            return;
        }
        let Some(listed) = self.listed_in.get(worker) else {
            return;
        };
        if let Some(old) = self.current.remove(worker) {
            for &(builder, position) in listed {
                self.sets[builder].remove(&(old, position, worker.to_owned()));
            }
        }
        if let Some(new) = rank {
            for &(builder, position) in listed {
                self.sets[builder].insert((new, position, worker.to_owned()));
            }
            self.current.insert(worker.to_owned(), new);
        }
    }

    /// `builder`'s eligible workers, best first.
    pub fn in_order<'a>(&'a self, builder: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.builders
            .get(builder)
            .map(|&at| &self.sets[at])
            .into_iter()
            .flatten()
            .map(|(_, _, name)| name.as_str())
    }

    /// The latent workers `builder` lists.
    pub fn latent_of(&self, builder: &str) -> &[String] {
        self.builders
            .get(builder)
            .map_or(&[], |&at| self.latent[at].as_slice())
    }

    /// Every worker's rank as the index holds it (for checking it against
    /// one computed from scratch).
    #[cfg(test)]
    pub fn ranks(&self) -> std::collections::BTreeMap<String, Rank> {
        self.current
            .iter()
            .map(|(name, rank)| (name.clone(), *rank))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::test_harness::MasterToml;
    use super::*;
    use PresenceState::{Available, Reluctant};

    fn config() -> Arc<MasterConfig> {
        MasterToml::new()
            .worker("a")
            .worker("b")
            .worker("c")
            .builder("abc", &["a", "b", "c"])
            .builder("cb", &["c", "b"])
            .parse()
    }

    fn rank(state: PresenceState, running: usize, last_assigned: u64) -> Option<Rank> {
        Some(Rank {
            state,
            running,
            last_assigned,
        })
    }

    fn order<'a>(index: &'a Eligible, builder: &str) -> Vec<&'a str> {
        index.in_order(builder).collect()
    }

    #[test]
    fn each_builder_keeps_its_eligible_workers_in_pick_order() {
        let mut index = Eligible::new(&config(), []);
        assert!(order(&index, "abc").is_empty());
        for name in ["a", "b", "c"] {
            index.set(name, rank(Available, 0, 0));
        }
        // Equal ranks: the builder's own list order.
        assert_eq!(order(&index, "abc"), ["a", "b", "c"]);
        assert_eq!(order(&index, "cb"), ["c", "b"]);
        // Fewer running builds, then longer since the last hand-out.
        index.set("a", rank(Available, 1, 3));
        index.set("b", rank(Available, 0, 2));
        assert_eq!(order(&index, "abc"), ["c", "b", "a"]);
        index.set("c", rank(Available, 0, 5));
        assert_eq!(order(&index, "abc"), ["b", "c", "a"]);
        // Reluctant after every available one.
        index.set("b", rank(Reluctant, 0, 0));
        assert_eq!(order(&index, "abc"), ["c", "a", "b"]);
        // Not eligible any more: gone from every builder's set.
        index.set("c", None);
        assert_eq!(order(&index, "abc"), ["a", "b"]);
        assert_eq!(order(&index, "cb"), ["b"]);
        // Unknown builders and unlisted workers change nothing.
        index.set("zz", rank(Available, 0, 0));
        assert!(order(&index, "nope").is_empty());
        assert_eq!(index.ranks().len(), 2);
    }
}
