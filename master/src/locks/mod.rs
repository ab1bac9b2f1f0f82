//! Counting locks for builds and steps: master-scoped (one copy) and
//! worker-scoped (one copy per worker) locks, taken with `exclusive` or
//! `counting` access, all-or-nothing, with waiters served in arrival order.
//!
//! [`LockManager`] is synchronous and owned by the scheduler's single task:
//! [`LockManager::request`] grants a whole claim set at once or queues it,
//! and [`LockManager::release`] returns the tickets that the release granted,
//! so the scheduler acts on them in the same turn (push, no retry loop).
//! [`BuildLocks`] names its tickets in scheduler terms (a build, a step).
//!
//! Why no deadlock: a requester never holds part of its set while waiting for
//! the rest (no hold-and-wait), and every waiter is queued on all its locks at
//! once in one global arrival order, so the oldest waiter has nobody ahead of
//! it on any lock and waits only for holders, which always release. Between
//! levels (a build holding its builder locks while a step waits), the
//! scheduler splits claims with [`split_locks`] so that a step never waits for
//! a lock some build holds across steps.
//!
//! Why no starvation: a requester may not overtake a waiter ahead of it on
//! the same lock, except that counting requesters may share spare units with
//! counting waiters ahead of them (those units are reserved first). An
//! exclusive waiter therefore blocks every later requester of its locks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use nightshift_proto::wire::BuildId;
use serde::{Deserialize, Serialize};

mod build_locks;

pub use build_locks::*;

/// Where a lock lives: one copy for the whole master, or one copy per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockScope {
    Master,
    Worker,
}

/// How a claim takes a lock: the whole of it, or one unit of its `max_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Counting,
    Exclusive,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Counting => "counting",
            Access::Exclusive => "exclusive",
        })
    }
}

/// One `[[lock]]` of `master.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockDef {
    pub name: String,
    pub scope: LockScope,
    /// Units a lock copy has; at least 1 (the config refuses 0).
    pub max_count: u32,
    /// Per-worker overrides of `max_count` (worker-scoped locks only).
    pub max_count_for_worker: BTreeMap<String, u32>,
}

impl LockDef {
    /// Units of the copy of this lock that `worker` uses.
    fn max_count_on(&self, worker: &str) -> u32 {
        match self.scope {
            LockScope::Master => self.max_count,
            LockScope::Worker => self
                .max_count_for_worker
                .get(worker)
                .copied()
                .unwrap_or(self.max_count),
        }
    }
}

/// One entry of a builder's or a step's `locks = [{ name, access }]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Claim {
    pub name: String,
    pub access: Access,
}

impl Claim {
    pub fn new(name: impl Into<String>, access: Access) -> Claim {
        Claim {
            name: name.into(),
            access,
        }
    }
}

/// A request that holds or waits for a set of locks. Unique on one manager,
/// never reused; ordered by arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lock ticket {}", self.0)
    }
}

/// The answer to [`LockManager::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// Every lock of the set is held by this ticket now.
    Granted(Ticket),
    /// The ticket is queued; a later [`LockManager::release`] grants it.
    Waiting(Ticket),
}

impl Requested {
    pub fn ticket(self) -> Ticket {
        match self {
            Requested::Granted(ticket) | Requested::Waiting(ticket) => ticket,
        }
    }
}

/// Why a claim set was refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("unknown lock `{name}` (no [[lock]] with that name in master.toml)")]
    UnknownLock { name: String },
}

/// One copy of a lock: master-wide (`worker = None`) or one worker's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct CopyKey {
    lock: String,
    worker: Option<String>,
}

impl fmt::Display for CopyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.worker {
            None => f.write_str(&self.lock),
            Some(worker) => write!(f, "{} on {worker}", self.lock),
        }
    }
}

#[derive(Debug, Default)]
struct LockCopy {
    /// Units a counting holder may take; refreshed by reconfig.
    max_count: u32,
    exclusive_held: bool,
    counting_held: u32,
    /// Waiting tickets on this copy, oldest first.
    queue: VecDeque<Ticket>,
}

