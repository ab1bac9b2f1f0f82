//! A scheduler on a temporary store with a fixed clock, for the tests of the
//! scheduler's modules: connect workers, submit builds, read what was sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;
use nightshift_policy::{Presence, PresenceState, Source};
use nightshift_proto::wire::{BuildId, MasterMessage};
use tokio::sync::mpsc;

use super::{ConnId, Event, Hello, Outbound, Restored, Scheduler};
use crate::config::MasterConfig;
use crate::outbox::{OUTBOX_FRAMES, OutboxReceiver, agent_outbox};
use crate::store::Store;
use nightshift_proto::clock::FixedClock;

pub(super) const HASH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

pub(super) struct Harness {
    pub(super) scheduler: Scheduler,
    _events: mpsc::UnboundedReceiver<Event>,
    _dir: tempfile::TempDir,
    pub(super) store: Store,
    next_conn: ConnId,
}

/// master.toml text for the scheduler's tests, written piece by piece:
/// locks, workers (all with the token [`HASH`]) and builders.
#[derive(Debug, Default)]
pub(super) struct MasterToml {
    text: String,
}

impl MasterToml {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// A line of the top-level table, e.g. `missing_timeout = "60s"`.
    pub(super) fn line(mut self, line: &str) -> Self {
        self.text.push_str(line);
        self.text.push('\n');
        self
    }

    /// A `[[lock]]` of `scope` ("master" or "worker") for `max_count` holders.
    pub(super) fn lock(self, name: &str, scope: &str, max_count: u32) -> Self {
        self.line(&format!(
            "[[lock]]\nname = \"{name}\"\nscope = \"{scope}\"\nmax_count = {max_count}"
        ))
    }

    /// A `[[worker]]` that runs one build at a time.
    pub(super) fn worker(self, name: &str) -> Self {
        self.line(&format!(
            "[[worker]]\nname = \"{name}\"\ntoken_sha256 = \"{HASH}\""
        ))
    }

    /// A `[[worker]]` that runs `max_builds` at once.
    pub(super) fn worker_with_slots(self, name: &str, max_builds: u32) -> Self {
        self.worker(name)
            .line(&format!("max_builds = {max_builds}"))
    }

    /// A `[[builder]]` on `workers` with one step running `true`.
    pub(super) fn builder(self, name: &str, workers: &[&str]) -> Self {
        self.builder_with(name, workers, &[], &[&[]])
    }

    /// A `[[builder]]` on `workers` that claims `locks` (TOML inline
    /// tables such as `{ name = "db", access = "exclusive" }`) for the
    /// whole build, with one step running `true` per entry of `step_locks`,
    /// claiming those.
    pub(super) fn builder_with(
        self,
        name: &str,
        workers: &[&str],
        locks: &[&str],
        step_locks: &[&[&str]],
    ) -> Self {
        let workers: Vec<String> = workers.iter().map(|w| format!("\"{w}\"")).collect();
        let steps: Vec<String> = step_locks
            .iter()
            .enumerate()
            .map(|(k, claims)| {
                let name = if k == 0 {
                    "s".to_owned()
                } else {
                    format!("s{k}")
                };
                format!(
                    "{{ name = \"{name}\", command = \"true\", locks = [{}] }}",
                    claims.join(", ")
                )
            })
            .collect();
        self.line(&format!(
            "[[builder]]\nname = \"{name}\"\nworkers = [{}]\nlocks = [{}]\nsteps = [{}]",
            workers.join(", "),
            locks.join(", "),
            steps.join(", ")
        ))
    }

    /// The parsed config; panics with the text if it does not parse.
    pub(super) fn parse(&self) -> Arc<MasterConfig> {
        let config = MasterConfig::parse(&self.text, Path::new("master.toml"), Path::new("/tmp"))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.text));
        Arc::new(config)
    }
}

fn config(missing: &str) -> Arc<MasterConfig> {
    MasterToml::new()
        .line(&format!("missing_timeout = \"{missing}\""))
        .worker("a")
        .worker("b")
        .worker("r")
        .builder("app", &["a", "b", "r"])
        .parse()
}

