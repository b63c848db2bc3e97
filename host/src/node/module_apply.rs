//! Applying the log entries of a deploy: module chunks and activations, and
//! of their upkeep: removing a version, dropping abandoned uploads.
//!
//! A chunk is stored under its module's hash; the chunk that completes a
//! module verifies the whole against the hash and records it as a version of
//! its state machine, after which every member compiles it in the background.
//! An activation switches a state machine to a stored version, running the
//! new version's migrate hook inside the entry. Every outcome here (refused,
//! stored, activated) depends only on the entries, so every replica decides
//! alike; a store or engine failure is this member's own, and fatal.
//!
//! The apply task calls this between runs of client writes (each such entry
//! is applied alone) and writes what it returns with the entry's position.

use super::error::ApplyError;
use super::modules::{ModuleRegistry, Ranges, assemble, check_name};
use crate::raft::Index;
use crate::runtime::{EntryInfo, Machine};
use crate::storage::{ModuleKey, StateWrite, Store, StoreError};
use crate::wire::{hex, pb};
use prost::Message as _;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Largest module an upload may announce, whatever the members' settings.
const MODULE_BYTES_HARD_MAX: u64 = 1 << 30;

/// What a deploy entry answers: its outcome for the client (refusals are
/// outcomes, decided alike on every replica).
pub(super) type Outcome = Result<Vec<u8>, String>;

/// Module records changed by applied entries, waiting for the next store
/// batch.
pub(super) type ModuleChanges = Vec<(ModuleKey, Option<Vec<u8>>)>;

/// The apply task's view of module uploads and activations.
pub(super) struct ModuleApply {
    registry: Arc<ModuleRegistry>,
    store: Store,
    /// Uploads whose chunks arrived in order so far: the next offset and the
    /// hash of the bytes before it, so completing a module does not read
    /// it back (after a restart, or out of order, it is read back instead).
    hashing: HashMap<[u8; 32], (u64, Sha256)>,
    /// Records to write with the next batch.
    changes: ModuleChanges,
    /// Modules completed by entries not yet durable; compiled once they are.
    completed: Vec<[u8; 32]>,
}

impl ModuleApply {
    pub(super) fn new(registry: Arc<ModuleRegistry>, store: Store) -> ModuleApply {
        ModuleApply { registry, store, hashing: HashMap::new(), changes: Vec::new(), completed: Vec::new() }
    }

    /// The module records to write with the next batch.
    pub(super) fn take_changes(&mut self) -> ModuleChanges {
        std::mem::take(&mut self.changes)
    }

    /// Once the batch with the completing chunks is durable: compile those
    /// modules in the background, ahead of their activation.
    pub(super) fn prepare_completed(&mut self) {
        for hash in std::mem::take(&mut self.completed) {
            self.registry.prepare_in_background(hash);
        }
    }

    /// The state was replaced by a snapshot: uploads in progress are read
    /// back from the store from now on.
    pub(super) fn forget_progress(&mut self) {
        self.hashing.clear();
    }

