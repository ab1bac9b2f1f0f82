//! Reconfiguration semantics (`master reconfig`, SIGHUP): what changes when a
//! new `master.toml` replaces the running one, computed as a pure diff so the
//! scheduler applies it in one turn.
//!
//! The rules:
//! - the new file is loaded and validated whole first; any error refuses the
//!   reconfig with every error listed, and the running config stays;
//! - settings that only a restart can change (`data_dir`, listen address,
//!   TLS files) are refused too, naming the key, so nothing half-applies;
//! - new and changed builders apply to builds handed out from now on;
//!   running builds keep the steps and locks they started with;
//! - a removed worker is drained: it gets no new build, its running builds
//!   finish, then it is released (and refused from then on);
//! - lock counts change for new acquisitions; holders are never evicted.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};

use crate::config::MasterConfig;
use crate::scheduler::Event;

/// How one named collection (workers, builders, locks) changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamedDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl NamedDiff {
    /// Compares two collections keyed by name.
    pub fn between<'a, T: PartialEq + 'a>(
        old: impl IntoIterator<Item = (&'a str, &'a T)>,
        new: impl IntoIterator<Item = (&'a str, &'a T)>,
    ) -> NamedDiff {
        let old: BTreeMap<&str, &T> = old.into_iter().collect();
        let new: BTreeMap<&str, &T> = new.into_iter().collect();
        let mut diff = NamedDiff::default();
        for (name, value) in &new {
            match old.get(name) {
                None => diff.added.push((*name).to_owned()),
                Some(before) if before != value => diff.changed.push((*name).to_owned()),
                Some(_) => {}
            }
        }
        for name in old.keys() {
            if !new.contains_key(name) {
                diff.removed.push((*name).to_owned());
            }
        }
        diff
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    fn describe(&self, what: &str, out: &mut Vec<String>) {
        for (verb, names) in [
            ("added", &self.added),
            ("changed", &self.changed),
            ("removed", &self.removed),
        ] {
            if !names.is_empty() {
                out.push(format!("{what} {verb}: {}", names.join(", ")));
            }
        }
    }
}

/// A setting that a running master cannot change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartOnly {
    /// The key as written in `master.toml`, e.g. `data_dir`.
    pub key: &'static str,
    pub old: String,
    pub new: String,
}

/// What a reconfig will do, or why it is refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReconfigPlan {
    pub workers: NamedDiff,
    pub builders: NamedDiff,
    pub locks: NamedDiff,
    /// Other settings that change live (e.g. `max_starting`).
    pub settings: Vec<String>,
}

impl ReconfigPlan {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
            && self.builders.is_empty()
            && self.locks.is_empty()
            && self.settings.is_empty()
    }

    /// One line per change, for the log and the `master reconfig` answer.
    pub fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.workers.describe("workers", &mut out);
        self.builders.describe("builders", &mut out);
        self.locks.describe("locks", &mut out);
        out.extend(self.settings.iter().cloned());
        if out.is_empty() {
            out.push("no changes".to_owned());
        }
        out
    }
}

/// Why a reconfig was refused; the running config stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReconfigRefused {
    /// The new file does not load or validate; every error, located.
    Invalid(Vec<String>),
    /// The new file changes settings only a restart can change.
    NeedsRestart(Vec<RestartOnly>),
}

