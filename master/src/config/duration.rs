//! `Secs`: the duration grammar of `master.toml` (`30s`, `5m`, `1h30m`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `30s`, `5m`, `2h`, `1h30m`, `250ms` or a bare
/// number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Secs(pub Duration);

impl Secs {
    pub fn parse(text: &str) -> Result<Secs, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty duration; write e.g. `30s`, `5m`, `1h30m`".into());
        }
        if let Ok(secs) = text.parse::<u64>() {
            return Ok(Secs(Duration::from_secs(secs)));
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "bad duration `{text}`; write e.g. `30s`, `5m`, `1h30m`"
                ));
            }
            let number: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("number too large in duration `{text}`"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match rest[..unit_len].trim() {
                "ms" => Duration::from_millis(number),
                "s" => Duration::from_secs(number),
                "m" | "min" => Duration::from_secs(number.saturating_mul(60)),
                "h" => Duration::from_secs(number.saturating_mul(3600)),
                "d" => Duration::from_secs(number.saturating_mul(86400)),
                unit => {
                    return Err(format!(
                        "unknown unit `{unit}` in duration `{text}`; use ms, s, m, h or d"
                    ));
                }
            };
            total = total.saturating_add(part);
            rest = &rest[unit_len..];
        }
        Ok(Secs(total))
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecsVisitor;
        impl serde::de::Visitor<'_> for SecsVisitor {
            type Value = Secs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"30s\", \"5m\", \"1h30m\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, secs: u64) -> Result<Secs, E> {
                Ok(Secs(Duration::from_secs(secs)))
            }
            fn visit_i64<E: serde::de::Error>(self, secs: i64) -> Result<Secs, E> {
                u64::try_from(secs)
                    .map(|secs| Secs(Duration::from_secs(secs)))
                    .map_err(|_| E::custom(format!("a duration cannot be negative ({secs})")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secs, E> {
                Secs::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SecsVisitor)
    }
}
