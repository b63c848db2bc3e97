//! The modules a member knows: those built into the binary and those
//! deployed through the log (their chunks, upload and version records live in
//! the store), and their compiled form (the runtime, with its on-disk cache).
//!
//! The apply task writes (see `module_apply`); the services and deploys
//! read. Everything a replica decides
//! from here while applying (which bytes a hash names, whether an upload is
//! complete) depends only on applied entries, so replicas decide alike.

use crate::runtime::{LoadError, LoadState, Machine, Module, Runtime};
use crate::storage::{ModuleKey, STATE_MACHINE_NAME_MAX_BYTES, Store, StoreError};
use crate::wire::hex;
use crate::wire::pb::{self, ModuleState};
use prost::Message as _;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use thiserror::Error;

/// Bytes of a module per log entry: large enough that a 30 MB module is 30
/// entries, small enough to stay far below the entry and message limits.
pub const MODULE_CHUNK_BYTES: usize = 1 << 20;

/// A module built into the binary.
#[derive(Clone, Copy)]
pub struct BuiltIn {
    pub name: &'static str,
    pub bytes: &'static [u8],
}

/// One version of a state machine, as `raft-host modules` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub name: String,
    pub hash: [u8; 32],
    pub size_bytes: u64,
    pub deploy_index: u64,
    pub activated_index: u64,
    pub active: bool,
    pub built_in: bool,
}

/// Built-in and deployed modules of one member.
pub struct ModuleRegistry {
    runtime: Arc<Runtime>,
    store: Store,
    built_ins: BTreeMap<[u8; 32], BuiltIn>,
    /// State machines with an active version, for the services' checks.
    names: RwLock<BTreeSet<String>>,
    /// Modules being prepared in the background (not to start twice).
    preparing: Mutex<HashSet<[u8; 32]>>,
}

/// Checks a state machine name: what the store accepts as a key prefix, and
/// characters that read well on a command line and in metrics.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > STATE_MACHINE_NAME_MAX_BYTES {
        return Err(format!("a state machine name must be 1 to {STATE_MACHINE_NAME_MAX_BYTES} bytes, not {name:?}"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err(format!("a state machine name may use letters, digits, '-', '_' and '.', not {name:?}"));
    }
    Ok(())
}

/// Why the active versions could not be loaded.
#[derive(Debug, Error)]
pub enum ModuleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state machine {name:?}: {source}")]
    Load { name: String, source: LoadError },
}

impl ModuleRegistry {
    pub fn new(runtime: Arc<Runtime>, store: Store, built_ins: &[BuiltIn]) -> ModuleRegistry {
        let built_ins = built_ins.iter().map(|b| (Sha256::digest(b.bytes).into(), *b)).collect();
        ModuleRegistry {
            runtime,
            store,
            built_ins,
            names: RwLock::new(BTreeSet::new()),
            preparing: Mutex::new(HashSet::new()),
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The version each state machine runs: the built-ins, replaced by what
    /// activations in the log chose.
    pub fn active_versions(&self) -> Result<BTreeMap<String, [u8; 32]>, StoreError> {
        let mut active: BTreeMap<String, [u8; 32]> =
            self.built_ins.iter().map(|(hash, b)| (b.name.to_string(), *hash)).collect();
        active.extend(self.store.active_modules()?);
        Ok(active)
    }

    /// Every state machine's active version, loaded (from the compiled cache
    /// when it was compiled before) and ready to run.
    pub fn load_active(&self) -> Result<BTreeMap<String, Machine>, ModuleError> {
        let mut machines = BTreeMap::new();
        for (name, hash) in self.active_versions()? {
            let bytes = self.bytes(&hash)?.ok_or_else(|| {
                self.damaged(format!("module {} of the active version of {name:?} is missing", hex(&hash)))
            })?;
            let module = self.load(&bytes).map_err(|source| ModuleError::Load { name: name.clone(), source })?;
            tracing::info!(state_machine = %name, module = %hex(&module.hash()), "state machine loaded");
            machines.insert(name.clone(), Machine::new(self.runtime.clone(), module, name, self.store.clone()));
        }
        self.set_names(machines.keys().cloned().collect());
        Ok(machines)
    }

    /// Whether a state machine of this name has an active version here.
    pub fn is_known(&self, name: &str) -> bool {
        self.names.read().unwrap_or_else(|p| p.into_inner()).contains(name)
    }

    pub(super) fn set_names(&self, names: BTreeSet<String>) {
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// A module's upload record, if any of it arrived.
    pub fn upload(&self, hash: &[u8; 32]) -> Result<Option<pb::ModuleUpload>, StoreError> {
        let Some(bytes) = self.store.module_record(&ModuleKey::Upload(*hash))? else { return Ok(None) };
        pb::ModuleUpload::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| self.damaged(format!("upload record of module {} does not decode: {e}", hex(hash))))
    }

    /// Whether `hash` is a version of `name` built into this binary.
    pub fn is_built_in(&self, name: &str, hash: &[u8; 32]) -> bool {
        self.built_ins.get(hash).is_some_and(|built_in| built_in.name == name)
    }

    /// Uploads begun through the log and not complete.
    pub fn uploads_in_progress(&self) -> Result<Vec<pb::ModuleUpload>, StoreError> {
        let mut out = Vec::new();
        for (hash, record) in self.store.module_uploads()? {
            let upload = pb::ModuleUpload::decode(record.as_slice())
                .map_err(|e| self.damaged(format!("upload record of module {} does not decode: {e}", hex(&hash))))?;
            if !upload.complete {
                out.push(upload);
            }
        }
        Ok(out)
    }

    /// Whether the bytes of `hash` are here in full (built in, or uploaded).
    pub fn is_stored(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.built_ins.contains_key(hash) || self.upload(hash)?.is_some_and(|u| u.complete))
    }

    /// The bytes of module `hash`, if stored in full, verified against it.
    pub fn bytes(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(built_in) = self.built_ins.get(hash) {
            return Ok(Some(built_in.bytes.to_vec()));
        }
        let Some(upload) = self.upload(hash)? else { return Ok(None) };
        if !upload.complete {
            return Ok(None);
        }
        let bytes = assemble(upload.total_bytes, self.store.module_chunks(hash)?, None);
        match bytes {
            Some(bytes) if Sha256::digest(&bytes).as_slice() == hash => Ok(Some(bytes)),
            _ => Err(self.damaged(format!("the stored chunks of module {} do not add up to its hash", hex(hash)))),
        }
    }

    /// Loads (compiles, or takes from the compiled cache) a module the
    /// cluster holds.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Module>, LoadError> {
        self.runtime.load_cached(bytes, Some(&self.store))
    }