impl fmt::Display for ReconfigRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReconfigRefused::Invalid(errors) => {
                write!(f, "new config refused, the running one stays:")?;
                for error in errors {
                    write!(f, "\n  {error}")?;
                }
                Ok(())
            }
            ReconfigRefused::NeedsRestart(keys) => {
                write!(
                    f,
                    "new config refused, the running one stays: these settings change only with a restart:"
                )?;
                for key in keys {
                    write!(f, "\n  {}: {} -> {}", key.key, key.old, key.new)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ReconfigRefused {}

/// Compares a restart-only setting; pushes it when it differs.
pub fn restart_only<T: PartialEq + fmt::Debug>(
    key: &'static str,
    old: &T,
    new: &T,
    out: &mut Vec<RestartOnly>,
) {
    if old != new {
        out.push(RestartOnly {
            key,
            old: format!("{old:?}"),
            new: format!("{new:?}"),
        });
    }
}

/// Builds the plan from the parts the scheduler applies live.
pub fn plan<W: PartialEq, B: PartialEq, L: PartialEq>(
    workers: (&BTreeMap<String, W>, &BTreeMap<String, W>),
    builders: (&BTreeMap<String, B>, &BTreeMap<String, B>),
    locks: (&BTreeMap<String, L>, &BTreeMap<String, L>),
    settings: Vec<String>,
) -> ReconfigPlan {
    ReconfigPlan {
        workers: NamedDiff::between(named(workers.0), named(workers.1)),
        builders: NamedDiff::between(named(builders.0), named(builders.1)),
        locks: NamedDiff::between(named(locks.0), named(locks.1)),
        settings,
    }
}

/// A map keyed by `String` as `(&str, &T)` pairs.
pub fn named<T>(map: &BTreeMap<String, T>) -> impl Iterator<Item = (&str, &T)> {
    map.iter().map(|(k, v)| (k.as_str(), v))
}

/// The config the master runs with now, shared by the connection handler
/// and the API; replaced as a whole by a reconfig.
#[derive(Clone)]
pub struct LiveConfig {
    current: Arc<RwLock<Arc<MasterConfig>>>,
    /// One reconfig at a time.
    reloading: Arc<tokio::sync::Mutex<()>>,
    /// Bumped on every replacement; triggers wait on it to re-plan.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl LiveConfig {
    pub fn new(config: Arc<MasterConfig>) -> LiveConfig {
        LiveConfig {
            current: Arc::new(RwLock::new(config)),
            reloading: Arc::new(tokio::sync::Mutex::new(())),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Wakes (`changed()`) whenever the config in force is replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The config in force.
    pub fn get(&self) -> Arc<MasterConfig> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    fn set(&self, config: Arc<MasterConfig>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = config;
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// Checks a new config against the running one: refused when it changes a
/// setting only a restart can change; otherwise the plan.
pub fn check(old: &MasterConfig, new: &MasterConfig) -> Result<ReconfigPlan, ReconfigRefused> {
    let mut restart = Vec::new();
    restart_only("listen", &old.listen, &new.listen, &mut restart);
    restart_only("data_dir", &old.data_dir, &new.data_dir, &mut restart);
    restart_only("tls", &old.tls, &new.tls, &mut restart);
    restart_only("max_agents", &old.max_agents, &new.max_agents, &mut restart);
    restart_only(
        "admin_token_sha256",
        &old.admin_token_sha256,
        &new.admin_token_sha256,
        &mut restart,
    );
    if !restart.is_empty() {
        return Err(ReconfigRefused::NeedsRestart(restart));
    }
    let by_name =
        |items: Vec<(String, String)>| -> BTreeMap<String, String> { items.into_iter().collect() };
    let workers = |c: &MasterConfig| {
        by_name(
            c.workers
                .iter()
                .map(|w| (w.name.clone(), format!("{w:?}")))
                .collect(),
        )
    };
    let builders = |c: &MasterConfig| {
        by_name(
            c.builders
                .iter()
                .map(|b| (b.name.clone(), format!("{b:?}")))
                .collect(),
        )
    };
    let locks = |c: &MasterConfig| {
        by_name(
            c.locks
                .iter()
                .map(|l| (l.name.clone(), format!("{l:?}")))
                .collect(),
        )
    };
    let mut settings = Vec::new();
    if old.max_starting != new.max_starting {
        settings.push(format!(
            "max_starting: {} -> {}",
            old.max_starting, new.max_starting
        ));
    }
    if old.missing_timeout != new.missing_timeout {
        settings.push(format!(
            "missing_timeout: {}s -> {}s",
            old.missing_timeout.as_secs(),
            new.missing_timeout.as_secs()
        ));
    }
    if old.artifacts != new.artifacts {
        settings.push(format!(
            "artifacts: {:?} -> {:?}",
            old.artifacts, new.artifacts
        ));
    }
    if old.dashboard != new.dashboard {
        settings.push(format!(
            "dashboard: {} -> {}",
            old.dashboard.as_str(),
            new.dashboard.as_str()
        ));
    }
    // Groups apply live (members, max_builds, schedule): named when changed.
    let groups: Vec<&str> = new
        .worker_groups
        .iter()
        .filter(|g| old.worker_group(&g.name) != Some(*g))
        .chain(
            old.worker_groups
                .iter()
                .filter(|g| new.worker_group(&g.name).is_none()),
        )
        .map(|g| g.name.as_str())
        .collect();
    if !groups.is_empty() {
        settings.push(format!("worker groups: {}", groups.join(", ")));
    }
    Ok(plan(
        (&workers(old), &workers(new)),
        (&builders(old), &builders(new)),
        (&locks(old), &locks(new)),
        settings,
    ))
}

/// `master reconfig` and SIGHUP: reads `master.toml` again, validates it
/// whole, checks it against the running one, and hands it to the scheduler,
/// which applies it without interrupting running builds. Returns one line
/// per change; a refusal changes nothing.
pub async fn reload(
    live: &LiveConfig,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Vec<String>, ReconfigRefused> {
    let _one_at_a_time = live.reloading.lock().await;
    let old = live.get();
    if old.source.to_string_lossy().starts_with('<') {
        return Err(ReconfigRefused::Invalid(vec![format!(
            "the master runs on the {}; there is no master.toml to reload",
            old.source.display()
        )]));
    }
    let new = match MasterConfig::load(&old.source) {
        Ok(config) => Arc::new(config),
        Err(error) => {
            return Err(ReconfigRefused::Invalid(
                error.to_string().lines().map(str::to_owned).collect(),
            ));
        }
    };
    let plan = check(&old, &new)?;
    let (reply, applied) = oneshot::channel();
    live.set(Arc::clone(&new));
    if events.send(Event::Reconfig { config: new, reply }).is_err() || applied.await.is_err() {
        live.set(old);
        return Err(ReconfigRefused::Invalid(vec![
            "the scheduler is not running".into(),
        ]));
    }
    let summary = plan.summary();
    tracing::info!("reconfig applied: {}", summary.join("; "));
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn diff_names_added_changed_and_removed() {
        let old = map(&[("a", 1), ("b", 2), ("c", 3)]);
        let new = map(&[("a", 1), ("b", 20), ("d", 4)]);
        let diff = NamedDiff::between(named(&old), named(&new));
        assert_eq!(diff.added, vec!["d"]);
        assert_eq!(diff.changed, vec!["b"]);
        assert_eq!(diff.removed, vec!["c"]);
        assert!(NamedDiff::between(named(&old), named(&old)).is_empty());
    }

    #[test]
    fn plan_summary_lists_every_change_or_says_none() {
        let w_old = map(&[("w1", 1)]);
        let w_new = map(&[("w1", 1), ("w2", 1)]);
        let b_old = map(&[("compile", 1)]);
        let b_new = map(&[("compile", 2)]);
        let l = map(&[]);
        let plan = plan(
            (&w_old, &w_new),
            (&b_old, &b_new),
            (&l, &l),
            vec!["max_starting: 2 -> 3".into()],
        );
        assert_eq!(
            plan.summary(),
            vec![
                "workers added: w2",
                "builders changed: compile",
                "max_starting: 2 -> 3"
            ]
        );
        let none = super::plan((&w_old, &w_old), (&b_old, &b_old), (&l, &l), vec![]);
        assert!(none.is_empty());
        assert_eq!(none.summary(), vec!["no changes"]);
    }

    fn config(text: &str) -> MasterConfig {
        let hash = "a".repeat(64);
        let text = text.replace("HASH", &hash);
        MasterConfig::parse(
            &text,
            std::path::Path::new("master.toml"),
            std::path::Path::new("/tmp"),
        )
        .expect("a valid test config")
    }

    const BASE: &str = r#"
listen = "127.0.0.1:7000"
data_dir = "data"
[[lock]]
name = "db"
scope = "master"
max_count = 1
[[worker]]
name = "w1"
token_sha256 = "HASH"
[[builder]]
name = "app"
workers = ["w1"]
steps = [{ name = "s", command = "true" }]
"#;

    #[test]
    fn check_plans_builder_worker_and_lock_changes() {
        let old = config(BASE);
        let new = config(
            &BASE
                .replace("command = \"true\"", "command = \"make\"")
                .replace("max_count = 1", "max_count = 2")
                .replace(
                    "data_dir = \"data\"",
                    "data_dir = \"data\"\nmax_starting = 3",
                )
                .replace(
                    "[[worker]]\nname = \"w1\"",
                    "[[worker]]\nname = \"w2\"\ntoken_sha256 = \"HASH\"\n[[worker]]\nname = \"w1\"",
                ),
        );
        let plan = check(&old, &new).unwrap();
        assert_eq!(plan.builders.changed, vec!["app"]);
        assert_eq!(plan.workers.added, vec!["w2"]);
        assert_eq!(plan.locks.changed, vec!["db"]);
        assert_eq!(plan.settings, vec!["max_starting: 2 -> 3"]);
        assert!(check(&old, &old).unwrap().is_empty());
    }

    #[test]
    fn the_dashboard_setting_changes_live() {
        let old = config(BASE);
        let new = config(&BASE.replace(
            "data_dir = \"data\"",
            "data_dir = \"data\"\ndashboard = \"public\"",
        ));
        let plan = check(&old, &new).unwrap();
        assert_eq!(plan.settings, vec!["dashboard: login -> public"]);
    }

    #[test]
    fn check_refuses_restart_only_settings() {
        let old = config(BASE);
        let new = config(
            &BASE
                .replace("7000", "7001")
                .replace("data_dir = \"data\"", "data_dir = \"elsewhere\""),
        );
        match check(&old, &new) {
            Err(ReconfigRefused::NeedsRestart(keys)) => {
                let names: Vec<&str> = keys.iter().map(|k| k.key).collect();
                assert_eq!(names, vec!["listen", "data_dir"]);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refusals_name_every_error_or_key() {
        let invalid = ReconfigRefused::Invalid(vec![
            "master.toml:3: key `max_count`: must be at least 1".into(),
            "master.toml:9: builder `x` uses unknown lock `y`".into(),
        ]);
        assert_eq!(
            invalid.to_string(),
            "new config refused, the running one stays:\n  master.toml:3: key `max_count`: must be at least 1\n  master.toml:9: builder `x` uses unknown lock `y`"
        );
        let mut keys = Vec::new();
        restart_only("data_dir", &"/a", &"/b", &mut keys);
        restart_only("listen", &"x", &"x", &mut keys);
        assert_eq!(keys.len(), 1);
        assert_eq!(
            ReconfigRefused::NeedsRestart(keys).to_string(),
            "new config refused, the running one stays: these settings change only with a restart:\n  data_dir: \"/a\" -> \"/b\""
        );
    }
}
