//! THE decision "which worker gets this build now", as a pure function of
//! the facts about the build and the builder's listed workers
//! ([`pick_worker`], window-aware through [`super::admission`]), and the
//! scheduler glue: the O(log n) pick from the builder's eligible workers
//! ([`super::eligible`]) and the words for a waiting build, built only when
//! it is shown.

use std::collections::HashMap;

use jiff::SignedDuration;
use jiff::tz::TimeZone;
use nightshift_policy::PresenceState;
use nightshift_proto::wire::{BuildId, Outlook, Window};

use super::admission::{self, BuildFacts, CutShort, LaterFit};
use super::eligible::{Eligible, Rank};
use super::shown::ShownStates;
use super::{Scheduler, Waiting, WorkerSlot};
use crate::config::BuilderDef;

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
    /// Its step held this build's locks past the lease; it cools off.
    pub cooling_off: bool,
    /// Order of its last hand-out (lower: longer ago).
    pub last_assigned: u64,
    /// When it stops taking builds, as its agent last said (`None`: unknown
    /// or never).
    pub takes_builds_until: Option<jiff::Timestamp>,
    /// When it turns from `available` to `reluctant` before that, as its
    /// agent last said.
    pub reluctant_from: Option<jiff::Timestamp>,
    /// Its next window of taking builds, as its agent last said.
    pub next_window: Option<Window>,
    /// The owner's accepted grace past the end of its availability.
    pub overrun: SignedDuration,
}

/// Picks the worker for a build among the builder's listed workers, in the
/// builder's order: `available` workers first (fewest running builds, then
/// least recently given one, then first listed), `reluctant` ones only when
/// no available one can take it, never `away`/`offline`, disconnected, full
/// ones, ones that refused it, or the one cooling off after its lease of
/// the build's locks ended. An available worker whose run would go into its
/// reluctant time counts as reluctant ([`BuildFacts::ranks_as`]).
///
/// Window-aware: a worker whose availability (plus its overrun) ends before
/// the build's estimated end is used only when no worker fits now, none that
/// fits is merely busy, no window that fits opens later, and the builder
/// says `best-effort` ([`admission::when_none_fits`]); among such workers the
/// one whose availability lasts longest. `Err` says what the build waits
/// for. Costs O(candidates).
pub(super) fn pick_worker<'a>(
    build: &BuildFacts,
    candidates: impl IntoIterator<Item = Candidate<'a>>,
) -> Result<&'a str, String> {
    let mut best: Option<(PresenceState, usize, u64, &'a str)> = None;
    let mut best_cut: Option<(
        PresenceState,
        std::cmp::Reverse<jiff::Timestamp>,
        usize,
        u64,
        &'a str,
    )> = None;
    let mut later: Option<LaterFit<'a>> = None;
    let mut why = WhyNot::default();
    for candidate in candidates {
        let facts = match candidate {
            Candidate::NotConfigured { name } => {
                why.note(name, "not configured", String::new());
                continue;
            }
            Candidate::Worker(facts) => facts,
        };
        let name = facts.name;
        if !facts.connected {
            why.note(name, "offline", String::new());
            continue;
        }
        let state = build.ranks_as(facts.state, facts.reluctant_from, facts.overrun);
        let fits_now = build.fits(build.now, facts.takes_builds_until, facts.overrun);
        if !state.takes_builds() {
            why.note(name, state.as_str(), String::new());
            if let Some(opens) = build.fitting_start(facts.next_window, facts.overrun) {
                let chance = LaterFit {
                    name,
                    opens: Some(opens),
                };
                later = Some(admission::earlier(later, chance));
            }
            continue;
        }
        let busy = facts.running + facts.lock_waits;
        let capacity = facts.capacity;
        if busy >= capacity {
            why.note(name, "busy", format!(" ({busy}/{capacity})"));
            if fits_now {
                later = Some(admission::earlier(later, LaterFit { name, opens: None }));
            }
            continue;
        }
        if facts.refused_it {
            why.note(name, "refused it", String::new());
            continue;
        }
        if facts.cooling_off {
            why.note(
                name,
                "cooling off",
                " (its lock lease of this build ended)".to_owned(),
            );
            continue;
        }
        if let (false, Some(until)) = (fits_now, facts.takes_builds_until) {
            let key = (
                state,
                std::cmp::Reverse(until),
                facts.running,
                facts.last_assigned,
                name,
            );
            if best_cut.is_none_or(|b| (key.0, key.1, key.2, key.3) < (b.0, b.1, b.2, b.3)) {
                best_cut = Some(key);
            }
            continue;
        }
        let key = (state, facts.running, facts.last_assigned, name);
        if best.is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2)) {
            best = Some(key);
        }
    }
    match (best, best_cut) {
        (Some((_, _, _, name)), _) => Ok(name),
        (None, Some((_, std::cmp::Reverse(until), _, _, name))) => {
            admission::when_none_fits(build, CutShort { name, until }, later)
        }
        (None, None) => {
            let mut text = format!("a worker: {}", why.text());
            if let Some(LaterFit {
                name,
                opens: Some(opens),
            }) = later
            {
                text.push_str(&format!(
                    "; {name} opens at {} (fits {})",
                    build.when(opens),
                    build.estimate_text()
                ));
            }
            Err(text)
        }
    }
}

