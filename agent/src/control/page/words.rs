//! Words the status page uses for states, sources, reasons and counts.

use super::*;

/// The reason line's text before "since": the owner's own words for a
/// manual state (the source already says "set by you"), else the reason.
pub(super) fn reason_words(status: &AgentStatus) -> String {
    let reason = match (&status.presence.source, &status.manual) {
        (Source::Manual, Some(manual)) => {
            manual.reason.as_ref().map(|reason| format!("“{reason}”"))
        }
        (Source::Manual, None) => None,
        _ => Some(status.presence.reason.clone()),
    };
    match reason {
        Some(reason) if !reason.trim().is_empty() => format!("{} · ", escape(&reason)),
        _ => String::new(),
    }
}

/// The state in one capitalised word.
pub fn state_word(state: PresenceState) -> &'static str {
    match state {
        PresenceState::Available => "Available",
        PresenceState::Reluctant => "Reluctant",
        PresenceState::Away => "Away",
        PresenceState::Offline => "Offline",
    }
}

/// What the state means, for someone who never read the docs.
pub fn state_meaning(state: PresenceState) -> &'static str {
    match state {
        PresenceState::Available => "Happy to take builds.",
        PresenceState::Reluctant => "Takes a build only when no other computer can.",
        PresenceState::Away => "Takes no new builds. A build already running may finish.",
        PresenceState::Offline => "Not taking any builds.",
    }
}

/// Who decided, in words.
pub fn source_words(source: &Source) -> String {
    match source {
        Source::Schedule(name) => format!("schedule “{name}”"),
        Source::Load => "the computer is busy".into(),
        Source::Manual => "set by you".into(),
        Source::Stopping => "the agent is stopping".into(),
        Source::Master => "the build master".into(),
        Source::Default => "the default setting".into(),
    }
}

pub(super) fn plural(count: u64, one: &str, many: &str) -> String {
    if count == 1 {
        format!("1 {one}")
    } else {
        format!("{count} {many}")
    }
}

/// The last `max` lines of `text`, with carriage returns read as line ends.
pub(super) fn tail_lines(text: &str, max: usize) -> String {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max)..].join("\n")
}
