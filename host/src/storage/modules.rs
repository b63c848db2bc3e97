//! Modules in the store. Replicated (written only by [`Store::apply`], so
//! every replica holds the same): the chunks of every module uploaded through
//! the log, by content hash; each upload's progress record; each state
//! machine's version records; which version each state machine runs. Local
//! to this member (never replicated): compiled artifacts, by engine and hash.
//!
//! Module bytes stay in their chunks: a 30 MB module is written once, as the
//! chunks arrive, never copied into one big value.

use super::{Store, StoreError, codec};
use crate::wire::hex;

/// A module's SHA-256, as its upload records are keyed.
pub type ModuleHash = [u8; 32];

const CHUNK_PREFIX: u8 = b'c';
const UPLOAD_PREFIX: u8 = b'u';
const VERSION_PREFIX: u8 = b'v';
const ACTIVE_PREFIX: u8 = b'x';
const ARTIFACT_PREFIX: u8 = b'a';

/// A replicated record of the modules keyspace, written through
/// [`super::ApplyBatch::modules`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleKey {
    /// Bytes of module `hash` starting at `offset`.
    Chunk { hash: [u8; 32], offset: u64 },
    /// The upload record of module `hash` (its format is the node's).
    Upload([u8; 32]),
    /// State machine `name`'s record of its version `hash`.
    Version { name: String, hash: [u8; 32] },
    /// The hash of the version state machine `name` runs.
    Active(String),
}

impl ModuleKey {
    pub(super) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut key = Vec::with_capacity(48);
        match self {
            ModuleKey::Chunk { hash, offset } => {
                key.push(CHUNK_PREFIX);
                key.extend_from_slice(hash);
                key.extend_from_slice(&offset.to_be_bytes());
            }
            ModuleKey::Upload(hash) => {
                key.push(UPLOAD_PREFIX);
                key.extend_from_slice(hash);
            }
            ModuleKey::Version { name, hash } => {
                key.push(VERSION_PREFIX);
                key.extend_from_slice(&super::state_key(name, &[])?);
                key.extend_from_slice(hash);
            }
            ModuleKey::Active(name) => {
                key.push(ACTIVE_PREFIX);
                key.extend_from_slice(&super::state_key(name, &[])?);
            }
        }
        Ok(key)
    }
}

/// One state machine's version record, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVersion {
    pub name: String,
    pub hash: [u8; 32],
    pub record: Vec<u8>,
}

impl Store {
    /// A replicated module record (an upload or version record, or an active
    /// hash), as written.
    pub fn module_record(&self, key: &ModuleKey) -> Result<Option<Vec<u8>>, StoreError> {
        let inner = &self.inner;
        let value = inner.modules.get(key.encode()?).map_err(|e| inner.db_error(e))?;
        value.map(|v| inner.unseal(&v, || format!("module record {key:?}"))).transpose()
    }

    /// The stored chunks of module `hash`, as `(offset, bytes)` in offset order.
    pub fn module_chunks(&self, hash: &[u8; 32]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let inner = &self.inner;
        let mut prefix = vec![CHUNK_PREFIX];
        prefix.extend_from_slice(hash);
        let mut out = Vec::new();
        for guard in inner.modules.prefix(&prefix) {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let offset: [u8; 8] = key[prefix.len()..]
                .try_into()
                .map_err(|_| inner.corrupt(format!("chunk key of module {} has a bad offset", hex(hash))))?;
            let offset = u64::from_be_bytes(offset);
            let bytes = inner.unseal(&value, || format!("chunk at {offset} of module {}", hex(hash)))?;
            out.push((offset, bytes));
        }
        Ok(out)
    }