/// Most workers named one by one in what a build waits for; the rest are
/// counted by state, so a builder listing 10,000 workers says so in a line.
pub(super) const WHY_NAMED: usize = 10;

/// Why no listed worker takes a build: the first [`WHY_NAMED`] workers
/// with their reason, then a count per reason.
#[derive(Debug, Default)]
struct WhyNot {
    named: Vec<String>,
    more: Vec<(&'static str, usize)>,
}

impl WhyNot {
    /// `name` cannot take it for `reason` (`detail` follows the reason when
    /// the worker is named).
    fn note(&mut self, name: &str, reason: &'static str, detail: String) {
        if self.named.len() < WHY_NAMED {
            self.named.push(format!("{name} {reason}{detail}"));
        } else if let Some((_, n)) = self.more.iter_mut().find(|(r, _)| *r == reason) {
            *n += 1;
        } else {
            self.more.push((reason, 1));
        }
    }

    /// `b1 away, b2 offline` (and `and 9,990 more: 9,000 away, 990 offline`).
    fn text(&self) -> String {
        let mut text = self.named.join(", ");
        if !self.more.is_empty() {
            let total: usize = self.more.iter().map(|(_, n)| n).sum();
            let each: Vec<String> = self
                .more
                .iter()
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect();
            text.push_str(&format!(" and {total} more: {}", each.join(", ")));
        }
        text
    }
}

impl Scheduler {
    /// Builds `worker` may run at once: the lower of master.toml's
    /// `max_builds` and its agent's.
    fn capacity(&self, worker: &str, slot: &WorkerSlot) -> usize {
        self.configured_max_builds(worker)
            .unwrap_or(1)
            .min(slot.agent_max_builds) as usize
    }

    /// `worker`'s place in the pick order when it could take a build now
    /// (connected, taking builds, a free slot); `None` otherwise.
    fn rank_of(&self, worker: &str) -> Option<Rank> {
        let slot = self.workers.get(worker)?;
        slot.conn.as_ref()?;
        let state = self.effective_presence(worker, &slot.presence).state;
        if !state.takes_builds() {
            return None;
        }
        let busy = slot.running.len() + self.lock_waits.count(worker);
        if busy >= self.capacity(worker, slot) {
            return None;
        }
        Some(Rank {
            state,
            running: slot.running.len(),
            last_assigned: slot.last_assigned,
        })
    }

    /// Re-files `worker` in the eligible sets after anything its rank is
    /// made of changed (connection, presence, running builds, lock waits,
    /// last hand-out, capacity). O(builders listing it × log n).
    /// Also re-files it under the state it is shown in. O(log n).
    pub(super) fn touch(&mut self, worker: &str) {
        let rank = self.rank_of(worker);
        self.eligible.set(worker, rank);
        let shown = self
            .workers
            .get(worker)
            .map(|slot| self.shown_state(worker, slot));
        self.shown.set(worker, shown);
    }

    /// The eligible sets from scratch (at start and after a reconfig).
    pub(super) fn rebuild_eligible(&mut self) {
        self.eligible = Eligible::new(&self.config, &self.members);
        self.shown = ShownStates::default();
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for name in names {
            self.touch(&name);
        }
    }

    /// Tests: the eligible sets agree with every worker's rank computed
    /// from scratch (a mutation that forgot [`Scheduler::touch`] fails here).
    #[cfg(test)]
    pub(super) fn check_eligible(&self) {
        let expected: std::collections::BTreeMap<String, Rank> = self
            .workers
            .keys()
            .filter(|name| {
                self.config.builders.iter().any(|b| {
                    b.workers
                        .iter()
                        .any(|w| w == *name || self.members.get(*name) == Some(w))
                })
            })
            .filter_map(|name| Some((name.clone(), self.rank_of(name)?)))
            .collect();
        assert_eq!(self.eligible.ranks(), expected, "eligible sets are stale");
        let shown: std::collections::BTreeMap<String, PresenceState> = self
            .workers
            .iter()
            .map(|(name, slot)| (name.clone(), self.shown_state(name, slot)))
            .collect();
        assert_eq!(
            self.shown.all(),
            shown,
            "the workers filed by state are stale"
        );
    }

