//! Output not yet sent (batched, UTF-8 safe) and the capped log a build keeps.

use super::*;

/// Output not yet sent: text decoded so far plus an incomplete UTF-8 tail.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) pending: String,
    carry: Vec<u8>,
    pub(super) due: Option<Instant>,
}

impl Batch {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(bytes);
        let mut rest = &data[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.pending.push_str(text);
                    break;
                }
                Err(error) => {
                    let valid = error.valid_up_to();
                    // SAFETY-free: `valid` bytes were just checked.
                    self.pending
                        .push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match error.error_len() {
                        Some(bad) => {
                            self.pending.push('\u{FFFD}');
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            self.carry = rest[valid..].to_vec();
                            break;
                        }
                    }
                }
            }
        }
        if !self.pending.is_empty() && self.due.is_none() {
            self.due = Some(Instant::now() + FLUSH_AFTER);
        }
    }

    pub(super) fn take(&mut self) -> Option<String> {
        self.due = None;
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }

    /// What is left at the end: bytes of an unfinished character.
    pub(super) fn finish(&mut self) -> Option<String> {
        if self.carry.is_empty() {
            None
        } else {
            let text = String::from_utf8_lossy(&self.carry).into_owned();
            self.carry.clear();
            Some(text)
        }
    }
}

/// Room kept under `max_log_bytes` for the lines saying the log is full.
const LOG_FULL_NOTE_ROOM: u64 = 512;

impl Build {
    /// What of `data` may still be sent under the master's `max_log_bytes`
    /// (less [`LOG_FULL_NOTE_ROOM`]): all of it, a part followed once by a
    /// line saying the log is full, or nothing (`None`). What is cut is
    /// counted for the result's last line.
    pub(super) fn within_log_cap(&mut self, data: String) -> Option<String> {
        let Some(cap) = self.request.max_log_bytes else {
            return Some(data);
        };
        let room = cap.saturating_sub(LOG_FULL_NOTE_ROOM);
        let sent = self.log.total() as u64;
        if self.withheld == 0 && sent + data.len() as u64 <= room {
            return Some(data);
        }
        let first = self.withheld == 0;
        let mut keep = usize::try_from(room.saturating_sub(sent))
            .unwrap_or(usize::MAX)
            .min(data.len());
        while !data.is_char_boundary(keep) {
            keep -= 1;
        }
        self.withheld += (data.len() - keep) as u64;
        if !first {
            return None;
        }
        tracing::info!(
            "build {}: its log reached max_log_bytes ({cap} bytes); later output is not sent",
            self.request.build_id
        );
        let mut kept = data[..keep].to_owned();
        kept.push_str(&format!(
            "\n[nightshift: this build's log reached max_log_bytes ({cap} bytes): later \
             output is not sent to the master; the steps run on]\n"
        ));
        Some(kept)
    }
}

/// The build's log: everything, or its tail when it grows past the limit.
#[derive(Default)]
pub(in crate::daemon) struct Log {
    text: String,
    dropped: usize,
}

impl Log {
    pub(in crate::daemon) fn push(&mut self, data: &str) {
        self.text.push_str(data);
        if self.text.len() > LOG_LIMIT {
            let mut cut = self.text.len() - LOG_LIMIT * 3 / 4;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.text.drain(..cut);
            self.dropped += cut;
        }
    }

    /// Bytes pushed so far (kept or not).
    fn total(&self) -> usize {
        self.text.len() + self.dropped
    }

    pub(super) fn finish(self) -> String {
        if self.dropped == 0 {
            self.text
        } else {
            format!(
                "[nightshift: {} bytes of earlier output are not in this log; they were streamed live]\n{}",
                self.dropped, self.text
            )
        }
    }
}
