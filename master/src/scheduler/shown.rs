//! The workers by the state they are shown in (`available`, `away`, …),
//! each state's names in name order, kept up to date by
//! [`Scheduler::touch`](super::Scheduler): a page of `master workers` or the
//! dashboard filtered by state, its total and the counts by state cost
//! O(offset + page), not a pass over every worker (the farm-wide flip is
//! watched through such pages while 10,000 presences arrive).

use std::collections::{BTreeSet, HashMap};

use nightshift_policy::PresenceState;

/// Every worker with a slot, filed under the state it is shown in.
#[derive(Debug, Default)]
pub(super) struct ShownStates {
    /// Worker → the state it is filed under.
    state_of: HashMap<String, PresenceState>,
    /// Per state (in [`PresenceState::ALL`] order), its workers by name.
    by_state: [BTreeSet<String>; PresenceState::ALL.len()],
}

impl ShownStates {
    /// Files `worker` under `state`, or forgets it (`None`: it has no slot
    /// any more). O(log n).
    pub fn set(&mut self, worker: &str, state: Option<PresenceState>) {
        let old = self.state_of.get(worker).copied();
        if old == state {
            return;
        }
        if let Some(old) = old {
            self.by_state[old as usize].remove(worker);
        }
        match state {
            Some(new) => {
                self.by_state[new as usize].insert(worker.to_owned());
                self.state_of.insert(worker.to_owned(), new);
            }
            None => {
                self.state_of.remove(worker);
            }
        }
    }

    /// The workers shown in `state`, in name order.
    pub fn in_state(&self, state: PresenceState) -> impl Iterator<Item = &str> + '_ {
        self.by_state[state as usize].iter().map(String::as_str)
    }

    /// How many workers are shown in `state`.
    pub fn count(&self, state: PresenceState) -> usize {
        self.by_state[state as usize].len()
    }

    /// Tests: every worker with its state.
    #[cfg(test)]
    pub fn all(&self) -> std::collections::BTreeMap<String, PresenceState> {
        self.state_of
            .iter()
            .map(|(name, state)| (name.clone(), *state))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PresenceState::{Available, Away, Offline};

    #[test]
    fn workers_move_between_states_and_stay_in_name_order() {
        let mut shown = ShownStates::default();
        shown.set("lab-2", Some(Available));
        shown.set("lab-1", Some(Available));
        shown.set("desk", Some(Offline));
        assert_eq!(
            shown.in_state(Available).collect::<Vec<_>>(),
            ["lab-1", "lab-2"]
        );
        assert_eq!((shown.count(Available), shown.count(Away)), (2, 0));
        shown.set("lab-1", Some(Away));
        assert_eq!(shown.in_state(Available).collect::<Vec<_>>(), ["lab-2"]);
        assert_eq!(shown.in_state(Away).collect::<Vec<_>>(), ["lab-1"]);
        // Setting the same state again changes nothing.
        shown.set("lab-1", Some(Away));
        assert_eq!((shown.count(Away), shown.all().len()), (1, 3));
        shown.set("desk", None);
        assert_eq!((shown.count(Offline), shown.all().len()), (0, 2));
        shown.set("gone", None);
        assert_eq!(shown.all().len(), 2);
    }
}