    /// [`Scheduler::pick_for`], remembering within one pass of
    /// [`Scheduler::assign`] which builders no worker can take: hand-outs in
    /// the pass only use capacity up, so a "no" stays a "no", and a long
    /// queue costs one decision per builder instead of one per build.
    pub(super) fn pick_worker_cached(
        &self,
        id: BuildId,
        no_worker: &mut HashMap<String, Waiting>,
    ) -> Result<String, Waiting> {
        let Some(queued) = self.queue.get(&id) else {
            return Err(Waiting::Because("not queued".into()));
        };
        // A build some worker refused, or one worker must not get (cooling
        // off), is decided on its own.
        let own_decision = queued.refused || queued.avoid.is_some();
        if !own_decision && let Some(why) = no_worker.get(&queued.builder) {
            return Err(why.clone());
        }
        let decision = self.pick_for(id);
        if let Err(why) = &decision
            && !own_decision
        {
            no_worker.insert(queued.builder.clone(), why.clone());
        }
        decision
    }

    /// What `name`'s build must fit: its agent's outlook, and the master's
    /// own schedule for it, which the agent cannot foresee. O(1).
    fn limits(&self, name: &str, outlook: Option<&Outlook>) -> WorkerLimits {
        let group = self.members.get(name).map(String::as_str);
        let schedule = self.schedules.limits(name, group);
        WorkerLimits {
            takes_builds_until: admission::earliest(
                outlook.and_then(|o| o.takes_builds_until),
                schedule.takes_builds_until,
            ),
            reluctant_from: admission::earliest(
                outlook.and_then(|o| o.reluctant_from),
                schedule.reluctant_from,
            ),
            overrun: outlook.map_or(SignedDuration::ZERO, |o| {
                SignedDuration::from_secs(i64::try_from(o.overrun_secs).unwrap_or(i64::MAX))
            }),
        }
    }

    /// What admission needs to know about a build of `builder` now.
    fn build_facts(&self, builder: &BuilderDef) -> BuildFacts {
        BuildFacts {
            now: self.clock.now(),
            estimate: self.estimates.get(&builder.name),
            admission: builder.admission,
            zone: TimeZone::system(),
        }
    }

    /// Which connected worker gets queued build `id` now: the first of its
    /// builder's eligible workers (in pick order) that did not refuse it and
    /// whose availability fits the build. O(log n) for the usual pick; only
    /// when eligible workers exist and none fits does it decide with
    /// [`pick_worker`] over every listed worker (window admission).
    pub(super) fn pick_for(&self, id: BuildId) -> Result<String, Waiting> {
        let Some(queued) = self.queue.get(&id) else {
            return Err(Waiting::Because("not queued".into()));
        };
        let Some(builder) = self.config.builder(&queued.builder) else {
            return Err(Waiting::Because(format!(
                "builder `{}` is not in master.toml",
                queued.builder
            )));
        };
        let build = self.build_facts(builder);
        let mut cut_short = false;
        for name in self.eligible.in_order(&builder.name) {
            let Some(slot) = self.workers.get(name) else {
                continue;
            };
            if slot.refused.contains(&id) || queued.avoid.as_deref() == Some(name) {
                continue;
            }
            let limits = self.limits(name, slot.outlook.as_ref());
            let state = self.effective_presence(name, &slot.presence).state;
            if build.ranks_as(state, limits.reluctant_from, limits.overrun) != state {
                // The run would go into this worker's reluctant time: the
                // full pick decides who ranks first.
                cut_short = true;
                break;
            }
            if build.fits(build.now, limits.takes_builds_until, limits.overrun) {
                return Ok(name.to_owned());
            }
            cut_short = true;
        }
        if !cut_short {
            return Err(Waiting::NoWorker { latent: None });
        }
        pick_worker(&build, self.candidates(builder, id))
            .map(str::to_owned)
            .map_err(Waiting::Because)
    }

