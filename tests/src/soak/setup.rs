//! The soak's farm: its master.toml, whose build steps append timed lines to a shared ledger, and reading that ledger back.

use super::*;

/// Seconds since the epoch, as `date +%s.%N` prints them in the ledger.
pub(super) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A step command that appends `<build> <event> <worker dir> <time>` to the ledger.
fn ledger_line(ledger: &Path, event: &str) -> String {
    format!(
        "printf '%s %s %s %s\\n' \"$NIGHTSHIFT_BUILD_ID\" {event} \"$PWD\" \"$(date +%s.%N)\" >> {}",
        ledger.display()
    )
}

fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// The builders' configs: `workers` take every builder, `windowed` ones
/// every builder but `locked` (whose duration is mostly the wait for the
/// lock, which no estimate foresees).
pub(super) fn master_toml(ledger: &Path, workers: &[String], windowed: &[String]) -> String {
    let locked_list = workers
        .iter()
        .map(|w| toml_str(w))
        .collect::<Vec<_>>()
        .join(", ");
    let list = workers
        .iter()
        .chain(windowed)
        .map(|w| toml_str(w))
        .collect::<Vec<_>>()
        .join(", ");
    let start = toml_str(&ledger_line(ledger, "start"));
    let work = toml_str("sleep 0.0$((NIGHTSHIFT_BUILD_ID % 10))");
    let flaky =
        toml_str("sleep 0.0$((NIGHTSHIFT_BUILD_ID % 5)); exit $((NIGHTSHIFT_BUILD_ID % 4 == 0))");
    let critical = toml_str(&format!(
        "{}; sleep 0.$((NIGHTSHIFT_BUILD_ID % 3 + 1)); {}",
        ledger_line(ledger, "acquire"),
        ledger_line(ledger, "release")
    ));
    let end = toml_str(&ledger_line(ledger, "end"));
    format!(
        r#"
[[lock]]
name = "{LOCK}"
scope = "master"
max_count = 1

[[builder]]
name = "quick"
workers = [{list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "work", command = {work} }},
  {{ name = "end", command = {end} }},
]

[[builder]]
name = "flaky"
workers = [{list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "work", command = {flaky} }},
]

[[builder]]
name = "slow"
workers = [{list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "work", command = "sleep 1.$((NIGHTSHIFT_BUILD_ID % 9))" }},
  {{ name = "end", command = {end} }},
]

[[builder]]
name = "locked"
workers = [{locked_list}]
steps = [
  {{ name = "s0", command = {start} }},
  {{ name = "critical", command = {critical}, locks = [{{ name = "{LOCK}", access = "exclusive" }}] }},
  {{ name = "end", command = {end} }},
]
"#
    )
}

/// One line of the ledger.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) build: BuildId,
    pub(super) event: String,
    pub(super) worker: String,
    pub(super) at: f64,
}

pub(super) fn read_ledger(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    let mut entries = Vec::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(build), Some(event), Some(dir), Some(at)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("ledger line {line:?} is torn");
        };
        // `<farm>/workers/<name>/work/<builder>`
        let worker = Path::new(dir)
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        entries.push(Entry {
            build: build
                .parse()
                .with_context(|| format!("ledger line {line:?}"))?,
            event: event.to_owned(),
            worker,
            at: at
                .parse()
                .with_context(|| format!("ledger line {line:?}"))?,
        });
    }
    Ok(entries)
}