    /// A chunk of a module being deployed, stored with the applied position;
    /// the chunk that completes the module also verifies it against its
    /// hash and records it as a version of its state machine.
    pub(super) fn store_chunk(
        &mut self,
        index: Index,
        clock_ms: u64,
        chunk: pb::ModuleChunk,
    ) -> Result<Outcome, StoreError> {
        let Ok(hash) = <[u8; 32]>::try_from(chunk.hash.as_slice()) else {
            return Ok(Err("a module hash is 32 bytes".to_string()));
        };
        if let Err(why) = check_name(&chunk.state_machine) {
            return Ok(Err(why));
        }
        // The configurable limit was the leader's to enforce; what applies
        // here must not depend on this member's settings.
        if chunk.total_bytes > MODULE_BYTES_HARD_MAX {
            return Ok(Err(format!(
                "module of {} bytes is above the limit of {MODULE_BYTES_HARD_MAX} bytes",
                chunk.total_bytes
            )));
        }
        let end = chunk.offset.checked_add(chunk.data.len() as u64).filter(|&end| end <= chunk.total_bytes);
        let Some(end) = end else {
            return Ok(Err(format!("chunk at {} runs past the module's {} bytes", chunk.offset, chunk.total_bytes)));
        };
        let mut upload = self.registry.upload(&hash)?.unwrap_or(pb::ModuleUpload {
            state_machine: chunk.state_machine.clone(),
            total_bytes: chunk.total_bytes,
            ..pb::ModuleUpload::default()
        });
        if upload.complete {
            return Ok(Ok(b"stored".to_vec()));
        }
        if upload.total_bytes != chunk.total_bytes {
            return Ok(Err(format!(
                "module {} is being uploaded with {} bytes, not {}",
                hex(&hash),
                upload.total_bytes,
                chunk.total_bytes
            )));
        }
        upload.last_chunk_ms = clock_ms;
        let mut received = Ranges::from_pb(&upload.received);
        received.add(chunk.offset, end);
        self.hash_in_order(hash, chunk.offset, &chunk.data);
        if !received.covers(upload.total_bytes) {
            upload.received = received.to_pb();
            self.changes.push((ModuleKey::Upload(hash), Some(upload.encode_to_vec())));
            self.changes.push((ModuleKey::Chunk { hash, offset: chunk.offset }, Some(chunk.data)));
            return Ok(Ok(b"received".to_vec()));
        }
        let matches = match self.hashing.remove(&hash) {
            Some((next, hasher)) if next == upload.total_bytes => hasher.finalize().as_slice() == hash,
            _ => {
                let stored = self.store.module_chunks(&hash)?;
                let whole = assemble(upload.total_bytes, stored, Some((chunk.offset, &chunk.data)));
                whole.is_some_and(|bytes| Sha256::digest(bytes).as_slice() == hash)
            }
        };
        if !matches {
            // Every replica holds the same chunks, so every replica drops them.
            self.drop_upload(&hash)?;
            return Ok(Err(format!("the uploaded bytes do not match module hash {}; upload it again", hex(&hash))));
        }
        upload.received = received.to_pb();
        upload.complete = true;
        upload.complete_index = index;
        let version = pb::ModuleVersion { size_bytes: upload.total_bytes, deploy_index: index, activated_index: 0 };
        let name = upload.state_machine.clone();
        self.changes.push((ModuleKey::Chunk { hash, offset: chunk.offset }, Some(chunk.data)));
        self.changes.push((ModuleKey::Upload(hash), Some(upload.encode_to_vec())));
        self.changes.push((ModuleKey::Version { name, hash }, Some(version.encode_to_vec())));
        self.completed.push(hash);
        tracing::info!(module = %hex(&hash), bytes = version.size_bytes, index, "module upload complete");
        Ok(Ok(b"complete".to_vec()))
    }

    /// Feeds a chunk to its upload's running hash if it continues it.
    fn hash_in_order(&mut self, hash: [u8; 32], offset: u64, data: &[u8]) {
        if offset == 0 {
            self.hashing.insert(hash, (0, Sha256::new()));
        }
        match self.hashing.get_mut(&hash) {
            Some((next, hasher)) if *next == offset => {
                hasher.update(data);
                *next += data.len() as u64;
            }
            Some(_) => {
                self.hashing.remove(&hash);
            }
            None => {}
        }
    }

    /// Removes version `hash` of a state machine that does not run it; its
    /// bytes (chunks and upload record) go too once no state machine lists
    /// it. Built-in versions stay: their bytes are in the binary.
    pub(super) fn remove_version(
        &mut self,
        machines: &BTreeMap<String, Machine>,
        remove: pb::RemoveVersion,
    ) -> Result<Outcome, StoreError> {
        let Ok(hash) = <[u8; 32]>::try_from(remove.hash.as_slice()) else {
            return Ok(Err("a module hash is 32 bytes".to_string()));
        };
        let name = remove.state_machine;
        if self.registry.is_built_in(&name, &hash) {
            return Ok(Err(format!("module {} is built into raft-host; it cannot be removed", hex(&hash))));
        }
        if machines.get(&name).is_some_and(|machine| machine.module_hash() == hash) {
            return Ok(Err(format!(
                "module {} is the active version of {name:?}; activate another version first",
                hex(&hash)
            )));
        }
        let versions = self.store.module_versions()?;
        if !versions.iter().any(|v| v.name == name && v.hash == hash) {
            return Ok(Err(format!("{name:?} has no version {}", hex(&hash))));
        }
        self.changes.push((ModuleKey::Version { name: name.clone(), hash }, None));
        let listed_elsewhere = versions.iter().any(|v| v.hash == hash && v.name != name)
            || machines.values().any(|machine| machine.module_hash() == hash);
        if !listed_elsewhere {
            self.drop_upload(&hash)?;
            self.registry.runtime().forget(&hash);
            self.store.remove_artifacts(&hash)?;
        }
        tracing::info!(state_machine = %name, module = %hex(&hash), bytes_dropped = !listed_elsewhere, "module version removed");
        Ok(Ok(b"removed".to_vec()))
    }

