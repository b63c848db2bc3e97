//! Snapshots of the replicated state: what a leader streams to a follower
//! that is behind its compacted log, and how the follower installs it.
//!
//! A snapshot is the store itself at one applied index, read through a
//! fjall snapshot (a consistent point-in-time view, taken without stopping
//! writes): every state machine's keys, the session table, the replicated
//! module records (not the compiled artifacts, which are local), and the
//! metadata that goes with them (applied position, replicated clock,
//! membership, addresses and removed ids).
//!
//! The stream is a sequence of records, `[tag][key length u32][key][value
//! length u32][value]`, cut into chunks on record boundaries. Values travel
//! as stored, with their own checksums; the transport adds a CRC32 per chunk
//! and a SHA-256 over the whole stream.
//!
//! Receiving stages the records in a keyspace of the stream's own, named
//! after the snapshot's (index, term), so a broken stream never touches the
//! live state and a second stream never disturbs a snapshot waiting to be
//! installed. A stream that breaks off, or one installed, goes with its
//! keyspace, files included, at once: removed records would otherwise stay
//! on disk until fjall rewrote their tables, and a slow follower that gets
//! one snapshot while the last installs never has an idle moment for that.
//! A complete, verified snapshot gets a completion record; only such a one
//! is installed. Installing is a redo operation: a
//! marker naming the snapshot is made durable first, then the live
//! keyspaces are cleared and refilled from the staging area, and a last
//! batch moves the applied position, drops the log and removes the marker.
//! A crash in between redoes the install when the store opens.

