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