    /// Every upload record, by module hash.
    pub fn module_uploads(&self) -> Result<Vec<(ModuleHash, Vec<u8>)>, StoreError> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for guard in inner.modules.prefix([UPLOAD_PREFIX]) {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let hash: [u8; 32] =
                key[1..].try_into().map_err(|_| inner.corrupt(format!("upload key {key:?} has a bad hash")))?;
            let record = inner.unseal(&value, || format!("upload record of module {}", hex(&hash)))?;
            out.push((hash, record));
        }
        Ok(out)
    }

    /// Drops this member's compiled artifacts of module `hash`, for every
    /// engine: a local cache, so no batch and no sync.
    pub fn remove_artifacts(&self, hash: &[u8; 32]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut found = Vec::new();
        for guard in inner.modules.prefix([ARTIFACT_PREFIX]) {
            let key = guard.key().map_err(|e| inner.db_error(e))?;
            if key.ends_with(hash) {
                found.push(key.to_vec());
            }
        }
        for key in found {
            inner.modules.remove(key.as_slice()).map_err(|e| inner.db_error(e))?;
        }
        Ok(())
    }

    /// Every state machine's version records, by name then hash.
    pub fn module_versions(&self) -> Result<Vec<StoredVersion>, StoreError> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for guard in inner.modules.prefix([VERSION_PREFIX]) {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let (name, rest) = split_name(&key[1..]).ok_or_else(|| inner.corrupt(format!("version key {key:?}")))?;
            let hash: [u8; 32] =
                rest.try_into().map_err(|_| inner.corrupt(format!("version key of {name:?} has a bad hash")))?;
            let record = inner.unseal(&value, || format!("version {} of {name:?}", hex(&hash)))?;
            out.push(StoredVersion { name, hash, record });
        }
        Ok(out)
    }

    /// The version each state machine runs, by name, as activated through the log.
    pub fn active_modules(&self) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for guard in inner.modules.prefix([ACTIVE_PREFIX]) {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let (name, rest) = split_name(&key[1..]).ok_or_else(|| inner.corrupt(format!("active key {key:?}")))?;
            let value = inner.unseal(&value, || format!("active version of {name:?}"))?;
            let hash: [u8; 32] = value
                .as_slice()
                .try_into()
                .map_err(|_| inner.corrupt(format!("active version of {name:?} is not a hash")))?;
            if !rest.is_empty() {
                return Err(inner.corrupt(format!("active key of {name:?} has trailing bytes")));
            }
            out.push((name, hash));
        }
        Ok(out)
    }

    /// Stores a compiled artifact of module `hash` for `engine` (the engine
    /// and its configuration, so an upgrade never loads a stale artifact).
    /// A local cache: no sync, a lost artifact is compiled again.
    pub fn put_artifact(&self, engine: &str, hash: &[u8; 32], artifact: &[u8]) -> Result<(), StoreError> {
        self.inner
            .modules
            .insert(artifact_key(engine, hash), codec::encode_blob(artifact))
            .map_err(|e| self.inner.db_error(e))
    }

    /// A compiled artifact, if cached.
    pub fn get_artifact(&self, engine: &str, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.inner.modules.get(artifact_key(engine, hash)).map_err(|e| self.inner.db_error(e))?;
        value.map(|v| self.inner.unseal(&v, || format!("artifact of {} for {engine}", hex(hash)))).transpose()
    }

    /// Removes every artifact compiled for another engine than `engine`
    /// (left behind by an upgrade of raft-host).
    pub fn drop_stale_artifacts(&self, engine: &str) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut stale = Vec::new();
        for guard in inner.modules.prefix([ARTIFACT_PREFIX]) {
            let key = guard.key().map_err(|e| inner.db_error(e))?;
            if !key[1..].starts_with(&artifact_engine_prefix(engine)) {
                stale.push(key.to_vec());
            }
        }
        for key in &stale {
            inner.modules.remove(key.as_slice()).map_err(|e| inner.db_error(e))?;
        }
        Ok(stale.len())
    }
}

/// Whether a key of the modules keyspace is replicated (and so belongs in a
/// snapshot) rather than this member's compiled cache.
pub(super) fn is_replicated(key: &[u8]) -> bool {
    matches!(key.first(), Some(&(CHUNK_PREFIX | UPLOAD_PREFIX | VERSION_PREFIX | ACTIVE_PREFIX)))
}

fn artifact_engine_prefix(engine: &str) -> Vec<u8> {
    let engine = &engine.as_bytes()[..engine.len().min(255)];
    let mut out = Vec::with_capacity(1 + engine.len());
    out.push(engine.len() as u8);
    out.extend_from_slice(engine);
    out
}

fn artifact_key(engine: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut key = vec![ARTIFACT_PREFIX];
    key.extend_from_slice(&artifact_engine_prefix(engine));
    key.extend_from_slice(hash);
    key
}

/// Splits `[len][name][rest]` (the state key prefix layout).
fn split_name(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let len = len as usize;
    if rest.len() < len {
        return None;
    }
    let name = String::from_utf8(rest[..len].to_vec()).ok()?;
    Some((name, &rest[len..]))
}
