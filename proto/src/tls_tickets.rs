//! TLS session tickets whose key survives a master restart: a rustls
//! [`ProducesTickets`] that seals tickets with a key kept in the data
//! directory (mode 0600) and rotated every [`ROTATE_EVERY_SECS`], so agents
//! reconnecting after a restart resume (TLS 1.3 PSK with a fresh ECDHE)
//! instead of paying for a full handshake each.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use fs_err as fs;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use sha2::{Digest, Sha256};

use crate::clock::Clock;

/// File name of the ticket keys inside `data_dir/tls/`.
pub const TICKET_KEYS_FILE: &str = "ticket.keys";
/// A ticket key seals new tickets for this long, then only opens them for
/// as long again, then is forgotten: a ticket is good for at least this long
/// and at most twice that, and a stolen key opens no ticket older than that.
pub const ROTATE_EVERY_SECS: i64 = 6 * 3600;
/// Bytes in front of a ticket's ciphertext: which key sealed it.
const KEY_ID_LEN: usize = 4;

/// Session tickets the master gives each connection (rustls sends 2 by
/// default): each is good for one resumption.
pub const TICKETS_PER_CONNECTION: usize = 4;

impl crate::tls::ServerTls {
    /// The same, issuing TLS session tickets sealed with the keys in
    /// `data_dir/tls/`[`TICKET_KEYS_FILE`]
    /// (made on first use, mode 0600, rotated every 6 h): an agent
    /// reconnecting after a restart resumes instead of doing a full handshake.
    pub fn with_session_tickets(
        mut self,
        data_dir: &Path,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> anyhow::Result<crate::tls::ServerTls> {
        let path = data_dir.join("tls").join(TICKET_KEYS_FILE);
        let ticketer = PersistentTicketer::load_or_create(&path, clock)?;
        let mut config = (*self.config).clone();
        config.ticketer = ticketer;
        // Each ticket resumes once, and an attempt that fails (a storm's
        // timeout) has used one: a few spare keep the next attempt resumed.
        config.send_tls13_tickets = TICKETS_PER_CONNECTION;
        self.config = Arc::new(config);
        Ok(self)
    }
}

/// One sealing key and when it was made.
struct TicketKey {
    created: i64,
    secret: [u8; 32],
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

impl TicketKey {
    fn from_secret(created: i64, secret: [u8; 32]) -> anyhow::Result<TicketKey> {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &secret)
            .map_err(|_| anyhow::anyhow!("a ticket key must be 32 bytes"))?;
        let digest = Sha256::digest(secret);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Ok(TicketKey {
            created,
            secret,
            id,
            key: LessSafeKey::new(unbound),
        })
    }