pub(super) fn presence(state: PresenceState) -> Presence {
    Presence {
        state,
        reason: "test".into(),
        source: Source::Manual,
        since: Timestamp::UNIX_EPOCH,
        until: None,
    }
}

impl Harness {
    pub(super) fn new() -> Harness {
        Harness::with_config(config("60s"))
    }

    pub(super) fn with_config(config: Arc<MasterConfig>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let scheduler = Scheduler::new(
            config,
            store.clone(),
            Arc::new(FixedClock(Timestamp::UNIX_EPOCH)),
            tx,
            Restored::default(),
        );
        Harness {
            scheduler,
            _events: rx,
            _dir: dir,
            store,
            next_conn: 1,
        }
    }

    /// A master restart: a new scheduler on the same store and config,
    /// from what the store has committed (as `master run` starts one).
    pub(super) async fn restart(&mut self) {
        let unfinished = self.store.unfinished().await.unwrap();
        let grants = self.store.step_grants().await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        self.scheduler = Scheduler::new(
            Arc::clone(&self.scheduler.config),
            self.store.clone(),
            Arc::new(FixedClock(Timestamp::UNIX_EPOCH)),
            tx,
            Restored {
                unfinished,
                ..Restored::default()
            },
        );
        self.scheduler.restore_step_grants(grants);
        self._events = rx;
    }

    /// What the store has committed about build `id`: its state and worker.
    pub(super) async fn stored(
        &self,
        id: BuildId,
    ) -> (nightshift_proto::api::BuildState, Option<String>) {
        let build = self.store.get_build(id).await.unwrap().unwrap();
        (build.state, build.worker)
    }

    pub(super) fn connect(
        &mut self,
        worker: &str,
        state: PresenceState,
        running: Vec<BuildId>,
    ) -> (ConnId, OutboxReceiver) {
        self.connect_with_slots(worker, state, running, 1)
    }

    /// [`Harness::connect`] for an agent that takes `max_builds` at once.
    pub(super) fn connect_with_slots(
        &mut self,
        worker: &str,
        state: PresenceState,
        running: Vec<BuildId>,
        max_builds: u32,
    ) -> (ConnId, OutboxReceiver) {
        let (out, rx) = agent_outbox(OUTBOX_FRAMES);
        let conn = self.next_conn;
        self.next_conn += 1;
        self.scheduler.handle(Event::Connected {
            worker: worker.into(),
            conn,
            hello: Hello {
                agent_version: "test".into(),
                max_builds,
                presence: presence(state),
                running,
                outlook: None,
            },
            heartbeat_secs: nightshift_proto::wire::HEARTBEAT_SECS,
            out,
        });
        (conn, rx)
    }

    /// The store the scheduler writes to.
    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) async fn submit(&mut self) -> BuildId {
        self.submit_to("app").await
    }

    /// Submits a build of `builder`.
    pub(super) async fn submit_to(&mut self, builder: &str) -> BuildId {
        let id = self
            .store
            .insert_build(builder.into(), BTreeMap::new(), Timestamp::UNIX_EPOCH)
            .await
            .unwrap();
        self.scheduler.handle(Event::Submitted {
            id,
            builder: builder.into(),
            properties: BTreeMap::new(),
            source: None,
        });
        id
    }
}

pub(super) fn started(rx: &mut OutboxReceiver) -> Vec<BuildId> {
    let mut ids = Vec::new();
    while let Ok(out) = rx.try_recv() {
        if let Outbound::Message(MasterMessage::StartBuild { build_id, .. }) = out {
            ids.push(build_id);
        }
    }
    ids
}

pub(super) fn released(rx: &mut OutboxReceiver) -> bool {
    let mut seen = false;
    while let Ok(out) = rx.try_recv() {
        seen |= matches!(out, Outbound::Message(MasterMessage::Released { .. }));
    }
    seen
}