impl LockCopy {
    fn is_idle(&self) -> bool {
        !self.exclusive_held && self.counting_held == 0 && self.queue.is_empty()
    }
}

#[derive(Debug)]
struct TicketEntry {
    claims: Vec<(CopyKey, Access)>,
    held: bool,
}

/// The synchronous lock model. Owned by one task (the scheduler); every
/// method returns at once.
#[derive(Debug, Default)]
pub struct LockManager {
    defs: HashMap<String, LockDef>,
    copies: HashMap<CopyKey, LockCopy>,
    tickets: HashMap<Ticket, TicketEntry>,
    /// Waiting tickets in arrival order.
    waiting: BTreeSet<Ticket>,
    next_ticket: u64,
}

impl LockManager {
    pub fn new(defs: impl IntoIterator<Item = LockDef>) -> LockManager {
        LockManager {
            defs: defs.into_iter().map(|d| (d.name.clone(), d)).collect(),
            ..LockManager::default()
        }
    }

    /// Asks for every lock in `claims` (on `worker`'s copy for worker-scoped
    /// locks) at once. A lock named twice counts once, exclusive if either
    /// asks for it. An unknown lock name refuses the request and changes
    /// nothing.
    pub fn request(&mut self, worker: &str, claims: &[Claim]) -> Result<Requested, LockError> {
        let mut merged: BTreeMap<CopyKey, Access> = BTreeMap::new();
        for claim in claims {
            let def = self
                .defs
                .get(&claim.name)
                .ok_or_else(|| LockError::UnknownLock {
                    name: claim.name.clone(),
                })?;
            let key = CopyKey {
                lock: def.name.clone(),
                worker: match def.scope {
                    LockScope::Master => None,
                    LockScope::Worker => Some(worker.to_owned()),
                },
            };
            let entry = merged.entry(key).or_insert(claim.access);
            *entry = (*entry).max(claim.access);
        }
        for key in merged.keys() {
            let max_count = self.defs[&key.lock].max_count_on(key.worker.as_deref().unwrap_or(""));
            self.copies.entry(key.clone()).or_default().max_count = max_count;
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let claims: Vec<(CopyKey, Access)> = merged.into_iter().collect();
        if self.blockers(ticket, &claims).is_empty() {
            self.take(&claims);
            self.tickets
                .insert(ticket, TicketEntry { claims, held: true });
            Ok(Requested::Granted(ticket))
        } else {
            for (key, _) in &claims {
                if let Some(copy) = self.copies.get_mut(key) {
                    copy.queue.push_back(ticket);
                }
            }
            self.tickets.insert(
                ticket,
                TicketEntry {
                    claims,
                    held: false,
                },
            );
            self.waiting.insert(ticket);
            Ok(Requested::Waiting(ticket))
        }
    }

    /// Gives back what `ticket` holds, or withdraws it if it still waits,
    /// and returns the waiting tickets this granted, oldest first. Releasing
    /// an unknown or already released ticket does nothing.
    pub fn release(&mut self, ticket: Ticket) -> Vec<Ticket> {
        let Some(entry) = self.tickets.remove(&ticket) else {
            return Vec::new();
        };
        if entry.held {
            for (key, access) in &entry.claims {
                if let Some(copy) = self.copies.get_mut(key) {
                    match access {
                        Access::Exclusive => copy.exclusive_held = false,
                        Access::Counting => {
                            copy.counting_held = copy.counting_held.saturating_sub(1)
                        }
                    }
                }
            }
        } else {
            self.waiting.remove(&ticket);
            for (key, _) in &entry.claims {
                if let Some(copy) = self.copies.get_mut(key) {
                    copy.queue.retain(|t| *t != ticket);
                }
            }
        }
        let granted = self.grant_waiters();
        for (key, _) in &entry.claims {
            if self.copies.get(key).is_some_and(LockCopy::is_idle) {
                self.copies.remove(key);
            }
        }
        granted
    }

    /// Replaces the lock definitions (reconfig). Holders keep what they hold
    /// even where a count shrank or a lock vanished; new requests see the new
    /// counts. Returns the waiting tickets that a grown count granted.
    pub fn set_definitions(&mut self, defs: impl IntoIterator<Item = LockDef>) -> Vec<Ticket> {
        self.defs = defs.into_iter().map(|d| (d.name.clone(), d)).collect();
        for (key, copy) in &mut self.copies {
            if let Some(def) = self.defs.get(&key.lock) {
                copy.max_count = def.max_count_on(key.worker.as_deref().unwrap_or(""));
            }
        }
        self.grant_waiters()
    }

    /// Whether `ticket` holds its locks now.
    pub fn is_held(&self, ticket: Ticket) -> bool {
        self.tickets.get(&ticket).is_some_and(|entry| entry.held)
    }

    /// The locks a waiting ticket cannot have yet, e.g. `["compile",
    /// "checkout on w1"]`; empty when it holds or is unknown. This is what
    /// `master builds` shows as "waiting for lock …".
    pub fn waiting_for(&self, ticket: Ticket) -> Vec<String> {
        match self.tickets.get(&ticket) {
            Some(entry) if !entry.held => self
                .blockers(ticket, &entry.claims)
                .into_iter()
                .map(|key| key.to_string())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// How many tickets wait.
    #[cfg(test)]
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// How many tickets hold their locks.
    #[cfg(test)]
    pub fn held_count(&self) -> usize {
        self.tickets.len() - self.waiting.len()
    }

    /// The copies of `claims` that `ticket` may not take now.
    fn blockers<'a>(&self, ticket: Ticket, claims: &'a [(CopyKey, Access)]) -> Vec<&'a CopyKey> {
        claims
            .iter()
            .filter(|(key, access)| !self.copy_allows(ticket, key, *access))
            .map(|(key, _)| key)
            .collect()
    }

    /// Whether `ticket` may take `key` with `access`, given the holders and
    /// the waiters queued ahead of it.
    fn copy_allows(&self, ticket: Ticket, key: &CopyKey, access: Access) -> bool {
        let Some(copy) = self.copies.get(key) else {
            return true;
        };
        let ahead = copy.queue.iter().take_while(|t| **t != ticket);
        match access {
            Access::Exclusive => {
                !copy.exclusive_held && copy.counting_held == 0 && ahead.count() == 0
            }
            Access::Counting => {
                if copy.exclusive_held {
                    return false;
                }
                let mut reserved: u32 = 0;
                for waiter in ahead {
                    if self.access_of(*waiter, key) != Some(Access::Counting) {
                        return false;
                    }
                    reserved += 1;
                }
                copy.counting_held + reserved < copy.max_count
            }
        }
    }

    fn access_of(&self, ticket: Ticket, key: &CopyKey) -> Option<Access> {
        self.tickets
            .get(&ticket)?
            .claims
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, access)| *access)
    }

    fn take(&mut self, claims: &[(CopyKey, Access)]) {
        for (key, access) in claims {
            let copy = self.copies.entry(key.clone()).or_default();
            match access {
                Access::Exclusive => copy.exclusive_held = true,
                Access::Counting => copy.counting_held += 1,
            }
        }
    }

    /// Grants every waiter that may run now, oldest first. One pass
    /// suffices: granting a waiter only takes units and leaves queues, which
    /// can change the answer only for younger waiters, seen later.
    fn grant_waiters(&mut self) -> Vec<Ticket> {
        let mut granted = Vec::new();
        let candidates: Vec<Ticket> = self.waiting.iter().copied().collect();
        for ticket in candidates {
            let Some(entry) = self.tickets.get(&ticket) else {
                continue;
            };
            if !self.blockers(ticket, &entry.claims).is_empty() {
                continue;
            }
            let claims = entry.claims.clone();
            for (key, _) in &claims {
                if let Some(copy) = self.copies.get_mut(key) {
                    copy.queue.retain(|t| *t != ticket);
                }
            }
            self.take(&claims);
            self.waiting.remove(&ticket);
            if let Some(entry) = self.tickets.get_mut(&ticket) {
                entry.held = true;
            }
            granted.push(ticket);
        }
        granted
    }
}

#[cfg(test)]
mod tests;