use super::history::META_HISTORY;
use super::{
    META_APPLIED, META_APPLY_CLOCK, META_CONF_STATE, META_HARD_STATE, META_MEMBERS, META_REMOVED, META_SNAPSHOT, Store,
    StoreError, codec, modules,
};
use crate::raft::{Index, SnapshotMeta, Term};
use fjall::Readable;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Marker of an install in progress (the snapshot's meta).
pub(super) const META_INSTALLING: &[u8] = b"installing";

const TAG_STATE: u8 = b's';
/// Format 1's session records, one per client.
const TAG_SESSION: u8 = b'e';
/// The session log's checkpoints and changes.
const TAG_SESSION_LOG: u8 = b'l';
const TAG_MODULE: u8 = b'm';
const TAG_META: u8 = b'M';
const TAG_HISTORY: u8 = b'h';
/// The staged snapshot is complete and verified (its value: the meta).
const TAG_COMPLETE: u8 = 0xff;

/// Metadata keys a snapshot carries.
const SNAPSHOT_META_KEYS: [&[u8]; 6] =
    [META_APPLIED, META_APPLY_CLOCK, META_CONF_STATE, META_MEMBERS, META_REMOVED, META_HISTORY];

/// A record's tag and its two lengths.
const RECORD_FRAMING_BYTES: usize = 9;

/// The largest key or value a record may carry when read from a file (a
/// state value is at most 4 MiB, a module chunk 1 MiB).
const RECORD_PART_BYTES_MAX: u64 = 64 << 20;

/// What the shared staging area of earlier releases may hold before its
/// emptying at open is worth the work (see `drop_staging_at_open`).
const LEGACY_STAGING_KEPT_BYTES: u64 = 64 << 10;

/// Names of the keyspaces that stage one stream each.
const STREAM_KEYSPACE_PREFIX: &str = "staging-";

/// Records copied per batch while installing, so a large state never sits
/// in one batch in memory.
const INSTALL_BATCH_BYTES: usize = 8 << 20;

/// A consistent view of the replicated state, ready to stream.
pub struct SnapshotReader {
    store: Store,
    view: fjall::Snapshot,
    meta: SnapshotMeta,
}

impl SnapshotReader {
    /// The point this snapshot cuts the log at, and the membership there.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Bytes the stream of records will carry in all: what the sender
    /// announces, and the receiver holds it to. Reads the view once.
    pub fn total_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        self.for_each_record(|_, key, value| {
            total += (RECORD_FRAMING_BYTES + key.len() + value.len()) as u64;
            true
        })?;
        Ok(total)
    }

    /// Calls `visit` with every record of the snapshot, in stream order,
    /// until it returns false.
    fn for_each_record(&self, mut visit: impl FnMut(u8, &[u8], &[u8]) -> bool) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        for key in SNAPSHOT_META_KEYS {
            if let Some(value) = self.view.get(&inner.meta, key).map_err(|e| inner.db_error(e))?
                && !visit(TAG_META, key, &value)
            {
                return Ok(());
            }
        }
        let keyspaces = [
            (TAG_STATE, &inner.state),
            (TAG_SESSION, &inner.sessions),
            (TAG_SESSION_LOG, &inner.session_log),
            (TAG_MODULE, &inner.modules),
            (TAG_HISTORY, &inner.history),
        ];
        for (tag, keyspace) in keyspaces {
            for guard in self.view.iter(keyspace) {
                let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
                if tag == TAG_MODULE && !modules::is_replicated(&key) {
                    continue;
                }
                if !visit(tag, &key, &value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Streams the records in chunks of about `chunk_bytes` (a record larger
    /// than that travels alone). `send` returns false to stop early.
    pub fn for_each_chunk(&self, chunk_bytes: usize, mut send: impl FnMut(Vec<u8>) -> bool) -> Result<(), StoreError> {
        let mut chunk = Vec::with_capacity(chunk_bytes);
        let mut stopped = false;
        self.for_each_record(|tag, key, value| {
            if !chunk.is_empty()
                && chunk.len() + RECORD_FRAMING_BYTES + key.len() + value.len() > chunk_bytes
                && !send(std::mem::take(&mut chunk))
            {
                stopped = true;
                return false;
            }
            push_record(&mut chunk, tag, key, value);
            true
        })?;
        if !stopped && !chunk.is_empty() {
            send(chunk);
        }
        Ok(())
    }
}

/// What receiving a snapshot starts with.
pub enum StagingStart {
    /// Receive the stream into this.
    Fresh(Staging),
    /// This very snapshot is already staged, waiting to be installed.
    AlreadyStaged(SnapshotMeta),
}

/// A snapshot being received into the staging area.
pub struct Staging {
    store: Store,
    stream: Stream,
    meta: SnapshotMeta,
    applied_seen: Option<(Index, Term)>,
}

impl Staging {
    /// Stages one chunk's records. A malformed chunk is an error and leaves
    /// the live state untouched.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        let mut batch = inner.db.batch();
        let mut staged_bytes = 0u64;
        let mut rest = chunk;
        while !rest.is_empty() {
            let (Record { tag, key, value }, tail) = split_record(rest).ok_or_else(|| StoreError::InvalidSnapshot {
                index: self.meta.index,
                why: "a record is cut short".into(),
            })?;
            rest = tail;
            match tag {
                TAG_STATE | TAG_SESSION | TAG_SESSION_LOG | TAG_HISTORY => {}
                TAG_MODULE if modules::is_replicated(key) => {}
                TAG_META if SNAPSHOT_META_KEYS.contains(&key) => {
                    if key == META_APPLIED {
                        let applied = codec::decode_applied(value).map_err(|codec::DecodeError(why)| {
                            StoreError::InvalidSnapshot {
                                index: self.meta.index,
                                why: format!("its applied position: {why}"),
                            }
                        })?;
                        self.applied_seen = Some(applied);
                    }
                }
                _ => {
                    return Err(StoreError::InvalidSnapshot {
                        index: self.meta.index,
                        why: format!("it holds a record this version does not know (tag {tag})"),
                    });
                }
            }
            let key = staged_key(tag, key);
            staged_bytes += (key.len() + value.len()) as u64;
            batch.insert(&self.stream.keyspace, key, value);
        }
        batch.commit().map_err(|e| inner.db_error(e))?;
        self.stream.add(staged_bytes);
        Ok(())
    }

    /// Marks the staged snapshot complete: it may now be installed. Its
    /// records must have named the applied position the header announced.
    pub fn finish(self) -> Result<SnapshotMeta, StoreError> {
        let inner = &self.store.inner;
        if self.applied_seen != Some((self.meta.index, self.meta.term)) {
            return Err(StoreError::InvalidSnapshot {
                index: self.meta.index,
                why: format!("it announced term {} but its records say {:?}", self.meta.term, self.applied_seen),
            });
        }
        let mut batch = inner.db.batch().durability(inner.persist_mode());
        let (key, value) = (staged_key(TAG_COMPLETE, &[]), codec::encode_snapshot_meta(&self.meta));
        let staged_bytes = (key.len() + value.len()) as u64;
        batch.insert(&self.stream.keyspace, key, value);
        batch.commit().map_err(|e| inner.db_error(e))?;
        self.stream.add(staged_bytes);
        Ok(self.meta)
    }
}

impl Store {
    /// A consistent view of the replicated state at the current applied
    /// index. Writes go on meanwhile; the view keeps what it saw.
    pub fn snapshot_reader(&self) -> Result<SnapshotReader, StoreError> {
        let inner = &self.inner;
        let view = inner.db.snapshot();
        let read = |key: &[u8]| view.get(&inner.meta, key).map_err(|e| inner.db_error(e));
        let corrupt = |what: &str, why: &str| inner.corrupt(format!("{what}: {why}"));
        let (index, term) = match read(META_APPLIED)? {
            Some(value) => {
                codec::decode_applied(&value).map_err(|codec::DecodeError(why)| corrupt("applied position", why))?
            }
            None => (0, 0),
        };
        let conf_state = match read(META_CONF_STATE)? {
            Some(value) => {
                codec::decode_conf_state(&value).map_err(|codec::DecodeError(why)| corrupt("membership", why))?
            }
            None => Default::default(),
        };
        Ok(SnapshotReader { store: self.clone(), view, meta: SnapshotMeta { index, term, conf_state } })
    }

    /// Starts receiving snapshot `meta`: drops a partial copy of it and any
    /// staged snapshot already behind the applied index.
    pub fn begin_staging(&self, meta: SnapshotMeta) -> Result<StagingStart, StoreError> {
        if let Some(staged) = self.staged_snapshot(meta.index, meta.term)? {
            return Ok(StagingStart::AlreadyStaged(staged));
        }
        let applied = self.applied().0;
        let point = (meta.index, meta.term);
        let inner = &self.inner;
        inner.drop_streams(|staged| staged == point || staged.0 <= applied)?;
        let stream = inner.open_stream(point)?;
        Ok(StagingStart::Fresh(Staging { store: self.clone(), stream, meta, applied_seen: None }))
    }

    /// Drops what was staged of snapshot `meta` (a stream that broke off):
    /// nothing of it is left to fill the disk.
    pub fn discard_staging(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        self.inner.drop_streams(|staged| staged == (meta.index, meta.term))
    }

    /// Bytes on disk of what staging holds or held: the streams' keyspaces,
    /// those dropped but still open somewhere included, and the shared area
    /// of earlier releases (for tests and diagnostics; walks the folders).
    pub fn staging_disk_bytes(&self) -> u64 {
        let inner = &self.inner;
        let others = [
            &inner.log,
            &inner.meta,
            &inner.state,
            &inner.sessions,
            &inner.session_log,
            &inner.modules,
            &inner.history,
        ];
        let Some(keyspaces) = inner.staging.path().parent() else { return 0 };
        let Ok(folders) = std::fs::read_dir(keyspaces) else { return 0 };
        folders
            .flatten()
            .map(|folder| folder.path())
            // Folder 0 is fjall's own keyspace of keyspace names.
            .filter(|path| path.file_name().is_some_and(|name| name != "0"))
            .filter(|path| others.iter().all(|keyspace| keyspace.path() != path.as_path()))
            .map(|path| bytes_under(&path))
            .sum()
    }

    /// Bytes of every snapshot staged now, keys and values (for tests,
    /// `Status` and metrics). Counted as they are staged: health checks and
    /// scrapes ask often, and a staged snapshot can be as large as the state.
    pub fn staged_bytes(&self) -> u64 {
        self.inner.streams().values().map(Stream::bytes).sum()
    }

    /// The staged snapshot at `(index, term)`, if it is complete.
    fn staged_snapshot(&self, index: Index, term: Term) -> Result<Option<SnapshotMeta>, StoreError> {
        let inner = &self.inner;
        let Some(keyspace) = inner.staged_keyspace((index, term)) else { return Ok(None) };
        let Some(value) = keyspace.get(staged_key(TAG_COMPLETE, &[])).map_err(|e| inner.db_error(e))? else {
            return Ok(None);
        };
        codec::decode_snapshot_meta(&value)
            .map(Some)
            .map_err(|codec::DecodeError(why)| inner.corrupt(format!("staged snapshot {index}: {why}")))
    }

    /// Replaces the replicated state and the whole log with the staged
    /// snapshot `meta` (see the module documentation for crash safety).
    pub fn install_snapshot(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        if self.staged_snapshot(meta.index, meta.term)?.is_none() {
            return Err(StoreError::SnapshotNotStaged { index: meta.index, term: meta.term });
        }
        let inner = &self.inner;
        let mut batch = inner.db.batch().durability(inner.persist_mode());
        batch.insert(&inner.meta, META_INSTALLING, codec::encode_snapshot_meta(meta));
        batch.commit().map_err(|e| inner.db_error(e))?;
        self.finish_install(meta)
    }

    /// The redo part of an install; safe to run again after a crash.
    pub(super) fn finish_install(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _writer = inner.log_writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for keyspace in [&inner.state, &inner.sessions, &inner.session_log, &inner.history] {
            inner.empty_keyspace(keyspace)?;
        }
        // A snapshot without removed members has none; it must not inherit
        // ours. One without a history (from an older version) starts one.
        inner.meta.remove(META_REMOVED).map_err(|e| inner.db_error(e))?;
        inner.meta.remove(META_HISTORY).map_err(|e| inner.db_error(e))?;
        self.remove_replicated_modules()?;
        let mut batch = inner.db.batch();
        let mut bytes = 0;
        let staged = inner.staged_keyspace((meta.index, meta.term)).ok_or_else(|| {
            inner.corrupt(format!(
                "the install of snapshot ({}, {}) cannot be finished: its staged records are gone (an install \
                 interrupted under a release before 2026-12-06 is finished by that release)",
                meta.index, meta.term
            ))
        })?;
        for guard in staged.iter() {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let Some((&tag, key)) = key.split_first() else { continue };
            let target = match tag {
                TAG_STATE => &inner.state,
                TAG_SESSION => &inner.sessions,
                TAG_SESSION_LOG => &inner.session_log,
                TAG_MODULE => &inner.modules,
                TAG_HISTORY => &inner.history,
                TAG_META => &inner.meta,
                _ => continue,
            };
            bytes += key.len() + value.len();
            batch.insert(target, key, value);
            if bytes >= INSTALL_BATCH_BYTES {
                batch.commit().map_err(|e| inner.db_error(e))?;
                batch = inner.db.batch();
                bytes = 0;
            }
        }
        batch.commit().map_err(|e| inner.db_error(e))?;

        let mut cached = inner.lock();
        let mut hard_state = cached.hard_state;
        hard_state.commit = hard_state.commit.max(meta.index);
        let mut last = inner.db.batch().durability(inner.persist_mode());
        for chunk in &cached.chunks {
            last.remove(&inner.log, chunk.key());
        }
        last.insert(&inner.meta, META_SNAPSHOT, codec::encode_snapshot_meta(meta));
        last.insert(&inner.meta, META_HARD_STATE, codec::encode_hard_state(&hard_state));
        last.insert(&inner.meta, META_APPLIED, codec::encode_applied(meta.index, meta.term));
        last.insert(&inner.meta, META_CONF_STATE, codec::encode_conf_state(&meta.conf_state));
        last.remove(&inner.meta, META_INSTALLING);
        last.commit().map_err(|e| inner.db_error(e))?;
        cached.first_index = meta.index + 1;
        cached.last_index = meta.index;
        cached.term_runs.clear();
        cached.chunks.clear();
        cached.snapshot = meta.clone();
        cached.hard_state = hard_state;
        cached.conf_state = meta.conf_state.clone();
        cached.applied = (meta.index, meta.term);
        cached.history = inner
            .read_meta(META_HISTORY, super::history::decode_mark)?
            .unwrap_or(super::history::HistoryMark { floor: meta.index, bytes: 0 });
        // The records came with the snapshot: compaction reads them.
        cached.history_records.clear();
        // Last: a read that began before the state was replaced is not
        // cached after it.
        inner.state_cache.clear();
        drop(cached);
        // This snapshot's staging and any older one go (after the marker: a
        // crash before this drops them at open); a newer one may be waiting
        // for its own install.
        inner.drop_streams(|(index, _)| index <= meta.index)
    }

    /// Fills this store, which must be new and empty, from the records of a
    /// snapshot taken at `meta` (a backup file's). With `replace`, the new
    /// cluster's membership (as `raft-host snapshot restore` names it) takes
    /// the place of the one the records carry; ids the old cluster removed
    /// stay removed unless `replace` names them as members. Goes through the
    /// same staging and install as a snapshot from a leader, and leaves the
    /// hard state at the snapshot's term, so members restored alike hold
    /// identical state at the same index and elect a leader from there.
    pub fn restore_records(
        &self,
        mut meta: SnapshotMeta,
        records: &mut dyn std::io::Read,
        total_bytes: u64,
        replace: Option<&super::Membership>,
    ) -> Result<(), StoreError> {
        let (last_index, applied) = {
            let cached = self.inner.lock();
            (cached.last_index, cached.applied.0)
        };
        if last_index > 0 || applied > 0 || !self.conf_state().voters.is_empty() {
            return Err(StoreError::NotEmpty { dir: self.inner.dir.clone() });
        }
        if let Some(membership) = replace {
            meta.conf_state = membership.conf.clone();
        }
        let (index, term) = (meta.index, meta.term);
        let StagingStart::Fresh(mut staging) = self.begin_staging(meta.clone())? else {
            return Err(StoreError::NotEmpty { dir: self.inner.dir.clone() });
        };
        let invalid = |why: String| StoreError::InvalidSnapshot { index, why };
        let mut left = total_bytes;
        let mut chunk = Vec::new();
        let mut old_removed = std::collections::BTreeSet::new();
        while left > 0 {
            let (tag, key, value) = read_record(records, &mut left).map_err(invalid)?;
            let is_membership = tag == TAG_META && [META_CONF_STATE, META_MEMBERS, META_REMOVED].contains(&&*key);
            if replace.is_some() && is_membership {
                if key == META_REMOVED {
                    old_removed = codec::decode_ids(&value)
                        .map_err(|codec::DecodeError(why)| invalid(format!("its removed members: {why}")))?;
                }
            } else {
                push_record(&mut chunk, tag, &key, &value);
            }
            if chunk.len() >= INSTALL_BATCH_BYTES {
                staging.write_chunk(&chunk)?;
                chunk.clear();
            }
        }
        if let Some(membership) = replace {
            let members = membership.conf.members();
            let removed: std::collections::BTreeSet<_> =
                old_removed.union(&membership.removed).filter(|id| !members.contains(id)).copied().collect();
            push_record(&mut chunk, TAG_META, META_CONF_STATE, &codec::encode_conf_state(&membership.conf));
            push_record(&mut chunk, TAG_META, META_MEMBERS, &codec::encode_members(&membership.addresses));
            if !removed.is_empty() {
                push_record(&mut chunk, TAG_META, META_REMOVED, &codec::encode_ids(&removed));
            }
        }
        staging.write_chunk(&chunk)?;
        let meta = staging.finish()?;
        self.install_snapshot(&meta)?;
        self.persist(&[], Some(&crate::raft::HardState { term, vote: None, commit: index }))
    }

    fn remove_replicated_modules(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut batch = inner.db.batch();
        for guard in inner.modules.iter() {
            let key = guard.key().map_err(|e| inner.db_error(e))?;
            if modules::is_replicated(&key) {
                batch.remove(&inner.modules, key.to_vec());
            }
        }
        batch.commit().map_err(|e| inner.db_error(e))
    }
}

/// A snapshot stream's staging keyspace, and the bytes staged in it.
#[derive(Clone)]
pub(super) struct Stream {
    keyspace: fjall::Keyspace,
    bytes: Arc<AtomicU64>,
}

impl Stream {
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl super::Inner {
    /// The streams staged now, by snapshot point.
    fn streams(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(Index, Term), Stream>> {
        // The map is only ever left whole: a panic elsewhere cannot leave
        // it half changed.
        self.streams.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The keyspace staging the stream of snapshot `point`, if there is one.
    fn staged_keyspace(&self, point: (Index, Term)) -> Option<fjall::Keyspace> {
        self.streams().get(&point).map(|stream| stream.keyspace.clone())
    }

    /// Creates (or opens, empty or not) the keyspace that stages the stream
    /// of snapshot `point`.
    fn open_stream(&self, point: (Index, Term)) -> Result<Stream, StoreError> {
        let memtable_bytes = self.memtable_bytes;
        let keyspace = self
            .db
            .keyspace(&stream_keyspace_name(point), || {
                fjall::KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
            })
            .map_err(|e| self.db_error(e))?;
        let stream = Stream { keyspace, bytes: Arc::new(AtomicU64::new(0)) };
        self.streams().insert(point, stream.clone());
        Ok(stream)
    }

    /// Drops the staged streams whose point `dropped` picks, their files
    /// with them (once nothing reads them any more).
    fn drop_streams(&self, dropped: impl Fn((Index, Term)) -> bool) -> Result<(), StoreError> {
        let gone: Vec<fjall::Keyspace> = {
            let mut streams = self.streams();
            let points: Vec<(Index, Term)> = streams.keys().copied().filter(|&point| dropped(point)).collect();
            points.iter().filter_map(|point| streams.remove(point)).map(|stream| stream.keyspace).collect()
        };
        // The folder goes once the last handle does (a stream's writer, a
        // journal not yet evicted that holds its records).
        for keyspace in gone {
            self.db.delete_keyspace(keyspace).map_err(|e| self.db_error(e))?;
        }
        Ok(())
    }

    /// Finds the streams staged before the store last closed (an install
    /// interrupted by a crash reads its own).
    pub(super) fn find_staged_streams(&self) -> Result<(), StoreError> {
        for name in self.db.list_keyspace_names() {
            if let Some(point) = stream_point(&name) {
                // Its bytes are not counted: `Store::open` drops every
                // stream before it returns the store.
                self.open_stream(point)?;
            }
        }
        Ok(())
    }

    /// Drops whatever is staged: after a restart the leader sends a fresh
    /// snapshot. The shared staging area of earlier releases is emptied
    /// once (an empty one is left as it is: no flush, no table).
    pub(super) fn drop_staging_at_open(&self) -> Result<(), StoreError> {
        use fjall::AbstractTree;
        self.drop_streams(|_| true)?;
        let tree = &self.staging.tree;
        let held = tree.disk_space().saturating_add(tree.active_memtable().size());
        if held > LEGACY_STAGING_KEPT_BYTES || !self.staging.is_empty().map_err(|e| self.db_error(e))? {
            self.empty_keyspace(&self.staging)?;
        }
        Ok(())
    }
}

/// The keyspace that stages snapshot `point`'s stream.
fn stream_keyspace_name((index, term): (Index, Term)) -> String {
    format!("{STREAM_KEYSPACE_PREFIX}{index}-{term}")
}

/// The snapshot point a staging keyspace is named after (only a name
/// [`stream_keyspace_name`] would give: opening it by point opens it).
fn stream_point(name: &str) -> Option<(Index, Term)> {
    let (index, term) = name.strip_prefix(STREAM_KEYSPACE_PREFIX)?.split_once('-')?;
    let point = (index.parse().ok()?, term.parse().ok()?);
    (stream_keyspace_name(point) == name).then_some(point)
}

/// Bytes of the files under `dir`, its folders included.
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => bytes_under(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn read_record(input: &mut dyn std::io::Read, left: &mut u64) -> Result<(u8, Vec<u8>, Vec<u8>), String> {
    let cut = |e: std::io::Error| format!("the records end early ({e})");
    let mut take = |len: u64, left: &mut u64| -> Result<Vec<u8>, String> {
        if len > *left {
            return Err(format!("a record of {len} bytes runs past the {left} bytes announced"));
        }
        if len > RECORD_PART_BYTES_MAX {
            return Err(format!("a record's part of {len} bytes is above {RECORD_PART_BYTES_MAX} bytes"));
        }
        *left -= len;
        let mut out = vec![0u8; len as usize];
        input.read_exact(&mut out).map_err(cut)?;
        Ok(out)
    };
    let tag = take(1, left)?[0];
    let key_len = u32::from_be_bytes(take(4, left)?.try_into().expect("4 bytes"));
    let key = take(u64::from(key_len), left)?;
    let value_len = u32::from_be_bytes(take(4, left)?.try_into().expect("4 bytes"));
    let value = take(u64::from(value_len), left)?;
    Ok((tag, key, value))
}

fn push_record(out: &mut Vec<u8>, tag: u8, key: &[u8], value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// One record of a snapshot stream.
struct Record<'a> {
    tag: u8,
    key: &'a [u8],
    value: &'a [u8],
}

/// The record at the front of `bytes`, and what follows it.
fn split_record(bytes: &[u8]) -> Option<(Record<'_>, &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (key, rest) = split_sized(rest)?;
    let (value, rest) = split_sized(rest)?;
    Some((Record { tag, key, value }, rest))
}

fn split_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    if bytes.len() < 4 {
        return None;
    }
    let (len, rest) = bytes.split_at(4);
    let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A staged record's key in its stream's keyspace: its tag, then its key.
fn staged_key(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.len());
    out.push(tag);
    out.extend_from_slice(key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{ConfState, Entry, EntryKind, LogStore};
    use crate::storage::{ApplyBatch, Identity, StateWrite, StoreOptions};

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir, &Identity::new("install-crash", 1), &StoreOptions::default()).expect("store opens")
    }

    /// A store whose log holds 1..=`applied`, applied there, with `keys` keys.
    fn store_at(dir: &std::path::Path, applied: Index, prefix: &str, keys: u64) -> Store {
        store_with(dir, applied, prefix, keys, |_| vec![1; 16])
    }

    /// As [`store_at`], with values that do not compress (so their tables
    /// take room on disk).
    fn noisy_store_at(dir: &std::path::Path, applied: Index, prefix: &str, keys: u64) -> Store {
        store_with(dir, applied, prefix, keys, |i| noise(i, 8))
    }

    /// `words` 8-byte words that do not compress, the same for the same `seed`.
    fn noise(seed: u64, words: u64) -> Vec<u8> {
        (0..words)
            .flat_map(|j| {
                let mut x = (seed * words + j).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x ^= x >> 31;
                x.wrapping_mul(0xbf58_476d_1ce4_e5b9).to_le_bytes()
            })
            .collect()
    }

    fn store_with(
        dir: &std::path::Path,
        applied: Index,
        prefix: &str,
        keys: u64,
        value: impl Fn(u64) -> Vec<u8>,
    ) -> Store {
        let store = open(dir);
        store.bootstrap(&ConfState::with_voters([1, 2, 3]), &Default::default()).expect("bootstrap");
        let entries: Vec<Entry> = (1..=applied)
            .map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: bytes::Bytes::from_static(b"e") })
            .collect();
        store.persist(&entries, None).expect("persist");
        let writes = (0..keys)
            .map(|i| StateWrite {
                state_machine: "kv".into(),
                key: format!("{prefix}-{i}").into_bytes(),
                value: Some(value(i)),
            })
            .collect();
        store
            .apply(&ApplyBatch { applied_index: applied, applied_term: 1, writes, ..ApplyBatch::default() })
            .expect("apply");
        store
    }

    /// The crash the snapshot crash test found: the install had copied the
    /// snapshot's applied position (50) while the log still ended at 10,
    /// and the reopen refused the directory as corrupt before it could
    /// finish the install.
    #[test]
    fn a_reopen_finishes_an_install_that_already_moved_the_applied_position() {
        let root = tempfile::tempdir().expect("tempdir");
        let leader = store_at(&root.path().join("leader"), 50, "leader", 20);
        let reader = leader.snapshot_reader().expect("reader");
        let follower_dir = root.path().join("follower");
        let follower = store_at(&follower_dir, 10, "follower", 5);
        let meta = stage(&follower, &reader, usize::MAX).finish().expect("complete");
        // The install's first steps, then the crash.
        let inner = &follower.inner;
        let mut batch = inner.db.batch();
        batch.insert(&inner.meta, META_INSTALLING, codec::encode_snapshot_meta(&meta));
        batch.insert(&inner.meta, META_APPLIED, codec::encode_applied(meta.index, meta.term));
        batch.commit().expect("commit");
        drop(follower);

        let reopened = open(&follower_dir);
        assert_eq!(reopened.applied(), (50, 1));
        assert_eq!((reopened.first_index().expect("first"), reopened.last_index().expect("last")), (51, 50));
        let leader_keys = reopened.state_scan("kv", b"leader-", Some(b"leader.".as_slice()), usize::MAX).expect("scan");
        let follower_keys =
            reopened.state_scan("kv", b"follower-", Some(b"follower.".as_slice()), usize::MAX).expect("scan");
        assert_eq!((leader_keys.len(), follower_keys.len()), (20, 0));
        drop(reopened);
        // And the finished install is what the next open sees, checked in full.
        assert_eq!(open(&follower_dir).applied(), (50, 1));
    }

    /// Stages `reader`'s snapshot into `follower` up to `chunks` chunks (all
    /// of it with `usize::MAX`), with the staged records flushed to tables.
    fn stage(follower: &Store, reader: &SnapshotReader, chunks: usize) -> Staging {
        let StagingStart::Fresh(mut staging) = follower.begin_staging(reader.meta().clone()).expect("begin") else {
            panic!("nothing complete staged before");
        };
        let (mut sent, before) = (0, follower.staging_disk_bytes());
        reader
            .for_each_chunk(16 << 10, |chunk| {
                staging.write_chunk(&chunk).expect("stage");
                sent += 1;
                sent < chunks
            })
            .expect("stream");
        let scanned: u64 = (staging.stream.keyspace.iter())
            .map(|guard| guard.into_inner().map(|(key, value)| (key.len() + value.len()) as u64).expect("read"))
            .sum();
        assert_eq!(staging.stream.bytes(), scanned, "the count of staged bytes is what the stream holds");
        staging.stream.keyspace.rotate_memtable_and_wait().expect("flush");
        assert!(follower.staging_disk_bytes() > before, "the staged records are in tables");
        staging
    }

    /// The staging area's bytes on disk once they are at most `bytes`, or
    /// after 10 s. A dropped stream's folder goes when fjall's last handle
    /// on it does, and a flush or compaction task a background worker has
    /// queued holds one for a moment (longer on a busy machine).
    fn staging_settled_at_most(store: &Store, bytes: u64) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = store.staging_disk_bytes();
            if now <= bytes || std::time::Instant::now() >= deadline {
                return now;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A member that keeps receiving snapshot streams, broken or installed,
    /// must not keep their removed records on disk until it fills.
    #[test]
    fn broken_and_installed_snapshot_streams_leave_no_tables_behind() {
        let root = tempfile::tempdir().expect("tempdir");
        let leader = noisy_store_at(&root.path().join("leader"), 50, "leader", 5_000);
        let reader = leader.snapshot_reader().expect("reader");
        let follower = store_at(&root.path().join("follower"), 10, "follower", 5);

        // The receiver drops its writer before it discards, as here.
        let broken = stage(&follower, &reader, 10).meta;
        follower.discard_staging(&broken).expect("discard");
        let emptied = staging_settled_at_most(&follower, 16 << 10);
        assert!(emptied < 16 << 10, "a broken stream's records are gone from disk ({emptied} bytes left)");

        let meta = stage(&follower, &reader, usize::MAX).finish().expect("complete");
        follower.install_snapshot(&meta).expect("install");
        let emptied = staging_settled_at_most(&follower, 16 << 10);
        assert!(emptied < 16 << 10, "an installed snapshot's records are gone from disk ({emptied} bytes left)");
        let installed = follower.state_scan("kv", b"leader-", Some(b"leader.".as_slice()), usize::MAX).expect("scan");
        assert_eq!(installed.len(), 5_000);
    }

    /// A stream cut off by a restart is dropped at open, files included.
    #[test]
    fn a_reopen_drops_a_partly_staged_snapshot_and_its_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let leader = noisy_store_at(&root.path().join("leader"), 50, "leader", 5_000);
        let follower_dir = root.path().join("follower");
        let follower = store_at(&follower_dir, 10, "follower", 5);
        drop(stage(&follower, &leader.snapshot_reader().expect("reader"), 10));
        drop(follower);
        let reopened = open(&follower_dir);
        assert_eq!(reopened.staged_bytes(), 0);
        let left = staging_settled_at_most(&reopened, 16 << 10);
        assert!(left < 16 << 10, "{left} bytes of the cut-off stream left on disk");
    }

    /// Installing a snapshot replaces the state: the files of the state it
    /// replaced go with it, not at the next restart.
    #[test]
    fn an_install_leaves_no_file_of_the_state_it_replaced() {
        let root = tempfile::tempdir().expect("tempdir");
        let leader = store_at(&root.path().join("leader"), 50, "leader", 10);
        let follower = noisy_store_at(&root.path().join("follower"), 10, "follower", 5_000);
        for keyspace in [&follower.inner.state, &follower.inner.sessions, &follower.inner.history] {
            keyspace.rotate_memtable_and_wait().expect("flush");
        }
        let replaced = bytes_under(follower.inner.state.path());
        // History keeps values apart (in blob files): they must go too.
        for i in 0..200 {
            follower.inner.history.insert(format!("h{i}"), noise(i, 512)).expect("history");
        }
        follower.inner.history.rotate_memtable_and_wait().expect("flush");
        assert!(bytes_under(follower.inner.history.path()) > 512 << 10, "the history's values are on disk");
        assert!(replaced > 64 << 10, "the follower's own state is on disk ({replaced} bytes)");
        let meta = stage(&follower, &leader.snapshot_reader().expect("reader"), usize::MAX).finish().expect("complete");
        follower.install_snapshot(&meta).expect("install");
        let left = bytes_under(follower.inner.state.path());
        let history_left = bytes_under(follower.inner.history.path());
        assert!(history_left < 16 << 10, "{history_left} bytes of history on disk after the install");
        assert!(left < 16 << 10, "{left} bytes of state on disk after installing a snapshot of 10 keys");
        let scan = |prefix: &[u8], end: &[u8]| follower.state_scan("kv", prefix, Some(end), usize::MAX).expect("scan");
        assert_eq!((scan(b"leader-", b"leader."), scan(b"follower-", b"follower.")).0.len(), 10);
        assert!(scan(b"follower-", b"follower.").is_empty());
    }

    /// Releasing dead staging never drops a snapshot still staged: a newer
    /// one waiting for its install survives an older stream's discard.
    #[test]
    fn a_complete_snapshot_survives_the_discard_of_another_stream() {
        let root = tempfile::tempdir().expect("tempdir");
        let older_leader = noisy_store_at(&root.path().join("older"), 40, "older", 1_000);
        let newer_leader = noisy_store_at(&root.path().join("newer"), 50, "newer", 1_000);
        let follower = store_at(&root.path().join("follower"), 10, "follower", 5);
        let waiting =
            stage(&follower, &newer_leader.snapshot_reader().expect("reader"), usize::MAX).finish().expect("complete");
        let waiting_bytes = follower.staged_bytes();
        let (broken, broken_bytes) = {
            let staging = stage(&follower, &older_leader.snapshot_reader().expect("reader"), 1);
            (staging.meta.clone(), staging.stream.bytes())
        };
        assert!(broken_bytes > 0);
        assert_eq!(follower.staged_bytes(), waiting_bytes + broken_bytes, "both streams count");
        follower.discard_staging(&broken).expect("discard");
        assert_eq!(follower.staged_bytes(), waiting_bytes, "the discarded stream no longer counts");
        assert!(follower.staging_disk_bytes() > 16 << 10, "the waiting snapshot's records are kept");
        follower.install_snapshot(&waiting).expect("the waiting snapshot installs");
        assert_eq!(follower.staged_bytes(), 0, "an installed stream no longer counts");
        let installed = follower.state_scan("kv", b"newer-", Some(b"newer.".as_slice()), usize::MAX).expect("scan");
        assert_eq!(installed.len(), 1_000);
        assert!(staging_settled_at_most(&follower, 16 << 10) < 16 << 10);
    }

    /// A slow follower gets one snapshot after another: the next is staged
    /// while the last installs, so the staging area is never idle. Each
    /// installed stream's files still go at its install.
    #[test]
    fn back_to_back_snapshots_release_each_installed_stream_while_the_next_is_staged() {
        let root = tempfile::tempdir().expect("tempdir");
        let older_leader = noisy_store_at(&root.path().join("older"), 40, "older", 4_000);
        let newer_leader = noisy_store_at(&root.path().join("newer"), 50, "newer", 2_000);
        let follower = store_at(&root.path().join("follower"), 10, "follower", 5);
        let first =
            stage(&follower, &older_leader.snapshot_reader().expect("reader"), usize::MAX).finish().expect("complete");
        let with_first = follower.staging_disk_bytes();
        let next =
            stage(&follower, &newer_leader.snapshot_reader().expect("reader"), usize::MAX).finish().expect("complete");
        let with_both = follower.staging_disk_bytes();
        follower.install_snapshot(&first).expect("install the first");
        let left = staging_settled_at_most(&follower, with_both - with_first + (16 << 10));
        assert!(
            left <= with_both - with_first + (16 << 10),
            "the installed stream's files stayed: {left} bytes staged, {with_both} with both, {with_first} with the first"
        );
        follower.install_snapshot(&next).expect("the next installs whole");
        let installed = follower.state_scan("kv", b"newer-", Some(b"newer.".as_slice()), usize::MAX).expect("scan");
        assert_eq!(installed.len(), 2_000);
        assert!(staging_settled_at_most(&follower, 16 << 10) < 16 << 10);
    }
}
