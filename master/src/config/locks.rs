//! The `[[lock]]` entries of `master.toml`: names, scopes and counts.

use std::collections::{BTreeMap, BTreeSet};

use nightshift_proto::diag::ConfigErrors;
use serde::Deserialize;

use super::names::{Written, valid_name};
use crate::locks::{LockDef, LockScope};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLock {
    name: String,
    scope: LockScope,
    #[serde(default = "one")]
    max_count: u32,
    #[serde(default)]
    max_count_for: BTreeMap<String, u32>,
}

fn one() -> u32 {
    1
}

/// Checks the `[[lock]]` entries against the workers defined; returns them
/// and the lock names defined.
pub(super) fn parse_locks(
    raw: Vec<RawLock>,
    worker_names: &BTreeSet<String>,
    written: &Written,
    errors: &mut ConfigErrors,
) -> (Vec<LockDef>, BTreeSet<String>) {
    let mut issue = |key: String, message: String| errors.push_at_path(&key, message);
    let mut locks = Vec::new();
    let mut lock_names = BTreeSet::new();
    for (i, l) in raw.into_iter().enumerate() {
        let name = l.name.clone();
        if !valid_name(&name) {
            issue(
                format!("lock[{i}].name"),
                format!("`{name}` is not a valid name"),
            );
        } else if !lock_names.insert(name.clone()) {
            issue(
                format!("lock[{i}].name"),
                format!("lock `{name}` is defined twice"),
            );
        }
        if l.max_count == 0 {
            issue(format!("lock[{i}].max_count"), "must be at least 1".into());
        }
        for (worker, count) in &l.max_count_for {
            if l.scope != LockScope::Worker {
                issue(
                    format!("lock[{i}].max_count_for"),
                    "per-worker counts only apply to `scope = \"worker\"`".into(),
                );
            } else if !worker_names.contains(worker) && !written.workers.contains(worker) {
                issue(
                    format!("lock[{i}].max_count_for.{worker}"),
                    format!("unknown worker `{worker}`"),
                );
            } else if *count == 0 {
                issue(
                    format!("lock[{i}].max_count_for.{worker}"),
                    "must be at least 1".into(),
                );
            }
        }
        locks.push(LockDef {
            name,
            scope: l.scope,
            max_count: l.max_count,
            max_count_for_worker: l.max_count_for,
        });
    }
    (locks, lock_names)
}
