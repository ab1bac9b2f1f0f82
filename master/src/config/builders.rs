//! The `[[builder]]` entries of `master.toml`: workers, steps, locks,
//! admission, source, triggers (poll, schedule) and artifacts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nightshift_proto::diag::ConfigErrors;
use nightshift_proto::wire::CheckoutMode;
use serde::Deserialize;

use super::Secs;
use super::artifacts::check_artifact_pattern;
use super::names::{Written, check_branch_name, check_repo_url, valid_name};
use crate::locks::{Access, Claim};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    repo: String,
    #[serde(default = "default_branch")]
    branch: String,
    #[serde(default)]
    mode: CheckoutMode,
    #[serde(default)]
    shallow: bool,
}

fn default_branch() -> String {
    "main".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuilder {
    name: String,
    workers: Vec<String>,
    steps: Vec<RawStep>,
    #[serde(default)]
    locks: Vec<RawClaim>,
    #[serde(default)]
    admission: Admission,
    source: Option<RawSource>,
    poll: Option<Secs>,
    schedule: Option<String>,
    #[serde(default)]
    only_if_changed: bool,
    #[serde(default)]
    collapse: bool,
    #[serde(default)]
    artifacts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStep {
    name: String,
    command: String,
    timeout: Option<Secs>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    #[serde(default)]
    locks: Vec<RawClaim>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClaim {
    name: String,
    access: Access,
}

/// One step of a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDef {
    pub name: String,
    pub command: String,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub locks: Vec<Claim>,
}

/// What a builder's request does when no worker's availability fits its
/// estimated duration (`admission` in `[[builder]]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// Wait for a window that fits (the default: the farm never spills
    /// into the owner's time, and a build cut short is wasted work).
    #[default]
    Fit,
    /// Start anyway on the worker whose availability lasts longest.
    BestEffort,
}

/// A builder's git source: what the agent checks out before the first step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDef {
    /// Repository URL (https://, ssh://, git://, file://, or scp-like
    /// `git@host:path`), as both the master (`git ls-remote`) and the
    /// workers (`git fetch`) reach it.
    pub repo: String,
    /// The branch the builder follows.
    pub branch: String,
    pub mode: CheckoutMode,
    pub shallow: bool,
}

/// One `[[builder]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderDef {
    pub name: String,
    pub workers: Vec<String>,
    pub steps: Vec<StepDef>,
    pub locks: Vec<Claim>,
    pub admission: Admission,
    pub source: Option<SourceDef>,
    /// Ask the repository for the branch's head this often (`git ls-remote`).
    pub poll: Option<Duration>,
    /// Cron expression (validated) of timed builds, in the master's zone.
    pub schedule: Option<String>,
    /// A timed build runs only when the branch moved since the last one.
    pub only_if_changed: bool,
    /// Waiting requests for the same branch collapse into the newest.
    pub collapse: bool,
    /// Glob patterns, relative to the build directory, of the files the
    /// agent uploads after the last step succeeded (checked by
    /// [`check_artifact_pattern`]).
    pub artifacts: Vec<String>,
}

