//! Randomized stress of the scheduler's lock code: many builds of builders
//! with overlapping builder- and step-level lock sets, driven through the
//! real [`Scheduler`](super::Scheduler) by simulated agents that run their
//! steps in a random interleaving. Every build finishes (no deadlock) and no
//! lock is ever used beyond its count.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use nightshift_policy::PresenceState;
use nightshift_proto::wire::{
    AgentMessage, BuildId, BuildResult, MasterMessage, Outcome, StepResult,
};

use super::test_harness::{Harness, MasterToml};
use super::{ConnId, Event, Outbound};
use crate::config::MasterConfig;
use crate::locks::{Access, Claim, LockScope};
use crate::outbox::{Next, OutboxReceiver};

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
/// Name, scope and count of every lock.
const LOCKS: [(&str, &str, u32); 4] = [
    ("l0", "master", 1),
    ("l1", "master", 2),
    ("l2", "worker", 1),
    ("l3", "master", 1),
];
const BUILDERS: usize = 4;
const STEPS: usize = 3;
const BUILDS: usize = 30;

/// xorshift64: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A builder's builder-level claims and each step's claims.
type LockPlan = (Vec<Claim>, Vec<Vec<Claim>>);

/// A random lock set over `LOCKS`, leaving out `taken`.
fn claims(rng: &mut Rng, taken: &[Claim]) -> Vec<Claim> {
    let mut claims = Vec::new();
    for (name, _, _) in LOCKS {
        if taken.iter().any(|c| c.name == name) {
            continue;
        }
        match rng.below(5) {
            0 => claims.push(Claim::new(name, Access::Exclusive)),
            1 | 2 => claims.push(Claim::new(name, Access::Counting)),
            _ => {}
        }
    }
    claims
}

/// The strings of `texts`, borrowed.
fn as_str(texts: &[String]) -> Vec<&str> {
    texts.iter().map(String::as_str).collect()
}

/// Each claim as a TOML inline table.
fn toml_claims(claims: &[Claim]) -> Vec<String> {
    claims
        .iter()
        .map(|c| {
            let access = match c.access {
                Access::Exclusive => "exclusive",
                Access::Counting => "counting",
            };
            format!("{{ name = \"{}\", access = \"{access}\" }}", c.name)
        })
        .collect()
}

/// A config with `LOCKS`, `WORKERS` and `BUILDERS` random builders; returns
/// it with each builder's builder-level and per-step claims.
fn random_farm(rng: &mut Rng) -> (Arc<MasterConfig>, Vec<LockPlan>) {
    let mut toml = MasterToml::new();
    for (name, scope, max_count) in LOCKS {
        toml = toml.lock(name, scope, max_count);
    }
    for worker in WORKERS {
        toml = toml.worker_with_slots(worker, 2);
    }
    let mut plans = Vec::new();
    for b in 0..BUILDERS {
        let build = claims(rng, &[]);
        let steps: Vec<Vec<Claim>> = (0..STEPS).map(|_| claims(rng, &build)).collect();
        let build_toml = toml_claims(&build);
        let steps_toml: Vec<Vec<String>> = steps.iter().map(|c| toml_claims(c)).collect();
        let step_claims: Vec<Vec<&str>> = steps_toml.iter().map(|c| as_str(c)).collect();
        let step_claims: Vec<&[&str]> = step_claims.iter().map(Vec::as_slice).collect();
        toml = toml.builder_with(
            &format!("b{b}"),
            &WORKERS,
            &as_str(&build_toml),
            &step_claims,
        );
        plans.push((build, steps));
    }
    (toml.parse(), plans)
}

/// Where a simulated agent is in one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Step `at` not begun.
    Ready,
    /// Asked for step `at`'s grant.
    Waiting,
    /// Running step `at`.
    InStep,
}

#[derive(Debug)]
struct Run {
    builder: usize,
    needs_grant: Vec<bool>,
    at: usize,
    phase: Phase,
}

struct Agent {
    name: &'static str,
    conn: ConnId,
    rx: OutboxReceiver,
    runs: BTreeMap<BuildId, Run>,
}

fn send(h: &mut Harness, agent: &Agent, message: AgentMessage) {
    h.scheduler.handle(Event::Agent {
        worker: agent.name.into(),
        conn: agent.conn,
        message,
    });
}

/// Units of each lock copy in use by what the agents are running now.
fn usage(agents: &[Agent], plans: &[LockPlan]) -> BTreeMap<(String, String), u32> {
    let mut used = BTreeMap::new();
    for agent in agents {
        for run in agent.runs.values() {
            let (build, steps) = &plans[run.builder];
            let mut held: Vec<&Claim> = build.iter().collect();
            if run.phase == Phase::InStep {
                held.extend(&steps[run.at]);
            }
            for claim in held {
                let (_, scope, max) = LOCKS.iter().find(|(n, _, _)| *n == claim.name).unwrap();
                let copy = if *scope == "worker" { agent.name } else { "*" };
                let units = if claim.access == Access::Exclusive {
                    *max
                } else {
                    1
                };
                *used
                    .entry((claim.name.clone(), copy.to_owned()))
                    .or_default() += units;
            }
        }
    }
    used
}

