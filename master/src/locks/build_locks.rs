//! Locks in scheduler terms: tickets named by build and step, and the split that keeps steps from waiting on locks a build holds.

use super::*;

/// Splits a builder's locks into the set its build takes before it starts
/// and the set each step takes when it starts.
///
/// Builder-level and step-level locks together could deadlock: build X holds
/// its builder lock `a` and waits for step lock `b`, while build Y holds its
/// builder lock `b` and waits for step lock `a` (Buildbot's #2916). So a
/// lock that any builder takes at build level (`build_level`) is taken by
/// every build that uses it for the whole build, with its build-level set.
/// Step-level requests then only name locks that no build holds across
/// steps; their holders are running steps, which release without waiting
/// for anything, so every step wait ends.
pub fn split_locks(
    builder_locks: &[Claim],
    step_locks: &[Vec<Claim>],
    build_level: &BTreeSet<String>,
) -> (Vec<Claim>, Vec<Vec<Claim>>) {
    let mut whole_build = builder_locks.to_vec();
    let mut per_step = Vec::with_capacity(step_locks.len());
    for claims in step_locks {
        let (early, own): (Vec<Claim>, Vec<Claim>) = claims
            .iter()
            .cloned()
            .partition(|claim| build_level.contains(&claim.name));
        whole_build.extend(early);
        per_step.push(own);
    }
    (whole_build, per_step)
}

/// Who a granted or waiting ticket belongs to, in scheduler terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockHolder {
    /// A build's builder-level locks: the build starts when granted.
    Build(BuildId),
    /// One step's locks: the step starts (`StepGranted`) when granted.
    Step(BuildId, u32),
}

/// The scheduler's view of locks: a [`LockManager`] plus which build or step
/// each ticket serves. A build holds at most one builder-level ticket and
/// one step ticket at a time (steps run in order).
#[derive(Debug, Default)]
pub struct BuildLocks {
    pub(super) manager: LockManager,
    tickets: HashMap<LockHolder, Ticket>,
    holders: HashMap<Ticket, LockHolder>,
}

impl BuildLocks {
    pub fn new(defs: impl IntoIterator<Item = LockDef>) -> BuildLocks {
        BuildLocks {
            manager: LockManager::new(defs),
            ..BuildLocks::default()
        }
    }

    /// Asks for `claims` on behalf of `holder` running on `worker`. `Ok(true)`:
    /// held now (also for an empty set); `Ok(false)`: queued, a later
    /// release returns `holder` among the granted. Asking again for a
    /// holder that already has a ticket answers from that ticket.
    pub fn request(
        &mut self,
        holder: LockHolder,
        worker: &str,
        claims: &[Claim],
    ) -> Result<bool, LockError> {
        if let Some(ticket) = self.tickets.get(&holder) {
            return Ok(self.manager.is_held(*ticket));
        }
        if claims.is_empty() {
            return Ok(true);
        }
        let requested = self.manager.request(worker, claims)?;
        let ticket = requested.ticket();
        self.tickets.insert(holder, ticket);
        self.holders.insert(ticket, holder);
        Ok(matches!(requested, Requested::Granted(_)))
    }

    /// Releases (or withdraws) one holder's ticket; returns who that granted.
    pub fn release(&mut self, holder: LockHolder) -> Vec<LockHolder> {
        match self.tickets.remove(&holder) {
            Some(ticket) => {
                self.holders.remove(&ticket);
                let granted = self.manager.release(ticket);
                self.holders_of(granted)
            }
            None => Vec::new(),
        }
    }

    /// Releases everything a build holds or waits for (it finished, was
    /// cancelled, or was re-queued after its worker vanished).
    pub fn release_build(&mut self, build: BuildId) -> Vec<LockHolder> {
        let mine: Vec<LockHolder> = self
            .tickets
            .keys()
            .filter(|h| matches!(h, LockHolder::Build(b) | LockHolder::Step(b, _) if *b == build))
            .copied()
            .collect();
        let mut granted = Vec::new();
        for holder in mine {
            granted.retain(|g| *g != holder);
            granted.extend(self.release(holder));
        }
        granted
            .retain(|g| !matches!(g, LockHolder::Build(b) | LockHolder::Step(b, _) if *b == build));
        granted
    }

    /// Whether `holder` holds its locks now.
    #[cfg(test)]
    pub fn is_held(&self, holder: LockHolder) -> bool {
        self.tickets
            .get(&holder)
            .is_some_and(|t| self.manager.is_held(*t))
    }

    /// What a build waits for, as `master builds` shows it after "waiting
    /// for": `lock compile`, `locks a, disk on w1`; `None` when it waits for
    /// no lock.
    pub fn waiting_text(&self, build: BuildId) -> Option<String> {
        let mut names = Vec::new();
        for (holder, ticket) in &self.tickets {
            if matches!(holder, LockHolder::Build(b) | LockHolder::Step(b, _) if *b == build) {
                names.extend(self.manager.waiting_for(*ticket));
            }
        }
        match names.len() {
            0 => None,
            1 => Some(format!("lock {}", names[0])),
            _ => {
                names.sort();
                Some(format!("locks {}", names.join(", ")))
            }
        }
    }

    /// Replaces the definitions (reconfig); returns who a grown count granted.
    pub fn set_definitions(&mut self, defs: impl IntoIterator<Item = LockDef>) -> Vec<LockHolder> {
        let granted = self.manager.set_definitions(defs);
        self.holders_of(granted)
    }

    fn holders_of(&self, tickets: Vec<Ticket>) -> Vec<LockHolder> {
        tickets
            .into_iter()
            .filter_map(|t| self.holders.get(&t).copied())
            .collect()
    }
}