    /// Checks a new module the way a deploy does (size limit included) and
    /// compiles it into the cache.
    pub fn validate(&self, bytes: &[u8]) -> Result<Arc<Module>, LoadError> {
        self.runtime.check_size(bytes.len())?;
        self.load(bytes)
    }

    /// Where module `hash` stands on this member. A module that is stored but
    /// not loaded starts loading in the background, so asking is enough to
    /// make a member ready (after a restart, for instance).
    pub fn status(self: &Arc<Self>, hash: &[u8; 32]) -> Result<(ModuleState, String), StoreError> {
        match self.runtime.state(hash) {
            LoadState::Ready => return Ok((ModuleState::Ready, String::new())),
            LoadState::Refused(error) => return Ok((ModuleState::Failed, error.to_string())),
            LoadState::Loading => return Ok((ModuleState::Compiling, String::new())),
            LoadState::Unknown => {}
        }
        if self.is_stored(hash)? {
            self.prepare_in_background(*hash);
            return Ok((ModuleState::Compiling, String::new()));
        }
        match self.upload(hash)? {
            Some(_) => Ok((ModuleState::Uploading, String::new())),
            None => Ok((ModuleState::Absent, String::new())),
        }
    }

    /// Frees the compiled code of versions that nothing runs and nobody
    /// asked about within `idle`: staged by a deploy and never activated,
    /// or replaced since. The compiled cache on disk brings one back in
    /// milliseconds when a deploy, an activation or a rollback asks for it.
    pub fn forget_idle(&self, idle: std::time::Duration) -> Result<usize, StoreError> {
        let mut keep: HashSet<[u8; 32]> = self.active_versions()?.into_values().collect();
        keep.extend(self.preparing.lock().unwrap_or_else(|p| p.into_inner()).iter().copied());
        Ok(self.runtime.forget_idle(&keep, idle))
    }

