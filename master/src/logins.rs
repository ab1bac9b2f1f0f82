//! The server side of dashboard logins: sessions held in memory, keyed by
//! the SHA-256 of their id, bounded in number, each expiring and carrying
//! its own CSRF token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::token_sha256;

/// Most sessions kept at once; a login beyond it ends the session that
/// would expire first.
pub const MAX_SESSIONS: usize = 64;
/// How long a login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// One logged-in browser.
#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    expires: Instant,
}

/// The server side of every login, keyed by the SHA-256 of the session id
/// (the id itself is only in the browser's cookie).
#[derive(Debug, Default)]
pub struct Sessions {
    by_id_hash: Mutex<HashMap<String, Session>>,
}

/// A new session's cookie value and CSRF token.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub csrf: String,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// Opens a session at `now`: drops expired ones and, when
    /// [`MAX_SESSIONS`] are still open, the one that would expire first.
    pub fn create(&self, now: Instant) -> NewSession {
        let session = NewSession {
            id: random_hex(),
            csrf: random_hex(),
        };
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            token_sha256(&session.id),
            Session {
                csrf: session.csrf.clone(),
                expires: now + SESSION_LIFETIME,
            },
        );
        session
    }

    /// The CSRF token of the live session `id`, if there is one.
    pub fn csrf_of(&self, id: &str, now: Instant) -> Option<String> {
        let key = token_sha256(id);
        let mut map = self.lock();
        match map.get(&key) {
            Some(session) if session.expires > now => Some(session.csrf.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id` (logout).
    pub fn remove(&self, id: &str) {
        self.lock().remove(&token_sha256(id));
    }

    /// Sessions held now (expired ones included until the next login).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id_hash
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_stay_bounded() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let first = sessions.create(t0);
        assert_eq!(
            sessions.csrf_of(&first.id, t0).as_deref(),
            Some(first.csrf.as_str())
        );
        assert_ne!(first.id, first.csrf);
        assert_eq!(first.id.len(), 64);
        assert_eq!(sessions.csrf_of("nope", t0), None);
        // Expired at its lifetime.
        assert_eq!(sessions.csrf_of(&first.id, t0 + SESSION_LIFETIME), None);
        assert_eq!(sessions.len(), 0, "an expired session is dropped when seen");

        let mut ids = Vec::new();
        for i in 0..(MAX_SESSIONS as u64 + 5) {
            ids.push(sessions.create(t0 + Duration::from_secs(i)).id);
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        let now = t0 + Duration::from_secs(100);
        // The oldest five made room for the newest.
        for id in &ids[..5] {
            assert_eq!(sessions.csrf_of(id, now), None);
        }
        for id in &ids[5..] {
            assert!(sessions.csrf_of(id, now).is_some());
        }
        sessions.remove(&ids[10]);
        assert_eq!(sessions.csrf_of(&ids[10], now), None);
    }
}