    /// The facts of every worker `builder` lists (a group: each of its
    /// members, by name), for build `id`.
    fn candidates<'a>(
        &'a self,
        builder: &'a BuilderDef,
        id: BuildId,
    ) -> impl Iterator<Item = Candidate<'a>> + 'a {
        let names = builder.workers.iter().flat_map(move |entry| {
            let group = self
                .config
                .worker_group(entry)
                .map(|_| self.members_of(entry));
            let single = group.is_none().then_some(entry);
            group.into_iter().flatten().chain(single)
        });
        let avoid = self
            .queue
            .get(&id)
            .and_then(|queued| queued.avoid.as_deref());
        names.map(move |name| {
            let Some(slot) = self.workers.get(name) else {
                return Candidate::NotConfigured { name };
            };
            let outlook = slot.outlook.as_ref();
            let limits = self.limits(name, outlook);
            Candidate::Worker(WorkerFacts {
                name,
                connected: slot.conn.is_some(),
                state: self.effective_presence(name, &slot.presence).state,
                capacity: self.capacity(name, slot),
                running: slot.running.len(),
                lock_waits: self.lock_waits.count(name),
                refused_it: slot.refused.contains(&id),
                cooling_off: avoid == Some(name.as_str()),
                last_assigned: slot.last_assigned,
                takes_builds_until: limits.takes_builds_until,
                reluctant_from: limits.reluctant_from,
                next_window: outlook.and_then(|o| o.next_window),
                overrun: limits.overrun,
            })
        })
    }

    /// What queued build `id` waits for, in words: for a build no worker
    /// can take, every listed worker's state (built here, when the build is
    /// shown, never on the pick's path).
    pub(super) fn explain(&self, id: BuildId, waiting: &Waiting) -> String {
        self.explain_with(id, waiting, &mut HashMap::new())
    }

    /// [`Scheduler::explain`], remembering in `said` what the builds of each
    /// builder that no worker refused wait for: explaining a long queue (a
    /// snapshot) visits each builder's workers once, not once per build.
    pub(super) fn explain_with(
        &self,
        id: BuildId,
        waiting: &Waiting,
        said: &mut HashMap<String, String>,
    ) -> String {
        let latent = match waiting {
            Waiting::Because(text) => return text.clone(),
            Waiting::NoWorker { latent } => latent,
        };
        let queued = self.queue.get(&id);
        let builder = queued.and_then(|queued| self.config.builder(&queued.builder));
        let shared = queued.is_some_and(|q| !q.refused && q.avoid.is_none());
        let text = match builder {
            Some(builder) if shared && said.contains_key(&builder.name) => {
                said[&builder.name].clone()
            }
            Some(builder) => {
                let text =
                    match pick_worker(&self.build_facts(builder), self.candidates(builder, id)) {
                        Err(text) => text,
                        Ok(name) => format!("a worker ({name} takes it at the next hand-out)"),
                    };
                if shared {
                    said.insert(builder.name.clone(), text.clone());
                }
                text
            }
            None => "a worker".to_owned(),
        };
        match latent {
            Some(latent) => format!("{text}; latent: {latent}"),
            None => text,
        }
    }
}