/// Checks the `[[builder]]` entries against the workers and locks defined.
pub(super) fn parse_builders(
    raw: Vec<RawBuilder>,
    worker_names: &BTreeSet<String>,
    lock_names: &BTreeSet<String>,
    written: &Written,
    errors: &mut ConfigErrors,
) -> Vec<BuilderDef> {
    let mut issue = |key: String, message: String| errors.push_at_path(&key, message);
    let mut builders = Vec::new();
    let mut builder_names = BTreeSet::new();
    for (i, b) in raw.into_iter().enumerate() {
        let name = b.name.clone();
        if !valid_name(&name) {
            issue(
                format!("builder[{i}].name"),
                format!("`{name}` is not a valid name (letters, digits, `-`, `_`, `.`)"),
            );
        } else if !builder_names.insert(name.clone()) {
            issue(
                format!("builder[{i}].name"),
                format!("builder `{name}` is defined twice"),
            );
        }
        if b.workers.is_empty() {
            issue(
                format!("builder[{i}].workers"),
                "lists no worker; the builder could never run".into(),
            );
        }
        for (j, worker) in b.workers.iter().enumerate() {
            if !worker_names.contains(worker) && !written.workers.contains(worker) {
                issue(
                    format!("builder[{i}].workers[{j}]"),
                    format!("unknown worker `{}` (no [[worker]] with that name)", worker),
                );
            }
        }
        if b.steps.is_empty() {
            issue(format!("builder[{i}].steps"), "has no step".into());
        }
        let mut check_claims = |claims: &[RawClaim], key: String| -> Vec<Claim> {
            let mut seen = BTreeSet::new();
            claims
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    if !lock_names.contains(&c.name) && !written.locks.contains(&c.name) {
                        issue(
                            format!("{key}[{k}].name"),
                            format!("unknown lock `{}` (no [[lock]] with that name)", c.name),
                        );
                    } else if !seen.insert(c.name.clone()) {
                        issue(
                            format!("{key}[{k}].name"),
                            format!("lock `{}` is listed twice", c.name),
                        );
                    }
                    Claim::new(c.name.clone(), c.access)
                })
                .collect()
        };
        let builder_locks = check_claims(&b.locks, format!("builder[{i}].locks"));
        let steps = b
            .steps
            .iter()
            .enumerate()
            .map(|(j, s)| StepDef {
                name: s.name.clone(),
                command: s.command.clone(),
                timeout: s.timeout.map(|t| t.0),
                env: s.env.clone(),
                workdir: s.workdir.clone(),
                locks: check_claims(&s.locks, format!("builder[{i}].steps[{j}].locks")),
            })
            .collect();
        // A step taking a lock its whole build holds would wait for
        // itself forever.
        for (j, s) in b.steps.iter().enumerate() {
            for (k, c) in s.locks.iter().enumerate() {
                if b.locks.iter().any(|held| held.name == c.name) {
                    issue(
                        format!("builder[{i}].steps[{j}].locks[{k}].name"),
                        format!(
                            "lock `{}` is already held by the whole build (the builder's `locks`); \
                                 a step cannot take it again",
                            c.name
                        ),
                    );
                }
            }
        }
        let source = b.source.map(|src| {
            if let Err(why) = check_repo_url(&src.repo) {
                issue(format!("builder[{i}].source.repo"), why);
            }
            if let Err(why) = check_branch_name(&src.branch) {
                issue(format!("builder[{i}].source.branch"), why);
            }
            SourceDef {
                repo: src.repo,
                branch: src.branch,
                mode: src.mode,
                shallow: src.shallow,
            }
        });
        let has_source = source.is_some() || written.sourced_builders.contains(&name);
        if let Some(poll) = b.poll {
            if !has_source {
                issue(
                    format!("builder[{i}].poll"),
                    "polling needs a `source` (the repository and branch to poll)".into(),
                );
            } else if poll.0 < Duration::from_secs(1) {
                issue(
                    format!("builder[{i}].poll"),
                    "must be at least 1s (each poll runs `git ls-remote` against the remote; \
                         minutes are kind to it)"
                        .into(),
                );
            }
        }
        if let Some(expr) = &b.schedule
            && let Err(why) = nightshift_policy::CronSchedule::parse(expr)
        {
            issue(format!("builder[{i}].schedule"), why);
        }
        if b.only_if_changed && (b.schedule.is_none() || !has_source) {
            issue(
                    format!("builder[{i}].only_if_changed"),
                    "applies to timed builds of a builder with a `source`: set `schedule` and `source` too"
                        .into(),
                );
        }
        for (j, pattern) in b.artifacts.iter().enumerate() {
            if let Err(why) = check_artifact_pattern(pattern) {
                issue(format!("builder[{i}].artifacts[{j}]"), why);
            }
        }
        if b.collapse && !has_source {
            issue(
                format!("builder[{i}].collapse"),
                "collapsing merges requests for the same branch: the builder needs a `source`"
                    .into(),
            );
        }
        builders.push(BuilderDef {
            name,
            workers: b.workers,
            steps,
            locks: builder_locks,
            admission: b.admission,
            source,
            poll: b.poll.map(|p| p.0),
            schedule: b.schedule,
            only_if_changed: b.only_if_changed,
            collapse: b.collapse,
            artifacts: b.artifacts,
        });
    }
    builders
}
