//! `[agent_limits]` of `master.toml`: how fast one agent connection may send
//! frames and how many frames the master queues for it, checked.

use nightshift_proto::diag::ConfigErrors;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgentLimits {
    frames_per_second: Option<u32>,
    frame_burst: Option<u32>,
    control_frames_per_second: Option<u32>,
    control_frame_burst: Option<u32>,
    outbox_frames: Option<u32>,
}

/// The per-connection limits on agents (`[agent_limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    /// Frames per second one agent may send, sustained; beyond that the
    /// master reads its frames more slowly (TCP pushes back on the agent).
    pub frames_per_second: u32,
    /// Frames an agent may send in a burst before the sustained rate applies.
    pub frame_burst: u32,
    /// Control frames (presence, step waits, accepted/refused, hello,
    /// goodbye) per second, sustained: a working agent sends a few per build.
    pub control_frames_per_second: u32,
    /// Control frames in a burst; an agent past it is disconnected.
    pub control_frame_burst: u32,
    /// Frames queued for one agent; an agent that lets its outbox fill is
    /// disconnected ("outbox full") and reconciled by its next hello.
    pub outbox_frames: u32,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            frames_per_second: 500,
            frame_burst: 1000,
            control_frames_per_second: 20,
            control_frame_burst: 100,
            outbox_frames: 1024,
        }
    }
}

/// The largest value any of the limits takes: beyond it a limit protects
/// nothing (and an outbox of more frames could hold gigabytes).
const MOST: u32 = 1_000_000;

/// Checks `[agent_limits]`; a missing key keeps its default.
pub(super) fn parse_agent_limits(
    raw: Option<&RawAgentLimits>,
    errors: &mut ConfigErrors,
) -> AgentLimits {
    let defaults = AgentLimits::default();
    let Some(raw) = raw else {
        return defaults;
    };
    let mut value = |key: &str, given: Option<u32>, default: u32, what: &str| match given {
        None => default,
        Some(n) if (1..=MOST).contains(&n) => n,
        Some(n) => {
            errors.push_at_path(
                &format!("agent_limits.{key}"),
                format!("must be from 1 to {MOST} ({what}), got {n}"),
            );
            default
        }
    };
    AgentLimits {
        frames_per_second: value(
            "frames_per_second",
            raw.frames_per_second,
            defaults.frames_per_second,
            "frames per second one agent may send",
        ),
        frame_burst: value(
            "frame_burst",
            raw.frame_burst,
            defaults.frame_burst,
            "frames one agent may send in a burst",
        ),
        control_frames_per_second: value(
            "control_frames_per_second",
            raw.control_frames_per_second,
            defaults.control_frames_per_second,
            "control frames per second one agent may send",
        ),
        control_frame_burst: value(
            "control_frame_burst",
            raw.control_frame_burst,
            defaults.control_frame_burst,
            "control frames one agent may send in a burst",
        ),
        outbox_frames: value(
            "outbox_frames",
            raw.outbox_frames,
            defaults.outbox_frames,
            "frames queued for one agent",
        ),
    }
}
