//! What every HTTP handler shares: [`AppState`] (the config in force, the
//! store, the scheduler's inboxes and the subsystems' handles) and the admin
//! token check made against it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::FromRef;
use axum::http::HeaderMap;
use nightshift_proto::secret::constant_time_eq;
use tokio::sync::mpsc;

use crate::auth::{bearer, token_sha256};
use crate::scheduler::Event;
use crate::store::Store;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The config in force (replaced whole by a reconfig).
    pub config: crate::reconfig::LiveConfig,
    pub store: Store,
    pub events: mpsc::UnboundedSender<Event>,
    /// The bounded inbox of agent connection events (connect, frames,
    /// disconnect), in order per connection.
    pub agent_events: mpsc::Sender<Event>,
    /// Lowercase hex SHA-256 of the admin token.
    pub admin_token_sha256: String,
    /// Source of agent connection ids.
    pub next_conn: Arc<AtomicU64>,
    /// Tokens of the latent instances the scheduler started.
    pub latent_tokens: crate::latent::LatentTokens,
    /// Agent sessions open, against `max_agents`.
    pub agent_slots: Arc<crate::connection_limits::ConnectionGate>,
    /// What webhooks, polling and timed builds did.
    pub trigger_counters: Arc<crate::triggers::TriggerCounters>,
    /// Builds' stored artifacts.
    pub artifacts: Arc<crate::artifacts::Artifacts>,
    /// Workers enrolled through a `[[worker_group]]` (hashed tokens).
    pub enrolled: crate::worker_groups::Enrolled,
    /// Dashboard logins.
    pub sessions: Arc<crate::logins::Sessions>,
    /// The enrolment endpoint's rate limit.
    pub enrol_limiter: Arc<crate::worker_groups::EnrolLimiter>,
}

/// Whether `token` is the admin token (compared by hash, in constant time).
pub fn is_admin_token(state: &AppState, token: &str) -> bool {
    constant_time_eq(
        token_sha256(token).as_bytes(),
        state.admin_token_sha256.as_bytes(),
    )
}

/// Whether the request carries the admin token as its bearer token.
pub fn is_admin(state: &AppState, headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|token| is_admin_token(state, &token))
}

impl FromRef<AppState> for crate::artifacts::ArtifactAccess {
    fn from_ref(state: &AppState) -> Self {
        crate::artifacts::ArtifactAccess {
            artifacts: Arc::clone(&state.artifacts),
            config: state.config.clone(),
            latent_tokens: state.latent_tokens.clone(),
        }
    }
}