    /// Compiles a stored module on a thread of its own, ahead of its
    /// activation, so applying the activation does not wait for it.
    pub fn prepare_in_background(self: &Arc<Self>, hash: [u8; 32]) {
        if !self.preparing.lock().unwrap_or_else(|p| p.into_inner()).insert(hash) {
            return;
        }
        let registry = self.clone();
        let spawned = std::thread::Builder::new().name("module-compile".into()).spawn(move || {
            match registry.bytes(&hash) {
                Ok(Some(bytes)) => {
                    if let Err(error) = registry.load(&bytes) {
                        tracing::warn!(module = %hex(&hash), %error, "a deployed module was refused by this member");
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::error!(module = %hex(&hash), %error, "cannot read a stored module"),
            }
            registry.preparing.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        });
        if spawned.is_err() {
            self.preparing.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        }
    }

    /// Every state machine's versions: the built-ins and what was deployed.
    pub fn versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let active = self.active_versions()?;
        let mut out: BTreeMap<(String, [u8; 32]), VersionInfo> = BTreeMap::new();
        for (hash, built_in) in &self.built_ins {
            out.insert(
                (built_in.name.to_string(), *hash),
                VersionInfo {
                    name: built_in.name.to_string(),
                    hash: *hash,
                    size_bytes: built_in.bytes.len() as u64,
                    deploy_index: 0,
                    activated_index: 0,
                    active: false,
                    built_in: true,
                },
            );
        }
        for stored in self.store.module_versions()? {
            let record = pb::ModuleVersion::decode(stored.record.as_slice()).map_err(|e| {
                self.damaged(format!("version record {} of {:?} does not decode: {e}", hex(&stored.hash), stored.name))
            })?;
            let built_in = self.built_ins.get(&stored.hash).is_some_and(|b| b.name == stored.name);
            out.insert(
                (stored.name.clone(), stored.hash),
                VersionInfo {
                    name: stored.name,
                    hash: stored.hash,
                    size_bytes: record.size_bytes,
                    deploy_index: record.deploy_index,
                    activated_index: record.activated_index,
                    active: false,
                    built_in,
                },
            );
        }
        for ((name, hash), info) in out.iter_mut() {
            info.active = active.get(name) == Some(hash);
        }
        Ok(out.into_values().collect())
    }

    fn damaged(&self, what: String) -> StoreError {
        StoreError::Corrupt { dir: self.store.dir().to_path_buf(), what }
    }

    /// State machine `name`'s record of version `hash` (a fresh one for a
    /// version first activated under this name).
    pub(super) fn version_record(&self, name: &str, hash: &[u8; 32]) -> Result<pb::ModuleVersion, StoreError> {
        let key = ModuleKey::Version { name: name.to_string(), hash: *hash };
        if let Some(bytes) = self.store.module_record(&key)? {
            return pb::ModuleVersion::decode(bytes.as_slice())
                .map_err(|e| self.damaged(format!("version record {} of {name:?} does not decode: {e}", hex(hash))));
        }
        if let Some(built_in) = self.built_ins.get(hash) {
            return Ok(pb::ModuleVersion {
                size_bytes: built_in.bytes.len() as u64,
                deploy_index: 0,
                activated_index: 0,
            });
        }
        let upload = self.upload(hash)?.unwrap_or_default();
        Ok(pb::ModuleVersion {
            size_bytes: upload.total_bytes,
            deploy_index: upload.complete_index,
            activated_index: 0,
        })
    }
}

/// The module of `total` bytes from its chunks (plus one not yet stored),
/// or `None` if they leave a gap or run past the end.
pub(super) fn assemble(total: u64, stored: Vec<(u64, Vec<u8>)>, extra: Option<(u64, &[u8])>) -> Option<Vec<u8>> {
    let total = usize::try_from(total).ok()?;
    let mut bytes = vec![0u8; total];
    let mut covered = Ranges::default();
    let chunks = stored.iter().map(|(offset, data)| (*offset, data.as_slice())).chain(extra);
    for (offset, data) in chunks {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(data.len()).filter(|&end| end <= total)?;
        bytes[start..end].copy_from_slice(data);
        covered.add(offset, end as u64);
    }
    covered.covers(total as u64).then_some(bytes)
}

/// Sorted, merged half-open byte ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    pub fn from_pb(ranges: &[pb::ByteRange]) -> Ranges {
        let mut out = Ranges::default();
        for range in ranges {
            out.add(range.start, range.end);
        }
        out
    }

    pub fn to_pb(&self) -> Vec<pb::ByteRange> {
        self.0.iter().map(|&(start, end)| pb::ByteRange { start, end }).collect()
    }

    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.0.push((start, end));
        self.0.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(s, e) in &self.0 {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.0 = merged;
    }

    pub fn covers(&self, total: u64) -> bool {
        total == 0 || self.0.as_slice() == [(0, total)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_overlaps_and_repeats() {
        let mut ranges = Ranges::default();
        ranges.add(10, 20);
        ranges.add(0, 10);
        ranges.add(15, 30);
        ranges.add(0, 10);
        assert_eq!(ranges.0, vec![(0, 30)]);
        assert!(ranges.covers(30));
        assert!(!ranges.covers(31));
        ranges.add(40, 50);
        assert_eq!(ranges.0, vec![(0, 30), (40, 50)]);
        assert_eq!(Ranges::from_pb(&ranges.to_pb()), ranges);
    }

    #[test]
    fn assemble_needs_every_byte_and_nothing_past_the_end() {
        let chunks = vec![(0, b"abc".to_vec()), (6, b"ghi".to_vec())];
        assert_eq!(assemble(9, chunks.clone(), None), None, "a gap");
        assert_eq!(assemble(9, chunks.clone(), Some((3, b"def"))), Some(b"abcdefghi".to_vec()));
        assert_eq!(assemble(8, chunks, Some((3, b"def"))), None, "past the end");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("kv").is_ok());
        assert!(check_name("bank-v2.eu_1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }
}
