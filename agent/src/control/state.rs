//! What every control-plane handler sees ([`Shared`]): the daemon handle,
//! the injected clock, the time zone, the week-ahead preview and the
//! secrets, kept apart from the listeners so handlers do not depend on them.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio_util::sync::CancellationToken;

use super::guard::Secrets;
use crate::handle::AgentHandle;

/// The wall clock, injected so tests choose the instant.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The coming intervals of the policies between two instants, for the
/// page's week-ahead timeline.
pub type PreviewFn = Arc<dyn Fn(Timestamp, Timestamp) -> Vec<PreviewInterval> + Send + Sync>;

/// One interval of the week ahead, as the policy's `preview` gives it.
pub type PreviewInterval = nightshift_policy::Interval;

/// What every handler sees.
#[derive(Clone)]
pub struct Shared {
    pub handle: AgentHandle,
    pub clock: Clock,
    pub time_zone: TimeZone,
    pub preview: Option<PreviewFn>,
    pub secrets: Secrets,
    /// Cancelled when the server shuts down; ends the live streams.
    pub shutdown: CancellationToken,
}
