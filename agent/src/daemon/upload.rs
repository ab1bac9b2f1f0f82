//! The artifact upload step: finds the files matching the builder's
//! `artifacts` patterns in the build directory, checks them against the
//! master's caps, and uploads each to the master (streamed HTTPS `PUT` with
//! the worker's token and the file's SHA-256, which the master verifies).
//! Its progress and any refusal are written into the step's log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightshift_proto::api::ApiClient;
use nightshift_proto::wire::{ArtifactUpload, BuildId, Outcome, check_artifact_name};
use tokio::sync::{mpsc, watch};

use super::runner::{Log, RunnerEvent, StepEnd};

/// Attempts per file when the master cannot be reached or fails (5xx);
/// a refusal (4xx) is final.
const ATTEMPTS: u32 = 3;
/// Pause before the second attempt; doubled for each further one.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the step borrows from its build.
pub(super) struct UploadContext<'a> {
    pub(super) build_id: BuildId,
    pub(super) step: u32,
    pub(super) client: Option<ApiClient>,
    pub(super) cancel: &'a mut watch::Receiver<Option<String>>,
    pub(super) events: &'a mpsc::Sender<RunnerEvent>,
    pub(super) log: &'a mut Log,
}

impl UploadContext<'_> {
    fn note(&mut self, text: &str) {
        let line = format!("nightshift: {text}\n");
        self.log.push(&line);
        // A handful of lines per upload, without credit; if the bounded
        // queue to the loop is full the line is still in the result's log.
        let _ = self.events.try_send(RunnerEvent::Output {
            build_id: self.build_id,
            step: self.step,
            data: line,
            credit: super::outgoing::Credit::none(),
        });
    }

    fn fail(&mut self, reason: String) -> StepEnd {
        self.note(&reason);
        StepEnd {
            outcome: Outcome::Failure,
            exit_code: None,
            signal: None,
            reason: Some(reason),
        }
    }

    fn cancelled(&self) -> Option<String> {
        self.cancel.borrow().clone()
    }
}

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its path relative to the build directory, `/`-separated.
    pub name: String,
    pub path: PathBuf,
}

/// The files matching `patterns` under `build_dir`, by name, plus warnings
/// (a pattern matching nothing, a match skipped and why). A symbolic link
/// is followed only to a file inside the build directory.
pub fn find(build_dir: &Path, patterns: &[String]) -> Result<(Vec<Found>, Vec<String>), String> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let root = fs_err::canonicalize(build_dir).map_err(|e| format!("artifacts: {e}"))?;
    let base = glob::Pattern::escape(&root.to_string_lossy());
    let mut found = BTreeMap::new();
    let mut warnings = Vec::new();
    for pattern in patterns {
        if pattern.starts_with('/') || pattern.split('/').any(|part| part == "..") {
            return Err(format!(
                "artifact pattern `{pattern}` leaves the build directory"
            ));
        }
        let paths = glob::glob_with(&format!("{base}/{pattern}"), options)
            .map_err(|e| format!("artifact pattern `{pattern}` is not a valid glob: {e}"))?;
        let mut matched = 0;
        for entry in paths {
            let path = match entry {
                Ok(path) => path,
                Err(e) => {
                    warnings.push(format!("artifacts: skipped {e}"));
                    continue;
                }
            };
            let Ok(relative) = path.strip_prefix(&root) else {
                continue;
            };
            let Some(name) = relative
                .to_str()
                .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
            else {
                warnings.push(format!(
                    "artifacts: skipped `{}`: its name is not UTF-8",
                    relative.display()
                ));
                continue;
            };
            let is_file = match fs_err::canonicalize(&path) {
                Ok(real) if !real.starts_with(&root) => {
                    warnings.push(format!(
                        "artifacts: skipped `{name}`: it links outside the build directory"
                    ));
                    continue;
                }
                Ok(real) => real.is_file(),
                Err(e) => {
                    warnings.push(format!("artifacts: skipped `{name}`: {e}"));
                    continue;
                }
            };
            if !is_file {
                // A directory matched by the pattern: its files are named
                // by a pattern of their own (`dist/**/*`).
                continue;
            }
            if let Err(why) = check_artifact_name(&name) {
                warnings.push(format!("artifacts: skipped: {why}"));
                continue;
            }
            matched += 1;
            found.entry(name.clone()).or_insert(Found { name, path });
        }
        if matched == 0 {
            warnings.push(format!(
                "artifacts: warning: `{pattern}` matched no file in the build directory"
            ));
        }
    }
    Ok((found.into_values().collect(), warnings))
}

