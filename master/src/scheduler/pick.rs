//! THE decision "which worker gets this build now", as a pure function of
//! the facts about the builder's listed workers ([`pick_worker`]), and the
//! scheduler glue that gathers those facts from its state.

use std::collections::HashMap;

use nightshift_policy::PresenceState;
use nightshift_proto::wire::BuildId;

use super::Scheduler;

/// What the decision needs to know about one worker the builder lists.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Candidate<'a> {
    /// Listed by the builder but not a configured worker.
    NotConfigured { name: &'a str },
    /// A configured worker and its facts.
    Worker(WorkerFacts<'a>),
}

/// The facts about one configured worker.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct WorkerFacts<'a> {
    pub name: &'a str,
    pub connected: bool,
    /// Its effective presence (its own, restricted by a master schedule).
    pub state: PresenceState,
    /// Builds it may run at once (the lower of master.toml and its agent).
    pub capacity: usize,
    /// Builds it runs.
    pub running: usize,
    /// Builds waiting for locks with their slot kept on it.
    pub lock_waits: usize,
    /// It refused this build since its last presence change.
    pub refused_it: bool,
    /// Order of its last hand-out (lower: longer ago).
    pub last_assigned: u64,
}

/// Picks the worker for a build among the builder's listed workers, in the
/// builder's order: `available` workers first (fewest running builds, then
/// least recently given one, then first listed), `reluctant` ones only when
/// no available one can take it, never `away`/`offline`, disconnected, full
/// ones or ones that refused it. `Err` says what the build waits for.
/// Costs O(candidates), and allocates nothing unless no worker can take it.
pub(super) fn pick_worker<'a, I>(candidates: I) -> Result<&'a str, String>
where
    I: IntoIterator<Item = Candidate<'a>>,
    I::IntoIter: Clone,
{
    let candidates = candidates.into_iter();
    let mut best: Option<(PresenceState, usize, u64, &'a str)> = None;
    for candidate in candidates.clone() {
        let Candidate::Worker(facts) = candidate else {
            continue;
        };
        if why_not(&facts).is_some() {
            continue;
        }
        let key = (facts.state, facts.running, facts.last_assigned, facts.name);
        if best.is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2)) {
            best = Some(key);
        }
    }
    if let Some((_, _, _, name)) = best {
        return Ok(name);
    }
    // Nobody: say why, naming the first few and counting the rest.
    let mut why = Vec::new();
    let mut more = 0usize;
    for candidate in candidates {
        if why.len() == WHY_NAMES {
            more += 1;
            continue;
        }
        why.push(match candidate {
            Candidate::NotConfigured { name } => format!("{name} not configured"),
            Candidate::Worker(facts) => {
                let reason = why_not(&facts).unwrap_or(WhyNot::Offline);
                match reason {
                    WhyNot::Offline => format!("{} offline", facts.name),
                    WhyNot::State => format!("{} {}", facts.name, facts.state),
                    WhyNot::Busy => format!(
                        "{} busy ({}/{})",
                        facts.name,
                        facts.running + facts.lock_waits,
                        facts.capacity
                    ),
                    WhyNot::Refused => format!("{} refused it", facts.name),
                }
            }
        });
    }
    if more > 0 {
        why.push(format!("and {more} more"));
    }
    Err(format!("a worker: {}", why.join(", ")))
}

/// Workers named in a "waits for" text; the rest are counted.
const WHY_NAMES: usize = 20;

/// Why a configured worker cannot take the build, if it cannot.
#[derive(Debug, Clone, Copy)]
enum WhyNot {
    Offline,
    State,
    Busy,
    Refused,
}

fn why_not(facts: &WorkerFacts<'_>) -> Option<WhyNot> {
    if !facts.connected {
        Some(WhyNot::Offline)
    } else if !facts.state.takes_builds() {
        Some(WhyNot::State)
    } else if facts.running + facts.lock_waits >= facts.capacity {
        Some(WhyNot::Busy)
    } else if facts.refused_it {
        Some(WhyNot::Refused)
    } else {
        None
    }
}

impl Scheduler {
    /// [`Scheduler::pick_for`], remembering within one pass of
    /// [`Scheduler::assign`] which builders no worker can take: hand-outs in
    /// the pass only use capacity up, so a "no" stays a "no", and a long
    /// queue costs one decision per builder instead of one per build.
    pub(super) fn pick_worker_cached(
        &self,
        id: BuildId,
        no_worker: &mut HashMap<String, String>,
    ) -> Result<String, String> {
        let Some(builder) = self.queue.get(&id).map(|q| q.builder.as_str()) else {
            return Err("not queued".into());
        };
        // A "no" cached from a build nobody refused holds for every build
        // of the builder in this pass: presence and capacity are the same
        // for all of them, and hand-outs only use capacity up.
        if let Some(why) = no_worker.get(builder) {
            return Err(why.clone());
        }
        let decision = self.pick_for(id);
        // A build some listed worker refused failed perhaps only for that:
        // its "no" is not cached (looked up only when nobody can take it).
        if let Err(why) = &decision
            && !self.config.builder(builder).is_some_and(|def| {
                def.workers.iter().any(|name| {
                    self.workers
                        .get(name)
                        .is_some_and(|slot| slot.refused.contains(&id))
                })
            })
        {
            no_worker.insert(builder.to_owned(), why.clone());
        }
        decision
    }

