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
    // A cancel (SIGTERM to the step's group) ends the hold too: the trap
    // writes the release once `sleep` is gone, so a cancelled hold is not
    // taken for one that lasts until the worker's next downtime.
    let critical = toml_str(&format!(
        "release() {{ {}; }}; {}; trap 'trap \"\" TERM; release; exit 143' TERM; \
         sleep 0.$((NIGHTSHIFT_BUILD_ID % 3 + 1)); release",
        ledger_line(ledger, "release"),
        ledger_line(ledger, "acquire"),
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

/// The ledger's entries, and its torn lines (a step killed while it
/// wrote: skipped, and counted in the report).
pub(super) fn read_ledger(path: &Path) -> (Vec<Entry>, Vec<String>) {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    let mut entries = Vec::new();
    let mut torn = Vec::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let parsed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(build), Some(event), Some(dir), Some(at)) => {
                match (build.parse::<BuildId>(), at.parse::<f64>()) {
                    (Ok(build), Ok(at)) => Some((build, event, dir, at)),
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((build, event, dir, at)) = parsed else {
            torn.push(line.to_owned());
            continue;
        };
        // `<farm>/workers/<name>/work/<builder>`
        let worker = Path::new(dir)
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        entries.push(Entry {
            build,
            event: event.to_owned(),
            worker,
            at,
        });
    }
    (entries, torn)
}