/// Runs the upload step for the build in `build_dir`.
pub(super) async fn run(
    mut context: UploadContext<'_>,
    upload: &ArtifactUpload,
    build_dir: &Path,
) -> StepEnd {
    let Some(client) = context.client.clone() else {
        return context.fail("artifacts: this agent has no master to upload to".into());
    };
    let (dir, patterns) = (build_dir.to_owned(), upload.patterns.clone());
    let found = tokio::task::spawn_blocking(move || find(&dir, &patterns)).await;
    let (files, warnings) = match found {
        Ok(Ok(found)) => found,
        Ok(Err(why)) => return context.fail(why),
        Err(e) => return context.fail(format!("artifacts: looking for files failed: {e}")),
    };
    for warning in &warnings {
        context.note(warning);
    }
    let mut total = 0u64;
    let mut sent = 0usize;
    for file in files {
        if let Some(reason) = context.cancelled() {
            return StepEnd {
                outcome: Outcome::Cancelled,
                exit_code: None,
                signal: None,
                reason: Some(reason),
            };
        }
        let path = file.path.clone();
        let hashed =
            tokio::task::spawn_blocking(move || nightshift_proto::transfer::hash_file(&path)).await;
        let (size, sha256) = match hashed {
            Ok(Ok(hashed)) => hashed,
            Ok(Err(e)) => return context.fail(format!("artifact `{}`: {e}", file.name)),
            Err(e) => return context.fail(format!("artifact `{}`: {e}", file.name)),
        };
        if size > upload.max_file_bytes {
            return context.fail(format!(
                "artifact `{}` is {size} bytes, over the master's max_artifact_bytes ({}); not uploaded",
                file.name, upload.max_file_bytes
            ));
        }
        total = total.saturating_add(size);
        if total > upload.max_build_bytes {
            return context.fail(format!(
                "artifact `{}` takes this build's artifacts to {total} bytes, over the master's \
                 max_build_artifact_bytes ({}); not uploaded",
                file.name, upload.max_build_bytes
            ));
        }
        let mut attempt = 1;
        loop {
            let sending =
                client.upload_artifact(context.build_id, &file.name, &file.path, size, &sha256);
            let result = tokio::select! {
                result = sending => result,
                reason = wait_cancel(context.cancel) => {
                    return StepEnd {
                        outcome: Outcome::Cancelled,
                        exit_code: None,
                        signal: None,
                        reason: Some(reason),
                    };
                }
            };
            match result {
                Ok(()) => break,
                Err(e) if e.status.is_some_and(|s| s < 500) || attempt >= ATTEMPTS => {
                    return context.fail(format!(
                        "artifact `{}` was not stored: {}",
                        file.name, e.message
                    ));
                }
                Err(e) => {
                    let pause = RETRY_AFTER * 2u32.pow(attempt - 1);
                    context.note(&format!(
                        "artifacts: `{}`: {} (attempt {attempt} of {ATTEMPTS}; again in {} s)",
                        file.name,
                        e.message,
                        pause.as_secs()
                    ));
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
        sent += 1;
        context.note(&format!(
            "artifacts: uploaded {} ({size} bytes, sha256 {sha256})",
            file.name
        ));
    }
    context.note(&format!(
        "artifacts: {sent} file(s), {total} bytes uploaded"
    ));
    StepEnd {
        outcome: Outcome::Success,
        exit_code: None,
        signal: None,
        reason: None,
    }
}

/// Resolves with the reason once the build is cancelled.
async fn wait_cancel(cancel: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(reason) = cancel.borrow().clone() {
            return reason;
        }
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(found: &[Found]) -> Vec<&str> {
        found.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn patterns_match_files_by_their_relative_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs_err::create_dir_all(root.join("dist/sub")).expect("mkdir");
        for file in [
            "dist/a.tar.gz",
            "dist/b.tar.gz",
            "dist/notes.txt",
            "dist/sub/c.tar.gz",
        ] {
            fs_err::write(root.join(file), file).expect("write");
        }
        let patterns = ["dist/*.tar.gz".to_owned(), "dist/**/c.tar.gz".to_owned()];
        let (found, warnings) = find(root, &patterns).expect("found");
        assert_eq!(
            names(&found),
            ["dist/a.tar.gz", "dist/b.tar.gz", "dist/sub/c.tar.gz"]
        );
        assert!(warnings.is_empty(), "{warnings:?}");

        let (found, warnings) = find(root, &["out/*.zip".to_owned()]).expect("found");
        assert!(found.is_empty());
        assert!(
            warnings[0].contains("`out/*.zip` matched no file"),
            "{warnings:?}"
        );
        assert!(find(root, &["../x".to_owned()]).is_err());
        assert!(find(root, &["/etc/*".to_owned()]).is_err());
    }

    #[test]
    fn a_link_out_of_the_build_directory_is_skipped() {
        let outside = tempfile::tempdir().expect("tempdir");
        fs_err::write(outside.path().join("secret"), "s").expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        fs_err::create_dir_all(dir.path().join("dist")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("dist/key"))
            .expect("symlink");
        fs_err::write(dir.path().join("dist/ok"), "ok").expect("write");
        std::os::unix::fs::symlink(dir.path().join("dist/ok"), dir.path().join("dist/alias"))
            .expect("symlink");
        let (found, warnings) = find(dir.path(), &["dist/*".to_owned()]).expect("found");
        assert_eq!(names(&found), ["dist/alias", "dist/ok"]);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("`dist/key`: it links outside")),
            "{warnings:?}"
        );
    }
}
