//! Logging setup shared by both binaries: plain `tracing` lines on stderr,
//! filtered by `NIGHTSHIFT_LOG` (or `RUST_LOG`), coloured only on a terminal.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The target of the hand-off trace: one `debug` line per stage of a build's
/// way from the submit to its first step running (`build N: <stage>`), on
/// both binaries. `NIGHTSHIFT_LOG=info,nightshift::handoff=debug` shows it;
/// `nightshift-bench --only spaced` reads it to say where the time goes.
pub const HANDOFF: &str = "nightshift::handoff";

/// The environment variables read for the filter, first match wins.
pub const FILTER_VARS: [&str; 2] = ["NIGHTSHIFT_LOG", "RUST_LOG"];

/// Parses a filter such as `info`, `warn,worker=debug` or
/// `master::scheduler=trace`: a default level and per-module levels.
pub fn parse_filter(text: &str) -> Result<Targets, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Targets::new().with_default(LevelFilter::INFO));
    }
    Targets::from_str(text).map_err(|error| format!("`{text}`: {error}"))
}

/// Installs the global subscriber. A filter that does not parse is reported
/// on stderr and replaced by `info`; logging never stops a binary.
pub fn init() {
    let (filter, complaint) = FILTER_VARS
        .iter()
        .find_map(|name| std::env::var(name).ok().map(|value| (*name, value)))
        .map_or_else(
            || (Targets::new().with_default(LevelFilter::INFO), None),
            |(name, value)| match parse_filter(&value) {
                Ok(filter) => (filter, None),
                Err(error) => (
                    Targets::new().with_default(LevelFilter::INFO),
                    Some(format!(
                        "warning: {name}={error}; logging at `info` (write e.g. `info,worker=debug`)"
                    )),
                ),
            },
        );
    if let Some(complaint) = complaint {
        eprintln!("{complaint}");
    }
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .try_init();
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn filters_parse_into_levels_per_module() {
        let check = |text: &str, target: &str, level: Level, expect: bool| {
            let filter = parse_filter(text).unwrap();
            assert_eq!(
                filter.would_enable(target, &level),
                expect,
                "{text}: {target} at {level}"
            );
        };
        check("", "worker::daemon", Level::INFO, true);
        check("", "worker::daemon", Level::DEBUG, false);
        check("warn", "master::scheduler", Level::INFO, false);
        check(
            "warn,master::scheduler=debug",
            "master::scheduler",
            Level::DEBUG,
            true,
        );
        check(
            "warn,master::scheduler=debug",
            "master::server",
            Level::INFO,
            false,
        );
        check("debug", "worker", Level::TRACE, false);
    }

    #[test]
    fn a_bad_filter_is_named() {
        let error = parse_filter("info,worker=loud").unwrap_err();
        assert!(error.contains("info,worker=loud"), "{error}");
    }
}