    /// Which connected worker gets queued build `id` now ([`pick_worker`]
    /// over the facts of its builder's listed workers).
    pub(super) fn pick_for(&self, id: BuildId) -> Result<String, String> {
        let Some(queued) = self.queue.get(&id) else {
            return Err("not queued".into());
        };
        let Some(builder) = self.config.builder(&queued.builder) else {
            return Err(format!(
                "builder `{}` is not in master.toml",
                queued.builder
            ));
        };
        // Lock waits per worker, counted once for the whole decision.
        let mut lock_waits: HashMap<&str, usize> = HashMap::new();
        for worker in self.lock_waits.values() {
            *lock_waits.entry(worker.as_str()).or_default() += 1;
        }
        let lock_waits = &lock_waits;
        let candidates = builder.workers.iter().map(move |name| {
            let Some(slot) = self.workers.get(name) else {
                return Candidate::NotConfigured { name };
            };
            Candidate::Worker(WorkerFacts {
                name,
                connected: slot.conn.is_some(),
                state: self.effective_state(name, &slot.presence),
                capacity: self
                    .config
                    .worker(name)
                    .map_or(1, |w| w.max_builds)
                    .min(slot.agent_max_builds) as usize,
                running: slot.running.len(),
                lock_waits: lock_waits.get(name.as_str()).copied().unwrap_or(0),
                refused_it: slot.refused.contains(&id),
                last_assigned: slot.last_assigned,
            })
        });
        pick_worker(candidates).map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PresenceState::{Available, Away, Offline, Reluctant};

    /// A connected idle worker with room for one build.
    fn w(name: &str, state: PresenceState) -> Candidate<'_> {
        Candidate::Worker(WorkerFacts {
            name,
            connected: true,
            state,
            capacity: 1,
            running: 0,
            lock_waits: 0,
            refused_it: false,
            last_assigned: 0,
        })
    }

    /// Changes the facts of a worker candidate.
    fn with<'a>(
        candidate: Candidate<'a>,
        change: impl FnOnce(&mut WorkerFacts<'a>),
    ) -> Candidate<'a> {
        match candidate {
            Candidate::Worker(mut facts) => {
                change(&mut facts);
                Candidate::Worker(facts)
            }
            other => other,
        }
    }

    fn check(input: Vec<Candidate<'_>>, expect: Result<&str, &str>) {
        let got = pick_worker(input.clone());
        assert_eq!(got, expect.map_err(str::to_owned), "candidates: {input:#?}");
    }

    #[test]
    fn picks_by_presence_then_load_then_last_hand_out_then_order() {
        // Available beats reluctant, whatever the order.
        check(vec![w("r", Reluctant), w("a", Available)], Ok("a"));
        // Reluctant only when no available one can take it.
        check(
            vec![
                with(w("a", Available), |f| f.running = 1),
                w("r", Reluctant),
            ],
            Ok("r"),
        );
        // Fewest running builds among equals.
        check(
            vec![
                with(w("a", Available), |f| {
                    f.capacity = 4;
                    f.running = 2
                }),
                with(w("b", Available), |f| {
                    f.capacity = 4;
                    f.running = 1
                }),
            ],
            Ok("b"),
        );
        // Then the one given a build longest ago.
        check(
            vec![
                with(w("a", Available), |f| f.last_assigned = 5),
                with(w("b", Available), |f| f.last_assigned = 3),
            ],
            Ok("b"),
        );
        // Then the first listed.
        check(vec![w("b", Available), w("a", Available)], Ok("b"));
        // Lock waits fill capacity but do not count as running for the order.
        check(
            vec![
                with(w("a", Available), |f| {
                    f.capacity = 3;
                    f.lock_waits = 2;
                    f.last_assigned = 1
                }),
                with(w("b", Available), |f| {
                    f.capacity = 3;
                    f.running = 1
                }),
            ],
            Ok("a"),
        );
    }

    #[test]
    fn a_long_list_of_workers_that_cannot_take_it_is_summarised() {
        let names: Vec<String> = (0..1000).map(|i| format!("w{i}")).collect();
        let all_away: Vec<Candidate<'_>> = names.iter().map(|n| w(n, Away)).collect();
        let why = pick_worker(all_away.clone()).unwrap_err();
        assert!(why.starts_with("a worker: w0 away, w1 away,"), "{why}");
        assert!(why.ends_with("w19 away, and 980 more"), "{why}");
        // The last one listed can take it: found without any text.
        let mut one_free = all_away;
        one_free.push(w("free", Reluctant));
        assert_eq!(pick_worker(one_free), Ok("free"));
    }

    #[test]
    fn says_what_the_build_waits_for_when_nobody_can_take_it() {
        check(vec![], Err("a worker: "));
        check(
            vec![
                Candidate::NotConfigured { name: "gone" },
                with(w("off", Available), |f| f.connected = false),
                w("away", Away),
                w("down", Offline),
                with(w("full", Available), |f| {
                    f.capacity = 2;
                    f.running = 1;
                    f.lock_waits = 1
                }),
                with(w("no", Reluctant), |f| f.refused_it = true),
            ],
            Err(
                "a worker: gone not configured, off offline, away away, down offline, \
                 full busy (2/2), no refused it",
            ),
        );
        // One that can take it wins over any number that cannot.
        check(
            vec![
                w("away", Away),
                with(w("no", Available), |f| f.refused_it = true),
                w("r", Reluctant),
            ],
            Ok("r"),
        );
    }
}
