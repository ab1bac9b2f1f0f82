//! The owner's manual state, persisted in `state_dir/manual.json` so it
//! survives an agent restart.

use std::path::{Path, PathBuf};

use jiff::Timestamp;

use super::files::write_atomic;
use nightshift_policy::ManualOverride;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("manual.json")
}

/// Reads the persisted manual state. A state whose `until` has passed is
/// gone (and its file removed). An unreadable file is an error naming it.
pub fn load(state_dir: &Path, now: Timestamp) -> Result<Option<ManualOverride>, String> {
    let path = path(state_dir);
    let bytes = match fs_err::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.to_string()),
    };
    let manual: ManualOverride =
        serde_json::from_slice(&bytes).map_err(|error| format!("{}: {error}", path.display()))?;
    if manual.until.is_some_and(|until| until <= now) {
        let _ = fs_err::remove_file(&path);
        return Ok(None);
    }
    Ok(Some(manual))
}

/// Persists the manual state (`None` removes it: back to automatic).
pub fn save(state_dir: &Path, manual: Option<&ManualOverride>) -> std::io::Result<()> {
    let path = path(state_dir);
    match manual {
        Some(manual) => {
            let json = serde_json::to_vec_pretty(manual).map_err(std::io::Error::other)?;
            write_atomic(&path, &json)
        }
        None => match fs_err::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_policy::PresenceState;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_saved_state_loads_back_until_it_expires() {
        let state = tempfile::tempdir().unwrap();
        let manual = ManualOverride {
            state: PresenceState::Away,
            reason: Some("gaming".into()),
            set_at: at("2026-11-23T12:00:00Z"),
            until: Some(at("2026-11-23T19:00:00Z")),
        };
        save(state.path(), Some(&manual)).unwrap();
        assert_eq!(
            load(state.path(), at("2026-11-23T18:59:59Z")).unwrap(),
            Some(manual)
        );
        assert_eq!(
            load(state.path(), at("2026-11-23T19:00:00Z")).unwrap(),
            None
        );
        assert!(!path(state.path()).exists());
    }

    #[test]
    fn auto_removes_the_file_and_a_corrupt_file_is_an_error() {
        let state = tempfile::tempdir().unwrap();
        save(state.path(), None).unwrap();
        fs_err::write(path(state.path()), b"[]").unwrap();
        let error = load(state.path(), at("2026-11-23T00:00:00Z")).unwrap_err();
        assert!(error.contains("manual.json"), "{error}");
        save(state.path(), None).unwrap();
        assert_eq!(
            load(state.path(), at("2026-11-23T00:00:00Z")).unwrap(),
            None
        );
    }
}
