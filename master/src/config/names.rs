//! Checks of the names and values `master.toml` refers to (entry names,
//! token hashes, repository URLs, branches), and the names a file declares.

use std::collections::BTreeSet;

/// A repository URL git can fetch from, without options smuggled in.
pub(super) fn check_repo_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("empty repository URL".into());
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "`{url}` is not a repository URL (no leading `-`, spaces or control characters)"
        ));
    }
    let scheme_ok = ["https://", "http://", "ssh://", "git://", "file://"]
        .iter()
        .any(|p| url.starts_with(p));
    let scp_like = !url.contains("://") && url.contains(':') && !url.starts_with('/');
    if !(scheme_ok || scp_like || url.starts_with('/')) {
        return Err(format!(
            "`{url}` is not a repository URL: use https://, ssh://, git://, file://,              an absolute path or `user@host:path`"
        ));
    }
    Ok(())
}

/// A branch name as `git check-ref-format --branch` would accept it.
pub fn check_branch_name(branch: &str) -> Result<(), String> {
    let bad = branch.is_empty()
        || branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch
            .chars()
            .any(|c| c.is_control() || " ~^:?*[\\".contains(c));
    if bad {
        Err(format!("`{branch}` is not a valid branch name"))
    } else {
        Ok(())
    }
}

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Lowercase 64-hex-digit hash, or `None`.
pub fn normalize_hash(text: &str) -> Option<String> {
    let hash = text.trim().to_ascii_lowercase();
    (hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit())).then_some(hash)
}

/// The names the file declares, whether or not their entries are valid.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub(super) workers: BTreeSet<String>,
    /// Workers whose entry has a `latent` key (valid or not).
    pub(super) latent_workers: BTreeSet<String>,
    pub(super) locks: BTreeSet<String>,
    pub(super) builders: BTreeSet<String>,
    /// Builders whose entry has a `source` key (valid or not).
    pub(super) sourced_builders: BTreeSet<String>,
}

impl Written {
    pub(super) fn of(text: &str) -> Written {
        let mut written = Written::default();
        let Ok(table) = toml::from_str::<toml::Table>(text) else {
            return written;
        };
        let entries = |key: &str| {
            table
                .get(key)
                .and_then(toml::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(toml::Value::as_table)
                .filter_map(|entry| {
                    let name = entry.get("name")?.as_str()?.to_owned();
                    Some((name, entry))
                })
        };
        for (name, entry) in entries("worker") {
            if entry.contains_key("latent") {
                written.latent_workers.insert(name.clone());
            }
            written.workers.insert(name);
        }
        written.locks = entries("lock").map(|(name, _)| name).collect();
        for (name, entry) in entries("builder") {
            if entry.contains_key("source") {
                written.sourced_builders.insert(name.clone());
            }
            written.builders.insert(name);
        }
        written
    }
}