    /// Drops every incomplete upload whose latest chunk is stamped before
    /// `before_ms`. The outcome names how many went.
    pub(super) fn expire_uploads(&mut self, index: Index, expire: pb::ExpireUploads) -> Result<Outcome, StoreError> {
        let mut dropped = Vec::new();
        for (hash, record) in self.store.module_uploads()? {
            let upload = pb::ModuleUpload::decode(record.as_slice()).map_err(|e| StoreError::Corrupt {
                dir: self.store.dir().to_path_buf(),
                what: format!("upload record of module {} does not decode: {e}", hex(&hash)),
            })?;
            if !upload.complete && upload.last_chunk_ms < expire.before_ms {
                self.drop_upload(&hash)?;
                dropped.push(hex(&hash));
            }
        }
        if !dropped.is_empty() {
            tracing::info!(index, uploads = ?dropped, "dropped abandoned module uploads");
        }
        Ok(Ok(dropped.len().to_string().into_bytes()))
    }

    /// Deletes a module's chunks and upload record (with the next batch).
    fn drop_upload(&mut self, hash: &[u8; 32]) -> Result<(), StoreError> {
        for (offset, _) in self.store.module_chunks(hash)? {
            self.changes.push((ModuleKey::Chunk { hash: *hash, offset }, None));
        }
        self.changes.push((ModuleKey::Upload(*hash), None));
        self.hashing.remove(hash);
        Ok(())
    }

    /// Switches a state machine in `machines` to a stored version. The new
    /// version's migrate hook runs inside this entry; its writes are
    /// returned for the entry's batch. If it fails, the old version stays,
    /// on every replica alike. The outcome is the previous version's hash
    /// (hex; empty for a new state machine) or why the activation failed.
    pub(super) fn activate(
        &mut self,
        machines: &mut BTreeMap<String, Machine>,
        info: EntryInfo,
        activate: pb::Activate,
    ) -> Result<(Outcome, Vec<StateWrite>), ApplyError> {
        let refused = |why: String| Ok((Err(why), Vec::new()));
        let Ok(hash) = <[u8; 32]>::try_from(activate.hash.as_slice()) else {
            return refused("a module hash is 32 bytes".into());
        };
        let name = activate.state_machine;
        if let Err(why) = check_name(&name) {
            return refused(why);
        }
        let previous = machines.get(&name).map(Machine::module_hash);
        if previous == Some(hash) {
            return Ok((Ok(hex(&hash).into_bytes()), Vec::new()));
        }
        // Whether the module is stored is decided by the log alone; only then
        // may the copy compiled ahead of time stand in for reading it back.
        if !self.registry.is_stored(&hash)? {
            return refused(format!("no module {} is stored in this cluster; deploy it first", hex(&hash)));
        }
        let loaded = match self.registry.runtime().loaded(&hash) {
            Some(module) => Ok(module),
            None => {
                let bytes = self.registry.bytes(&hash)?.ok_or_else(|| StoreError::Corrupt {
                    dir: self.store.dir().to_path_buf(),
                    what: format!("module {} is recorded complete but its bytes are missing", hex(&hash)),
                })?;
                self.registry.load(&bytes)
            }
        };
        let module = match loaded {
            Ok(module) => module,
            Err(error) => return refused(format!("module {} cannot run: {error}", hex(&hash))),
        };
        let mut machine = Machine::new(self.registry.runtime().clone(), module, name.clone(), self.store.clone());
        let mut writes = Vec::new();
        if let Some(previous) = previous {
            let (result, migrated) = machine.migrate(info, &hex(&previous))?;
            if let Err(error) = result {
                tracing::warn!(state_machine = %name, module = %hex(&hash), index = info.index, %error, "activation failed in migrate");
                return refused(format!("the migrate hook of module {} refused: {error}", hex(&hash)));
            }
            writes = migrated;
        }
        let mut version = self.registry.version_record(&name, &hash)?;
        version.activated_index = info.index;
        self.changes.push((ModuleKey::Version { name: name.clone(), hash }, Some(version.encode_to_vec())));
        self.changes.push((ModuleKey::Active(name.clone()), Some(hash.to_vec())));
        tracing::info!(state_machine = %name, module = %hex(&hash), previous = %previous.map(|p| hex(&p)).unwrap_or_default(), index = info.index, "state machine version activated");
        let replaced = machines.insert(name, machine).map(|old| old.module_hash());
        if let Some(old) = replaced.filter(|old| machines.values().all(|m| m.module_hash() != *old)) {
            // Its compiled code is cached on disk; a rollback reloads it fast.
            self.registry.runtime().forget(&old);
        }
        self.registry.set_names(machines.keys().cloned().collect());
        Ok((Ok(previous.map(|p| hex(&p)).unwrap_or_default().into_bytes()), writes))
    }
}
