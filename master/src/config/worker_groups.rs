//! The `[[worker_group]]` entries of `master.toml`: a group's name, the hash
//! of its enrolment token, its members' build capacity, how many it enrols
//! and the master-side schedule that holds for all of them; validated with
//! every problem named.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// Most workers a group enrols unless `max_workers` says otherwise.
pub const DEFAULT_MAX_WORKERS: u32 = 10_000;

/// One `[[worker_group]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerGroupDef {
    /// The group's name: builders list it in `workers`, and every member's
    /// name starts with `<name>-`.
    pub name: String,
    /// Lowercase hex SHA-256 of the enrolment token. That token only
    /// enrols: it never opens an agent session and never runs a build.
    pub enroll_token_sha256: String,
    /// Builds each member may run at once (also capped by its agent).
    pub max_builds: u32,
    /// Most members the group enrols (revoking one makes room).
    pub max_workers: u32,
    /// Master-side availability windows for every member (same forms and
    /// meaning as a `[[worker]]`'s `schedule`), evaluated once for the group.
    pub schedule: Vec<nightshift_policy::ScheduleConfig>,
    /// The zone `schedule` is read in (default: the master's).
    pub timezone: Option<String>,
}

impl WorkerGroupDef {
    /// Whether `worker` is a name a member of this group may have:
    /// `<group>-<suffix>`, a valid name.
    pub fn may_name(&self, worker: &str) -> bool {
        worker
            .strip_prefix(&self.name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|suffix| !suffix.is_empty())
            && crate::config::valid_name(worker)
    }
}

/// `[[worker_group]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkerGroup {
    name: String,
    enroll_token_sha256: Option<String>,
    #[serde(default = "one")]
    max_builds: u32,
    #[serde(default = "default_max_workers")]
    max_workers: u32,
    #[serde(default)]
    schedule: Vec<nightshift_policy::ScheduleConfig>,
    timezone: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_max_workers() -> u32 {
    DEFAULT_MAX_WORKERS
}

/// Validates the groups; `worker_names` are the `[[worker]]` names (a group
/// may not share one: a builder's `workers` entry must mean one thing).
/// Every problem goes to `issue(key, message)`.
pub fn validate(
    raw: Vec<RawWorkerGroup>,
    worker_names: &BTreeSet<String>,
    issue: &mut impl FnMut(String, String),
) -> Vec<WorkerGroupDef> {
    let mut names = BTreeSet::new();
    let mut groups = Vec::new();
    for (i, g) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("worker_group[{i}].{field}");
        if !crate::config::valid_name(&g.name) {
            issue(
                key("name"),
                format!(
                    "`{}` is not a valid name (letters, digits, `-`, `_`, `.`)",
                    g.name
                ),
            );
        } else if worker_names.contains(&g.name) {
            issue(
                key("name"),
                format!(
                    "`{}` is already a [[worker]]; a group needs a name of its own",
                    g.name
                ),
            );
        } else if !names.insert(g.name.clone()) {
            issue(
                key("name"),
                format!("worker group `{}` is defined twice", g.name),
            );
        }
        let hash = match g.enroll_token_sha256.as_deref() {
            None => {
                issue(
                    key("enroll_token_sha256"),
                    "missing: the SHA-256 of the group's enrolment token \
                     (`master add-worker-group NAME` prints one)"
                        .into(),
                );
                String::new()
            }
            Some(text) => crate::config::normalize_hash(text).unwrap_or_else(|| {
                issue(
                    key("enroll_token_sha256"),
                    format!("`{text}` is not 64 hex digits (a SHA-256)"),
                );
                String::new()
            }),
        };
        if g.max_builds == 0 {
            issue(key("max_builds"), "must be at least 1".into());
        }
        if g.max_workers == 0 {
            issue(key("max_workers"), "must be at least 1".into());
        }
        super::workers::check_master_schedule(
            &g.schedule,
            g.timezone.as_deref(),
            &format!("worker_group[{i}]"),
            issue,
        );
        groups.push(WorkerGroupDef {
            name: g.name,
            enroll_token_sha256: hash,
            max_builds: g.max_builds,
            max_workers: g.max_workers,
            schedule: g.schedule,
            timezone: g.timezone,
        });
    }
    // One enrolment token per group, so a token says which group it is for.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        if g.enroll_token_sha256.is_empty() {
            continue;
        }
        if let Some(other) = seen.insert(&g.enroll_token_sha256, &g.name) {
            issue(
                format!("worker_group[{i}].enroll_token_sha256"),
                format!("the same enrolment token as group `{other}`; give each group its own"),
            );
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> WorkerGroupDef {
        WorkerGroupDef {
            name: name.into(),
            enroll_token_sha256: "a".repeat(64),
            max_builds: 1,
            max_workers: 10,
            schedule: Vec::new(),
            timezone: None,
        }
    }

    #[test]
    fn members_are_named_after_their_group() {
        let lab = group("lab");
        assert!(lab.may_name("lab-pc17"));
        assert!(lab.may_name("lab-a.b_c"));
        assert!(!lab.may_name("lab-"), "a suffix is needed");
        assert!(!lab.may_name("lab"), "the group's own name");
        assert!(!lab.may_name("labx-1"));
        assert!(!lab.may_name("other-1"));
        assert!(!lab.may_name("lab-a b"), "not a valid name");
    }

    #[test]
    fn groups_are_validated_with_every_problem_named() {
        let raw: Vec<RawWorkerGroup> = toml::from_str::<toml::Table>(
            r#"
            [[g]]
            name = "w"
            enroll_token_sha256 = "xyz"
            max_builds = 0
            [[g]]
            name = "lab"
            [[g]]
            name = "lab"
            enroll_token_sha256 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            [[g]]
            name = "lab2"
            enroll_token_sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "#,
        )
        .unwrap()["g"]
            .clone()
            .try_into()
            .unwrap();
        let mut issues = Vec::new();
        let workers = BTreeSet::from(["w".to_owned()]);
        let groups = validate(raw, &workers, &mut |key, message| {
            issues.push(format!("{key}: {message}"))
        });
        assert_eq!(groups.len(), 4);
        assert_eq!(groups[2].enroll_token_sha256, "a".repeat(64));
        let text = issues.join("\n");
        for expected in [
            "worker_group[0].name: `w` is already a [[worker]]",
            "worker_group[0].enroll_token_sha256: `xyz` is not 64 hex digits",
            "worker_group[0].max_builds: must be at least 1",
            "worker_group[1].enroll_token_sha256: missing",
            "worker_group[2].name: worker group `lab` is defined twice",
            "worker_group[3].enroll_token_sha256: the same enrolment token as group `lab`",
        ] {
            assert!(text.contains(expected), "{expected}\nin:\n{text}");
        }
        assert_eq!(issues.len(), 6, "{text}");
    }
}
