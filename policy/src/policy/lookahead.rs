//! Looking ahead: a preview of the coming changes, whether a build fits, and the next available moment.

use super::*;

impl Policy {
    /// The intervals in `[from, to)` as the schedules and default alone give
    /// them: contiguous, in order, neighbours with equal state and source
    /// merged. A span with more than [`MAX_PREVIEW_CHANGES`] changes is cut
    /// there, and [`Preview::truncated_at`] says where.
    pub fn preview(&self, from: Timestamp, to: Timestamp) -> Preview {
        self.preview_limited(from, to, MAX_PREVIEW_CHANGES)
    }

    /// [`Policy::preview`] with a chosen limit on the changes followed.
    pub fn preview_limited(&self, from: Timestamp, to: Timestamp, max_changes: usize) -> Preview {
        let max_changes = max_changes.max(1);
        let mut intervals: Vec<Interval> = Vec::new();
        if from >= to {
            return Preview {
                intervals,
                truncated_at: None,
            };
        }
        // Each window's own changes in the span, merged into one timeline.
        let start = self.zoned(from);
        let mut inside: Vec<bool> = self
            .windows
            .iter()
            .map(|w| w.membership(&start).inside)
            .collect();
        let mut changes: Vec<(Timestamp, usize, bool)> = Vec::new();
        for (index, window) in self.windows.iter().enumerate() {
            changes.extend(
                window
                    .changes_between(&self.tz, from, to, inside[index], max_changes + 1)
                    .into_iter()
                    .map(|(at, open)| (at, index, open)),
            );
        }
        changes.sort_by_key(|(at, index, _)| (*at, *index));
        let mut at = from;
        let mut pending = changes.into_iter().peekable();
        let mut steps = 0;
        loop {
            while let Some((_, index, open)) = pending.next_if(|(t, _, _)| *t <= at) {
                inside[index] = open;
            }
            let (state, source) = self.verdict_of(&inside);
            let end = pending.peek().map_or(to, |(t, _, _)| *t);
            match intervals.last_mut() {
                Some(last) if last.state == state && last.source == source => last.to = end,
                _ => intervals.push(Interval {
                    from: at,
                    to: end,
                    state,
                    source,
                }),
            }
            if end >= to {
                break;
            }
            steps += 1;
            at = end;
            if steps >= max_changes {
                return Preview {
                    intervals,
                    truncated_at: Some(at),
                };
            }
        }
        Preview {
            intervals,
            truncated_at: None,
        }
    }

    /// The state and source the schedules give when `inside[i]` says which
    /// windows are open (the same choice as [`Policy::evaluate`] makes).
    fn verdict_of(&self, inside: &[bool]) -> (PresenceState, Source) {
        let mut best: Option<&Window> = None;
        for (window, _) in self.windows.iter().zip(inside).filter(|(_, open)| **open) {
            match best {
                Some(b) if b.state >= window.state => {}
                _ => best = Some(window),
            }
        }
        match best {
            Some(window) => (window.state, self.schedule_source(&window.name)),
            None => (self.default, self.default_source()),
        }
    }

    /// Whether a build of length `expected` started at `now` would end before
    /// the policies next take the worker away (load is taken as it is now).
    pub fn fits(&self, now: Timestamp, inputs: &Inputs, expected: SignedDuration) -> bool {
        if !self.presence_at(now, inputs, false).state.takes_builds() {
            return false;
        }
        let Ok(end) = now.checked_add(expected.max(SignedDuration::ZERO)) else {
            return false;
        };
        let mut at = now;
        for _ in 0..MAX_STEPS {
            let Some(next) = self.next_change(at, inputs) else {
                return true;
            };
            if next >= end {
                return true;
            }
            if !self.presence_at(next, inputs, true).state.takes_builds() {
                return false;
            }
            at = next;
        }
        false
    }

    /// When the schedules next make the worker take builds, from `now` (`now`
    /// itself if they do already), within `horizon`.
    pub fn next_available(&self, now: Timestamp, horizon: SignedDuration) -> Option<Timestamp> {
        let end = now.checked_add(horizon).ok()?;
        let mut from = now;
        loop {
            let preview = self.preview(from, end);
            if let Some(found) = preview.intervals.iter().find(|i| i.state.takes_builds()) {
                return Some(found.from);
            }
            from = preview.truncated_at?;
        }
    }
}
