//! The words of presence: `PresenceState`, the `Source` that decided it, and `Presence`.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whether a worker takes builds right now.
///
/// Ordered by restrictiveness: `Available < Reluctant < Away < Offline`, so
/// combining sources is `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    /// Eager for builds: gets builds first.
    Available,
    /// Builds only when no available worker can take the build.
    Reluctant,
    /// Takes no new builds; finishes what it runs.
    Away,
    /// Not connected (or not taking anything at all).
    Offline,
}

impl PresenceState {
    pub const ALL: [PresenceState; 4] = [
        PresenceState::Available,
        PresenceState::Reluctant,
        PresenceState::Away,
        PresenceState::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Available => "available",
            PresenceState::Reluctant => "reluctant",
            PresenceState::Away => "away",
            PresenceState::Offline => "offline",
        }
    }

    /// Whether a worker in this state may be handed a new build at all.
    pub fn takes_builds(self) -> bool {
        matches!(self, PresenceState::Available | PresenceState::Reluctant)
    }
}

impl fmt::Display for PresenceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a word that is not a presence state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state `{0}`, expected one of `available`, `reluctant`, `away`, `offline`")]
pub struct UnknownState(pub String);

impl FromStr for PresenceState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PresenceState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// What decided a presence. Written on the wire and in the CLI as
/// `schedule:<name>`, `load`, `manual`, `stopping`, `master` or `default`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A named schedule window.
    Schedule(String),
    /// The load thresholds.
    Load,
    /// The owner's manual choice (CLI or status page).
    Manual,
    /// A graceful stop in progress.
    Stopping,
    /// The master's side: an admin pause or a master-side schedule.
    Master,
    /// Nothing else applied: the configured default state.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Schedule(name) => write!(f, "schedule:{name}"),
            Source::Load => f.write_str("load"),
            Source::Manual => f.write_str("manual"),
            Source::Stopping => f.write_str("stopping"),
            Source::Master => f.write_str("master"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The error for a word that is not a presence source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown source `{0}`, expected `schedule:<name>`, `load`, `manual`, `stopping`, `master` or `default`"
)]
pub struct UnknownSource(pub String);

impl FromStr for Source {
    type Err = UnknownSource;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "load" => Source::Load,
            "manual" => Source::Manual,
            "stopping" => Source::Stopping,
            "master" => Source::Master,
            "default" => Source::Default,
            _ => match s.strip_prefix("schedule:") {
                Some(name) if !name.is_empty() => Source::Schedule(name.to_owned()),
                _ => return Err(UnknownSource(s.to_owned())),
            },
        })
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A worker's presence: its state, why, since when, and until when (the next
/// instant at which the evaluation can change, when known).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub state: PresenceState,
    /// Human text, e.g. `outside schedule nights (19:00–07:00)`.
    pub reason: String,
    pub source: Source,
    pub since: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

impl Presence {
    /// The presence of a worker the master cannot reach.
    pub fn offline(since: Timestamp, reason: impl Into<String>) -> Presence {
        Presence {
            state: PresenceState::Offline,
            reason: reason.into(),
            source: Source::Master,
            since,
            until: None,
        }
    }
}
