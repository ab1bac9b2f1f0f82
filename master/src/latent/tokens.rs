//! The tokens of running latent instances: made at each start, checked in
//! constant time when an instance's agent connects.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use nightshift_proto::secret::constant_time_eq;
use rand::Rng;

/// The tokens of running latent instances (SHA-256, hex), shared between
/// the scheduler (which makes them at each start) and the connection
/// handler (which accepts an agent presenting one).
#[derive(Debug, Clone, Default)]
pub struct LatentTokens(Arc<RwLock<TokenTable>>);

/// Worker → token hash, and the reverse, so that an upgrade presenting a
/// token finds its worker without a scan.
#[derive(Debug, Default)]
struct TokenTable {
    by_worker: HashMap<String, String>,
    by_hash: HashMap<String, String>,
}

impl LatentTokens {
    /// Sets or clears the token `worker`'s instance may present.
    pub fn set(&self, worker: &str, token: Option<&str>) {
        let mut table = self.0.write().unwrap_or_else(|poison| poison.into_inner());
        if let Some(old) = table.by_worker.remove(worker) {
            table.by_hash.remove(&old);
        }
        if let Some(token) = token {
            let hash = sha256_hex(token);
            table.by_worker.insert(worker.to_owned(), hash.clone());
            table.by_hash.insert(hash, worker.to_owned());
        }
    }

    /// Whether `token` is the current instance token of `worker`.
    pub fn matches(&self, worker: &str, token: &str) -> bool {
        let table = self.0.read().unwrap_or_else(|poison| poison.into_inner());
        table
            .by_worker
            .get(worker)
            .is_some_and(|hash| constant_time_eq(hash.as_bytes(), sha256_hex(token).as_bytes()))
    }

    /// The worker whose current instance token hashes to `hash`, if any.
    pub fn worker_with_hash(&self, hash: &str) -> Option<String> {
        let table = self.0.read().unwrap_or_else(|poison| poison.into_inner());
        table.by_hash.get(hash).cloned()
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

pub(super) fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}
