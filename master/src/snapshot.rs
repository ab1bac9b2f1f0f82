//! The scheduler's read-only answers, shared by the scheduler that builds
//! them (`scheduler/snapshot.rs`) and the API, dashboard and `/metrics` that
//! show them: the whole [`Snapshot`] and the [`BuildWaits`] overlaid on
//! stored builds.

use std::collections::BTreeMap;

use nightshift_proto::api::WorkerList;
use nightshift_proto::wire::BuildId;

/// A read-only view for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub workers: WorkerList,
    /// What each queued build waits for.
    pub waiting_for: BTreeMap<BuildId, String>,
    /// Each builder's estimated build duration, where known.
    pub estimates: BTreeMap<String, jiff::SignedDuration>,
    /// Builds handed out, with their worker.
    pub running: BTreeMap<BuildId, String>,
}

/// What the API overlays on stored builds that are not finished: why each
/// waits, and every builder's estimated duration (O(builders), not workers).
#[derive(Debug, Clone, Default)]
pub struct BuildWaits {
    pub waiting_for: BTreeMap<BuildId, String>,
    pub estimates: BTreeMap<String, jiff::SignedDuration>,
}
