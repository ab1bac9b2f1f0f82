//! `Secs`: a duration of `master.toml` as a `std::time::Duration`, written in
//! the one duration grammar of every config file and command line
//! ([`nightshift_policy::parse_duration`]: `30s`, `5m`, `1h30m`, `250ms`).
//! A bare number is refused with the fix, as in worker.toml.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `30s`, `5m`, `2h`, `1h30m` or `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Secs(pub Duration);

impl Secs {
    pub fn parse(text: &str) -> Result<Secs, String> {
        if let Ok(number) = text.trim().parse::<i64>() {
            return Err(needs_unit(number));
        }
        let duration = nightshift_policy::parse_duration(text)?;
        Ok(Secs(Duration::try_from(duration).unwrap_or_default()))
    }
}

/// The error for a duration written without a unit.
fn needs_unit(number: i64) -> String {
    format!("a duration needs a unit: write \"{number}s\", \"{number}m\" or \"{number}h\"")
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecsVisitor;
        impl serde::de::Visitor<'_> for SecsVisitor {
            type Value = Secs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"5m\" or \"1h30m\"")
            }
            fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<Secs, E> {
                Err(E::custom(needs_unit(
                    i64::try_from(number).unwrap_or(i64::MAX),
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<Secs, E> {
                if number < 0 {
                    return Err(E::custom(format!(
                        "a duration cannot be negative ({number})"
                    )));
                }
                Err(E::custom(needs_unit(number)))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secs, E> {
                Secs::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SecsVisitor)
    }
}
