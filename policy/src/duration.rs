//! Human durations (`30s`, `2m`, `1h30m`, `2h`, `1d`) as written in config files and on the command line.

use std::fmt;

use jiff::{SignedDuration, Span, SpanRelativeTo};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parses a human duration: `30s`, `2m`, `1h30m`, `2h`, `1d`, `90 minutes`
/// (jiff's friendly format) or ISO 8601 (`PT2H`). A day is 24 hours.
/// Negative durations are rejected: every duration in nightshift is a length.
pub fn parse_duration(s: &str) -> Result<SignedDuration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration, expected e.g. `30s`, `2m`, `1h30m` or `1d`".to_owned());
    }
    let duration = match text.parse::<SignedDuration>() {
        Ok(duration) => duration,
        Err(_) => match text.parse::<Span>() {
            Ok(span) => span
                .to_duration(SpanRelativeTo::days_are_24_hours())
                .map_err(|_| invalid_duration(text))?,
            Err(_) => return Err(invalid_duration(text)),
        },
    };
    if duration.is_negative() {
        return Err(format!(
            "duration `{text}` is negative, expected a length such as `2h`"
        ));
    }
    if duration > MAX_DURATION {
        return Err(format!(
            "duration `{text}` is longer than 100 years, the longest nightshift takes"
        ));
    }
    Ok(duration)
}

/// The longest duration accepted: far past any timeout or window, and far
/// inside what instants can be shifted by without overflow.
pub const MAX_DURATION: SignedDuration = SignedDuration::from_hours(100 * 365 * 24);

fn invalid_duration(text: &str) -> String {
    format!("invalid duration `{text}`, expected e.g. `30s`, `2m`, `1h30m`, `2h` or `1d`")
}

/// Writes a duration the way [`parse_duration`] reads it back: `1h30m`, `45s`, `2d`.
pub fn format_duration(duration: SignedDuration) -> String {
    let mut secs = duration.as_secs().unsigned_abs();
    let mut out = String::new();
    if duration.is_negative() {
        out.push('-');
    }
    let mut nanos = u64::from(duration.subsec_nanos().unsigned_abs());
    if secs == 0 && nanos == 0 {
        return "0s".to_owned();
    }
    for (unit, size) in [("d", 86_400u64), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    // Below a second, exactly: `9s232ms`, `1ms500us`, `7ns`.
    for (unit, size) in [("ms", 1_000_000u64), ("us", 1_000), ("ns", 1)] {
        if nanos >= size {
            out.push_str(&format!("{}{unit}", nanos / size));
            nanos %= size;
        }
    }
    out
}

/// A duration in a config file, written as text (`"2m"`, `"1h30m"`).
/// Deserializing names the bad text in its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationSpec(pub SignedDuration);

impl DurationSpec {
    pub fn from_secs(secs: i64) -> DurationSpec {
        DurationSpec(SignedDuration::from_secs(secs))
    }

    pub fn get(self) -> SignedDuration {
        self.0
    }

    /// The duration as a `std::time::Duration` (never negative).
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::try_from(self.0).unwrap_or_default()
    }
}

impl From<DurationSpec> for SignedDuration {
    fn from(spec: DurationSpec) -> SignedDuration {
        spec.0
    }
}

impl std::str::FromStr for DurationSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(DurationSpec)
    }
}

impl fmt::Display for DurationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"2m\", \"1h30m\" or \"1d\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationSpec, E> {
                parse_duration(v).map(DurationSpec).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationSpec, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{v}s\", \"{v}m\" or \"{v}h\""
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DurationSpec, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{v}s\", \"{v}m\" or \"{v}h\""
                )))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_write() {
        let cases = [
            ("30s", 30),
            ("2m", 120),
            ("1h30m", 5400),
            ("2h", 7200),
            ("1d", 86_400),
            ("1d2h", 93_600),
            ("90 minutes", 5400),
            ("PT2H", 7200),
            (" 5m ", 300),
        ];
        for (text, secs) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(SignedDuration::from_secs(secs)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_bad_text_naming_it() {
        // "1h242949672960m" was found by the fuzzer: it printed as days that
        // jiff cannot read back, and would overflow an instant.
        for text in [
            "",
            "2 parsecs",
            "h",
            "-5m",
            "12",
            "1h242949672960m",
            "36501d",
        ] {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(text.trim()), "{error}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for secs in [0, 1, 59, 60, 3600, 5400, 86_400, 93_784] {
            let d = SignedDuration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(SignedDuration::from_secs(5400)), "1h30m");
        // Found by the fuzzer: sub-second parts above a second were dropped.
        for (nanos, text) in [
            (9_232_000_000, "9s232ms"),
            (1_500_000, "1ms500us"),
            (7, "7ns"),
            (90_061_000_000_001, "1d1h1m1s1ns"),
        ] {
            let d = SignedDuration::from_nanos(nanos);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }

    #[test]
    fn deserializes_with_error_naming_text() {
        #[derive(Deserialize)]
        struct Cfg {
            d: DurationSpec,
        }
        let cfg: Cfg = toml::from_str("d = \"1h30m\"").unwrap();
        assert_eq!(cfg.d.0, SignedDuration::from_secs(5400));
        let error = toml::from_str::<Cfg>("d = \"soon\"")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("soon"), "{error}");
        let error = toml::from_str::<Cfg>("d = 5").err().unwrap().to_string();
        assert!(error.contains("\"5s\""), "{error}");
    }
}
