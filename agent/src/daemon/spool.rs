//! Build results not yet acknowledged by the master, kept on disk in
//! `state_dir/results/<id>.json` until a `ResultStored` arrives, so a build
//! that finished while the master was unreachable (or the agent restarted)
//! is still delivered.

use std::path::{Path, PathBuf};

use nightshift_proto::wire::{BuildId, BuildResult};

use super::files::write_atomic;

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens (creating if needed) the spool under `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Spool> {
        let dir = state_dir.join("results");
        fs_err::create_dir_all(&dir)?;
        Ok(Spool { dir })
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, build_id: BuildId) -> PathBuf {
        self.dir.join(format!("{build_id}.json"))
    }

    /// Writes the result durably. Call before sending it.
    pub fn store(&self, result: &BuildResult) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(result).map_err(std::io::Error::other)?;
        write_atomic(&self.path_of(result.build_id), &json)
    }

    /// Forgets an acknowledged result. A result that is not (or no longer)
    /// spooled is not an error: acknowledgements may arrive twice.
    pub fn remove(&self, build_id: BuildId) -> std::io::Result<()> {
        match fs_err::remove_file(self.path_of(build_id)) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Every spooled result, oldest build first. Files that cannot be read
    /// or parsed are renamed to `<name>.bad` (kept for the owner to look
    /// at, never re-sent) and reported in the second list.
    pub fn load_all(&self) -> (Vec<BuildResult>, Vec<String>) {
        let mut results = Vec::new();
        let mut problems = Vec::new();
        let entries = match fs_err::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) => return (results, vec![error.to_string()]),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let parsed = fs_err::read(&path)
                .map_err(|error| error.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<BuildResult>(&bytes)
                        .map_err(|error| format!("{}: {error}", path.display()))
                })
                .and_then(|result| {
                    if stem == result.build_id.to_string() {
                        Ok(result)
                    } else {
                        Err(format!(
                            "{}: holds the result of build {}, not {stem}",
                            path.display(),
                            result.build_id
                        ))
                    }
                });
            match parsed {
                Ok(result) => results.push(result),
                Err(problem) => {
                    let _ = fs_err::rename(&path, path.with_extension("json.bad"));
                    problems.push(problem);
                }
            }
        }
        results.sort_by_key(|result| result.build_id);
        (results, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use nightshift_proto::wire::Outcome;

    fn result(build_id: BuildId) -> BuildResult {
        BuildResult {
            build_id,
            outcome: Outcome::Success,
            steps: Vec::new(),
            reason: None,
            log: format!("log of {build_id}\n"),
            finished_at: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn stored_results_survive_reopening_until_removed() {
        let state = tempfile::tempdir().unwrap();
        let spool = Spool::open(state.path()).unwrap();
        spool.store(&result(12)).unwrap();
        spool.store(&result(3)).unwrap();

        let reopened = Spool::open(state.path()).unwrap();
        let (results, problems) = reopened.load_all();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(results, vec![result(3), result(12)]);

        reopened.remove(3).unwrap();
        reopened.remove(3).unwrap(); // a second acknowledgement is harmless
        let (results, _) = reopened.load_all();
        assert_eq!(results, vec![result(12)]);
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_reported_without_losing_the_others() {
        let state = tempfile::tempdir().unwrap();
        let spool = Spool::open(state.path()).unwrap();
        spool.store(&result(1)).unwrap();
        fs_err::write(spool.dir().join("2.json"), b"{ not json").unwrap();

        let (results, problems) = spool.load_all();
        assert_eq!(results, vec![result(1)]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("2.json"), "{problems:?}");
        assert!(spool.dir().join("2.json.bad").exists());
        // Set aside once, not reported again.
        assert!(spool.load_all().1.is_empty());
    }
}