/// When a worker stops taking builds and its overrun grace, from the
/// outlook its agent last sent.
/// The limits a worker's build must fit: its agent's outlook and the
/// master's own schedule for it, the earliest of each.
#[derive(Debug, Clone, Copy)]
pub(super) struct WorkerLimits {
    pub takes_builds_until: Option<jiff::Timestamp>,
    pub reluctant_from: Option<jiff::Timestamp>,
    pub overrun: SignedDuration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Admission;
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
            cooling_off: false,
            last_assigned: 0,
            takes_builds_until: None,
            reluctant_from: None,
            next_window: None,
            overrun: SignedDuration::ZERO,
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
        check_build(
            &BuildFacts::unknown(at("2026-12-01T12:00:00Z")),
            input,
            expect,
        );
    }

    fn check_build(build: &BuildFacts, input: Vec<Candidate<'_>>, expect: Result<&str, &str>) {
        let got = pick_worker(build, input.clone());
        assert_eq!(
            got,
            expect.map_err(str::to_owned),
            "build: {build:#?}\ncandidates: {input:#?}"
        );
    }

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().expect("timestamp")
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
    fn a_long_list_names_the_first_workers_and_counts_the_rest_by_reason() {
        let names: Vec<String> = (0..25).map(|i| format!("w{i:02}")).collect();
        let input: Vec<Candidate<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| match i % 3 {
                0 => w(name, Away),
                1 => with(w(name, Available), |f| f.connected = false),
                _ => with(w(name, Available), |f| f.running = 1),
            })
            .collect();
        check(
            input,
            Err(
                "a worker: w00 away, w01 offline, w02 busy (1/1), w03 away, w04 offline, \
                 w05 busy (1/1), w06 away, w07 offline, w08 busy (1/1), w09 away \
                 and 15 more: 5 offline, 5 busy, 5 away",
            ),
        );
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

    #[test]
    fn the_worker_cooling_off_after_its_lease_ended_is_passed_over() {
        // Even idle, available and listed first: a reluctant one wins...
        check(
            vec![
                with(w("held", Available), |f| f.cooling_off = true),
                w("r", Reluctant),
            ],
            Ok("r"),
        );
        // ...and with nobody else, the build waits and says why.
        check(
            vec![
                with(w("held", Available), |f| f.cooling_off = true),
                with(w("busy", Available), |f| f.running = 1),
            ],
            Err("a worker: held cooling off (its lock lease of this build ended), busy busy (1/1)"),
        );
    }

    /// A build of `mins` minutes (estimated) at 06:00 UTC on Tue 2026-12-01.
    fn lasting(mins: i64, admission: Admission) -> BuildFacts {
        BuildFacts {
            now: at("2026-12-01T06:00:00Z"),
            estimate: Some(SignedDuration::from_mins(mins)),
            admission,
            zone: TimeZone::UTC,
        }
    }

    /// Available until `until` (UTC, today), with `overrun` minutes of grace.
    fn until<'a>(candidate: Candidate<'a>, until: &str, overrun: i64) -> Candidate<'a> {
        with(candidate, |f| {
            f.takes_builds_until = Some(at(&format!("2026-12-01T{until}:00Z")));
            f.overrun = SignedDuration::from_mins(overrun);
        })
    }

    /// Away now; its next window is `[from, to)` (UTC, today).
    fn opens<'a>(name: &'a str, from: &str, to: &str) -> Candidate<'a> {
        with(w(name, Away), |f| {
            f.next_window = Some(Window {
                from: at(&format!("2026-12-01T{from}:00Z")),
                until: Some(at(&format!("2026-12-01T{to}:00Z"))),
            })
        })
    }

    #[test]
    fn a_build_goes_where_the_window_will_not_cut_it() {
        use Admission::{BestEffort, Fit};
        let ninety = lasting(90, Fit);
        // 06:00 + 90 min: lab-1 closes at 07:00, lab-2 at 08:00. lab-1 is
        // first listed and was given a build longest ago, yet lab-2 gets it.
        check_build(
            &ninety,
            vec![
                until(w("lab-1", Available), "07:00", 0),
                with(until(w("lab-2", Available), "08:00", 0), |f| {
                    f.last_assigned = 9
                }),
            ],
            Ok("lab-2"),
        );
        // A fitting reluctant worker beats an available one that would cut it.
        check_build(
            &ninety,
            vec![
                until(w("lab-1", Available), "07:00", 0),
                w("lab-2", Reluctant),
            ],
            Ok("lab-2"),
        );
        // Exactly at the end fits; one minute later does not.
        check_build(
            &ninety,
            vec![until(w("lab-1", Available), "07:30", 0)],
            Ok("lab-1"),
        );
        check_build(
            &lasting(91, BestEffort),
            vec![
                until(w("lab-1", Available), "07:30", 0),
                opens("lab-3", "19:00", "23:00"),
            ],
            Err("a window that fits 1h31m: lab-1 ends at 07:30; lab-3 opens at 19:00"),
        );
        // The owner's overrun grace counts.
        check_build(
            &ninety,
            vec![until(w("lab-1", Available), "07:00", 30)],
            Ok("lab-1"),
        );
        check_build(
            &ninety,
            vec![until(w("lab-1", Available), "07:00", 29)],
            Err("no window fits 1h30m before 07:00 (lab-1 ends then; admission = \"fit\")"),
        );
        // No estimate yet: nothing is held back.
        check_build(
            &BuildFacts::unknown(at("2026-12-01T06:59:00Z")),
            vec![until(w("lab-1", Available), "07:00", 0)],
            Ok("lab-1"),
        );
    }

    /// Available now, reluctant from `from` (UTC, today).
    fn reluctant_from<'a>(candidate: Candidate<'a>, from: &str) -> Candidate<'a> {
        with(candidate, |f| {
            f.reluctant_from = Some(at(&format!("2026-12-01T{from}:00Z")))
        })
    }

    #[test]
    fn a_build_that_would_run_into_reluctant_time_goes_there_last() {
        use Admission::Fit;
        let ninety = lasting(90, Fit);
        // lab-1 turns reluctant at 07:00 (away at 09:00): a 90-minute build
        // from 06:00 would run into the owner's reluctant morning, so lab-2,
        // available throughout, gets it though lab-1 is first and idle longer.
        check_build(
            &ninety,
            vec![
                until(reluctant_from(w("lab-1", Available), "07:00"), "09:00", 0),
                with(w("lab-2", Available), |f| f.last_assigned = 9),
            ],
            Ok("lab-2"),
        );
        // It ranks with the reluctant ones: fewer running builds decide.
        check_build(
            &ninety,
            vec![
                with(
                    until(reluctant_from(w("lab-1", Available), "07:00"), "09:00", 0),
                    |f| {
                        f.capacity = 2;
                        f.running = 1
                    },
                ),
                w("lab-2", Reluctant),
            ],
            Ok("lab-2"),
        );
        // Nobody else can take it: the reluctant morning is lent for it.
        check_build(
            &ninety,
            vec![
                until(reluctant_from(w("lab-1", Available), "07:00"), "09:00", 0),
                with(w("lab-2", Available), |f| f.running = 1),
                w("lab-3", Away),
            ],
            Ok("lab-1"),
        );
        // A build that ends before 07:00 (or within the owner's overrun)
        // still counts lab-1 as available.
        for (build, overrun) in [(lasting(60, Fit), 0), (ninety.clone(), 30)] {
            check_build(
                &build,
                vec![
                    w("lab-2", Reluctant),
                    until(
                        reluctant_from(w("lab-1", Available), "07:00"),
                        "09:00",
                        overrun,
                    ),
                ],
                Ok("lab-1"),
            );
        }
        // Reluctant time does not stretch the end: past 09:00 is still cut.
        check_build(
            &lasting(200, Fit),
            vec![until(
                reluctant_from(w("lab-1", Available), "07:00"),
                "09:00",
                0,
            )],
            Err("no window fits 3h20m before 09:00 (lab-1 ends then; admission = \"fit\")"),
        );
    }

    #[test]
    fn when_nothing_fits_now_the_build_waits_or_starts_by_the_builders_setting() {
        use Admission::{BestEffort, Fit};
        // A fitting worker that is merely busy: wait for it, in both modes.
        for mode in [Fit, BestEffort] {
            check_build(
                &lasting(90, mode),
                vec![
                    until(w("lab-1", Available), "07:00", 0),
                    with(w("lab-2", Available), |f| f.running = 1),
                ],
                Err("a window that fits 1h30m: lab-1 ends at 07:00; lab-2 fits once it has room"),
            );
        }
        // A window long enough opens later: wait for it, in both modes.
        check_build(
            &lasting(80, BestEffort),
            vec![
                until(w("lab-1", Available), "07:00", 0),
                opens("lab-3", "19:00", "20:00"),
                opens("lab-4", "21:00", "23:00"),
            ],
            Err("a window that fits 1h20m: lab-1 ends at 07:00; lab-4 opens at 21:00"),
        );
        // No window fits at all: `fit` waits and says why ...
        let short_windows = || {
            vec![
                until(w("lab-1", Available), "07:00", 0),
                until(w("lab-2", Available), "07:10", 0),
                opens("lab-3", "19:00", "20:00"),
            ]
        };
        check_build(
            &lasting(80, Fit),
            short_windows(),
            Err("no window fits 1h20m before 07:10 (lab-2 ends then; admission = \"fit\")"),
        );
        // ... `best-effort` starts it where the availability lasts longest.
        check_build(&lasting(80, BestEffort), short_windows(), Ok("lab-2"));
        // Nobody can take it now: the wait names a window that fits.
        check_build(
            &lasting(80, Fit),
            vec![w("lab-1", Away), opens("lab-3", "19:00", "21:00")],
            Err("a worker: lab-1 away, lab-3 away; lab-3 opens at 19:00 (fits 1h20m)"),
        );
        // A window that opened already counts from now; one with no known
        // end fits anything.
        check_build(
            &lasting(80, Fit),
            vec![
                until(w("lab-1", Available), "07:00", 0),
                with(w("lab-3", Away), |f| {
                    f.next_window = Some(Window {
                        from: at("2026-12-02T19:00:00Z"),
                        until: None,
                    })
                }),
            ],
            Err("a window that fits 1h20m: lab-1 ends at 07:00; lab-3 opens at Wed 19:00"),
        );
    }
}