/// One frame the master sent `agent`: a start is accepted, a grant lets the
/// waiting step run.
fn on_frame(h: &mut Harness, agent: &mut Agent, out: Outbound, seed: u64) {
    if let Outbound::AfterCommit(_) = out {
        // The store's commit orders nothing among these simulated agents.
        return;
    }
    let Outbound::Message(message) = out else {
        panic!("seed {seed}: {} was disconnected: {out:?}", agent.name);
    };
    match message {
        MasterMessage::StartBuild {
            build_id,
            builder,
            steps,
            ..
        } => {
            let builder: usize = builder[1..].parse().unwrap();
            agent.runs.insert(
                build_id,
                Run {
                    builder,
                    needs_grant: steps.iter().map(|s| s.needs_grant).collect(),
                    at: 0,
                    phase: Phase::Ready,
                },
            );
            send(h, agent, AgentMessage::BuildAccepted { build_id });
        }
        MasterMessage::StepGranted { build_id, step } => {
            let run = agent.runs.get_mut(&build_id).unwrap_or_else(|| {
                panic!("seed {seed}: a grant for build {build_id}, not running")
            });
            assert_eq!(
                (run.at, run.phase),
                (step as usize, Phase::Waiting),
                "seed {seed}: a grant nobody asked for"
            );
            run.phase = Phase::InStep;
        }
        _ => {}
    }
}

async fn stress(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (config, plans) = random_farm(&mut rng);
    assert!(config.locks.iter().any(|l| l.scope == LockScope::Worker));
    let mut h = Harness::with_config(config);
    let mut agents: Vec<Agent> = WORKERS
        .iter()
        .map(|name| {
            let (conn, rx) = h.connect_with_slots(name, PresenceState::Available, vec![], 2);
            Agent {
                name,
                conn,
                rx,
                runs: BTreeMap::new(),
            }
        })
        .collect();
    for _ in 0..BUILDS {
        let builder = rng.below(BUILDERS as u64);
        h.submit_to(&format!("b{builder}")).await;
    }
    let mut finished = 0;
    let mut turns = 0;
    while finished < BUILDS {
        turns += 1;
        assert!(turns < 100_000, "seed {seed}: no end after {turns} turns");
        // What the master sent.
        for agent in agents.iter_mut() {
            while let Ok(out) = agent.rx.try_recv() {
                on_frame(&mut h, agent, out, seed);
            }
        }
        // No lock beyond its count.
        for ((name, copy), units) in usage(&agents, &plans) {
            let (_, _, max) = LOCKS.iter().find(|(n, _, _)| *n == name).unwrap();
            assert!(
                units <= *max,
                "seed {seed}: lock {name} ({copy}) used {units} > {max}: {plans:?}"
            );
        }
        // Everything an agent could do now; one of them, at random.
        let mut moves = Vec::new();
        for (at, agent) in agents.iter().enumerate() {
            for (id, run) in &agent.runs {
                if run.phase != Phase::Waiting {
                    moves.push((at, *id));
                }
            }
        }
        if moves.is_empty() {
            // Step grants are sent once the store has persisted them: wait
            // for the next frame; none within the deadline is a deadlock.
            let [a0, a1, a2] = &mut agents[..] else {
                unreachable!("three workers")
            };
            let next = async {
                tokio::select! {
                    next = a0.rx.next() => (0, next),
                    next = a1.rx.next() => (1, next),
                    next = a2.rx.next() => (2, next),
                }
            };
            match tokio::time::timeout(Duration::from_secs(30), next).await {
                Ok((at, Next::Frame(out))) => on_frame(&mut h, &mut agents[at], out, seed),
                Ok((at, other)) => panic!("seed {seed}: {}'s outbox: {other:?}", agents[at].name),
                Err(_) => {
                    let runs: Vec<_> = agents.iter().map(|a| (a.name, &a.runs)).collect();
                    panic!(
                        "seed {seed}: deadlock with {finished} of {BUILDS} builds done; \
                         agents: {runs:?}; waiting: {:?}; plans: {plans:?}",
                        h.scheduler.snapshot().waiting_for
                    );
                }
            }
            continue;
        }
        let (at, id) = moves[rng.below(moves.len() as u64) as usize];
        let run = agents[at].runs.get_mut(&id).unwrap();
        match run.phase {
            Phase::Ready if run.needs_grant[run.at] => {
                run.phase = Phase::Waiting;
                let step = run.at as u32;
                send(
                    &mut h,
                    &agents[at],
                    AgentMessage::StepWaiting { build_id: id, step },
                );
            }
            Phase::Ready => run.phase = Phase::InStep,
            Phase::InStep => {
                let step = run.at as u32;
                run.at += 1;
                run.phase = Phase::Ready;
                let done = run.at == run.needs_grant.len();
                let result = StepResult {
                    step,
                    outcome: Outcome::Success,
                    exit_code: Some(0),
                    signal: None,
                    started_at: Timestamp::UNIX_EPOCH,
                    finished_at: Timestamp::UNIX_EPOCH,
                };
                send(
                    &mut h,
                    &agents[at],
                    AgentMessage::StepFinished {
                        build_id: id,
                        result,
                    },
                );
                if done {
                    agents[at].runs.remove(&id);
                    finished += 1;
                    send(
                        &mut h,
                        &agents[at],
                        AgentMessage::BuildFinished {
                            result: BuildResult {
                                build_id: id,
                                outcome: Outcome::Success,
                                steps: vec![],
                                reason: None,
                                log: String::new(),
                                finished_at: Timestamp::UNIX_EPOCH,
                            },
                        },
                    );
                }
            }
            Phase::Waiting => unreachable!("waiting runs are not moves"),
        }
    }
    let snapshot = h.scheduler.snapshot();
    assert!(
        snapshot.running.is_empty() && snapshot.waiting_for.is_empty(),
        "seed {seed}: left over: running {:?}, waiting {:?}",
        snapshot.running,
        snapshot.waiting_for
    );
}

#[tokio::test]
async fn random_builds_with_builder_and_step_locks_all_finish_within_counts() {
    for seed in 0..40 {
        stress(seed).await;
    }
}