    fn generate(created: i64, rng: &SystemRandom) -> anyhow::Result<TicketKey> {
        let mut secret = [0u8; 32];
        rng.fill(&mut secret)
            .map_err(|_| anyhow::anyhow!("no randomness for a TLS ticket key"))?;
        TicketKey::from_secret(created, secret)
    }
}

/// The key that seals and the one retired before it (which still opens).
struct Keys {
    current: TicketKey,
    previous: Option<TicketKey>,
}

/// Seals and opens TLS session tickets with keys kept in one file.
pub struct PersistentTicketer {
    path: PathBuf,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
    keys: Mutex<Keys>,
}

impl std::fmt::Debug for PersistentTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentTicketer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PersistentTicketer {
    /// The ticketer for the keys in `path`: read when the file exists
    /// (rotated if due), made otherwise; the file is (re)written, mode 0600,
    /// whenever the keys change.
    pub fn load_or_create(
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Arc<PersistentTicketer>> {
        let rng = SystemRandom::new();
        let now = clock.now().as_second();
        let keys = match fs::read_to_string(path) {
            Ok(text) => parse_keys(&text).with_context(|| {
                format!(
                    "bad TLS ticket key file {} (delete it: a new key is made, and agents do one \
                     full handshake each)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Keys {
                current: TicketKey::generate(now, &rng)?,
                previous: None,
            },
            Err(e) => return Err(e.into()),
        };
        let ticketer = PersistentTicketer {
            path: path.to_path_buf(),
            clock,
            rng,
            keys: Mutex::new(keys),
        };
        {
            let mut keys = ticketer.lock();
            ticketer.rotate_if_due(&mut keys, now)?;
            ticketer.save(&keys)?;
        }
        Ok(Arc::new(ticketer))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Retires the current key once it has sealed for [`ROTATE_EVERY_SECS`]
    /// and forgets the retired one; a key older than twice that (the master
    /// was down long) is forgotten at once. Answers whether the keys changed.
    fn rotate_if_due(&self, keys: &mut Keys, now: i64) -> anyhow::Result<bool> {
        let age = now.saturating_sub(keys.current.created);
        if (0..ROTATE_EVERY_SECS).contains(&age) {
            return Ok(false);
        }
        let fresh = TicketKey::generate(now, &self.rng)?;
        let retired = std::mem::replace(&mut keys.current, fresh);
        // A key from the future (the clock was set back) is not kept either.
        keys.previous = (0..2 * ROTATE_EVERY_SECS).contains(&age).then_some(retired);
        Ok(true)
    }

    fn save(&self, keys: &Keys) -> anyhow::Result<()> {
        let mut text = String::from(
            "# nightshift TLS session ticket keys: secret (whoever holds them can pose as \
             this master to agents holding a ticket), rotated every 6 h.\n",
        );
        for key in std::iter::once(&keys.current).chain(keys.previous.as_ref()) {
            text.push_str(&format!("{} {}\n", key.created, hex::encode(key.secret)));
        }
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        crate::tls::write_private(&self.path, text.as_bytes())
    }

    /// The keys, rotated first if due (persisted; a failed write is logged
    /// and the keys are used from memory).
    fn current_keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        let mut keys = self.lock();
        let now = self.clock.now().as_second();
        match self.rotate_if_due(&mut keys, now) {
            Ok(true) => {
                if let Err(e) = self.save(&keys) {
                    tracing::warn!("cannot save the rotated TLS ticket key: {e:#}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot rotate the TLS ticket key: {e:#}"),
        }
        keys
    }
}

fn parse_keys(text: &str) -> anyhow::Result<Keys> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("line {}", index + 1);
        let (created, secret) = line
            .split_once(' ')
            .with_context(|| format!("{}: expected `<unix seconds> <64 hex digits>`", at()))?;
        let created: i64 = created
            .parse()
            .with_context(|| format!("{}: `{created}` is not a time in unix seconds", at()))?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(secret.trim(), &mut bytes)
            .with_context(|| format!("{}: the key is not 64 hex digits", at()))?;
        found.push(TicketKey::from_secret(created, bytes)?);
    }
    let mut found = found.into_iter();
    let Some(current) = found.next() else {
        bail!("it holds no key");
    };
    let previous = found.next();
    if found.next().is_some() {
        bail!("it holds more than two keys (the current one and the one before it)");
    }
    Ok(Keys { current, previous })
}

impl ProducesTickets for PersistentTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(ROTATE_EVERY_SECS).unwrap_or(u32::MAX)
    }

    /// `key id ‖ nonce ‖ ChaCha20-Poly1305(plain)`, the key id binding as
    /// associated data.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let keys = self.current_keys();
        let key = &keys.current;
        let mut ticket = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + plain.len() + 16);
        ticket.extend_from_slice(&key.id);
        ticket.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                &mut sealed,
            )
            .ok()?;
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = cipher.split_at_checked(KEY_ID_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let keys = self.current_keys();
        let key = std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .find(|key| key.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut opened = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(key.id), &mut opened)
            .ok()?;
        let len = plain.len();
        opened.truncate(len);
        Some(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    /// A clock the test moves by hand.
    struct HandClock(Mutex<Timestamp>);

    impl Clock for HandClock {
        fn now(&self) -> Timestamp {
            *self.0.lock().unwrap()
        }
    }

    impl HandClock {
        fn at(when: &str) -> Arc<HandClock> {
            Arc::new(HandClock(Mutex::new(when.parse().unwrap())))
        }
        fn advance_secs(&self, secs: i64) {
            let mut now = self.0.lock().unwrap();
            *now = now
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .unwrap();
        }
    }

    #[test]
    fn a_ticket_sealed_before_a_restart_opens_after_it_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls").join(TICKET_KEYS_FILE);
        let clock = HandClock::at("2026-11-30T19:00:00Z");
        let before = PersistentTicketer::load_or_create(&path, clock.clone()).unwrap();
        let ticket = before.encrypt(b"resumption secret").unwrap();
        assert_ne!(&ticket[KEY_ID_LEN + NONCE_LEN..], b"resumption secret");
        drop(before);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let after = PersistentTicketer::load_or_create(&path, clock).unwrap();
        assert_eq!(after.decrypt(&ticket).unwrap(), b"resumption secret");
    }

    #[test]
    fn tampered_truncated_or_foreign_tickets_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let clock = HandClock::at("2026-11-30T19:00:00Z");
        let ticketer =
            PersistentTicketer::load_or_create(&dir.path().join("a"), clock.clone()).unwrap();
        let other = PersistentTicketer::load_or_create(&dir.path().join("b"), clock).unwrap();
        let ticket = ticketer.encrypt(b"secret").unwrap();
        for cut in 0..ticket.len() {
            assert!(ticketer.decrypt(&ticket[..cut]).is_none(), "cut at {cut}");
        }
        for at in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[at] ^= 0x01;
            assert!(ticketer.decrypt(&bad).is_none(), "bit flipped at {at}");
        }
        assert!(other.decrypt(&ticket).is_none());
    }

    #[test]
    fn keys_rotate_every_six_hours_and_a_ticket_lives_one_rotation_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TICKET_KEYS_FILE);
        // Just before midnight: the rotation falls across the date change.
        let clock = HandClock::at("2026-11-30T23:59:59Z");
        let ticketer = PersistentTicketer::load_or_create(&path, clock.clone()).unwrap();
        let old = ticketer.encrypt(b"old").unwrap();
        let first_file = fs::read_to_string(&path).unwrap();

        clock.advance_secs(ROTATE_EVERY_SECS - 1);
        let same_key = ticketer.encrypt(b"same").unwrap();
        assert_eq!(same_key[..KEY_ID_LEN], old[..KEY_ID_LEN]);
        assert_eq!(fs::read_to_string(&path).unwrap(), first_file);

        clock.advance_secs(1);
        let new = ticketer.encrypt(b"new").unwrap();
        assert_ne!(new[..KEY_ID_LEN], old[..KEY_ID_LEN], "rotated at 6 h");
        assert_eq!(
            ticketer.decrypt(&old).unwrap(),
            b"old",
            "the retired key still opens"
        );
        let rotated_file = fs::read_to_string(&path).unwrap();
        assert_ne!(rotated_file, first_file, "the rotation is saved");
        // A restart now keeps both keys.
        let restarted = PersistentTicketer::load_or_create(&path, clock.clone()).unwrap();
        assert_eq!(restarted.decrypt(&old).unwrap(), b"old");
        assert_eq!(restarted.decrypt(&new).unwrap(), b"new");

        clock.advance_secs(ROTATE_EVERY_SECS);
        assert!(
            ticketer.decrypt(&old).is_none(),
            "forgotten after two rotations"
        );
        assert_eq!(ticketer.decrypt(&new).unwrap(), b"new");
    }

    #[test]
    fn a_master_down_for_long_starts_with_a_fresh_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TICKET_KEYS_FILE);
        let clock = HandClock::at("2026-11-30T12:00:00Z");
        let ticket = PersistentTicketer::load_or_create(&path, clock.clone())
            .unwrap()
            .encrypt(b"x")
            .unwrap();
        clock.advance_secs(2 * ROTATE_EVERY_SECS);
        let restarted = PersistentTicketer::load_or_create(&path, clock).unwrap();
        assert!(restarted.decrypt(&ticket).is_none());
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 1);
    }

    #[test]
    fn a_bad_key_file_is_named_with_its_line_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TICKET_KEYS_FILE);
        let clock = HandClock::at("2026-11-30T12:00:00Z");
        for (text, expect) in [
            ("", "holds no key"),
            ("# only a comment\n", "holds no key"),
            ("123 abc\n", "line 1: the key is not 64 hex digits"),
            ("\nsoon 00\n", "line 2: `soon` is not a time"),
            ("justone\n", "line 1: expected"),
        ] {
            fs::write(&path, text).unwrap();
            let err = format!(
                "{:#}",
                PersistentTicketer::load_or_create(&path, clock.clone()).unwrap_err()
            );
            assert!(err.contains(TICKET_KEYS_FILE), "{err}");
            assert!(err.contains(expect), "{text:?}: {err}");
            assert_eq!(fs::read_to_string(&path).unwrap(), text, "left as it was");
        }
    }
}
