//! Durable storage of one node on fjall: the Raft log, hard state and
//! membership, the guests' replicated key-value state, client sessions and
//! WebAssembly modules.
//!
//! Layout of a data directory:
//! ```text
//! DIR/IDENTITY   format version, cluster id, node id (checked before opening)
//! DIR/db/        one fjall database with the keyspaces
//!   log        entries appended together, one record (see [`log`])
//!   meta       hard state, membership, snapshot point, applied position
//!   state      [len(sm)][sm][key] -> checksummed value, per state machine
//!   session_log the client session table as checkpoints and changes (see
//!              [`session_log`]); `sessions`: format 1's, one per client
//!   modules    module chunks, upload and version records, active versions
//!              (replicated); compiled artifacts (local): see [`modules`]
//!   history    every applied guest write with the value it replaced, by
//!              index, for watchers (see [`history`])
//!   staging-INDEX-TERM  a snapshot being received or waiting for its
//!              install, one keyspace each (see [`snapshot`]); `staging`:
//!              the shared area of earlier releases, emptied at open
//! ```
//!
//! Rules kept here:
//! - [`Store::persist`] writes a Ready's entries (replacing a conflicting
//!   suffix) and hard state in one atomic batch and fdatasyncs it before
//!   returning: group commit, one sync for the whole batch.
//! - [`Store::apply`] writes a batch of applied entries' guest writes, the
//!   applied position and session changes in one atomic batch, so a crash
//!   leaves either all or none of it. It needs no sync of its own: fjall's
//!   journal is sequential and atomic per batch, the entries it applies are
//!   already durable in the log, and a lost tail is re-applied on restart
//!   (deterministically) from the applied position that was lost with it.
//! - Opening verifies every log entry's checksum, the log's contiguity and
//!   that committed and applied positions point into it; a corrupt or
//!   inconsistent directory is refused with an error naming the directory and
//!   the index or key.

mod backup;
mod codec;
mod history;
mod identity;
mod log;
mod membership;
mod modules;
mod session_log;
mod snapshot;
mod state_cache;

pub use self::backup::{BACKUP_FORMAT, BackupError, BackupFile, BackupWriter, backup_header};
pub use self::history::{Change, HistoryFilter, HistoryLimits, HistoryPage, HistoryPosition, HistoryRead, PageLimits};
pub use self::identity::{FORMAT_VERSION, IDENTITY_FILE, Identity};
pub use self::membership::{MemberRole, Membership};
pub use self::modules::{ModuleKey, StoredVersion};
pub use self::session_log::{SessionChanges, SessionLogMark};
pub use self::snapshot::{SnapshotReader, Staging, StagingStart};

use crate::process::BackgroundPriority;
use crate::raft::{ConfState, Entry, HardState, Index, LogStore, NodeId, SnapshotMeta, StorageError, Term};
use codec::DecodeError;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

const META_HARD_STATE: &[u8] = b"hard_state";
const META_CONF_STATE: &[u8] = b"conf_state";
const META_SNAPSHOT: &[u8] = b"snapshot";
const META_APPLIED: &[u8] = b"applied";
const META_APPLY_CLOCK: &[u8] = b"apply_clock";
/// The members' addresses (replicated with the membership).
const META_MEMBERS: &[u8] = b"members";
/// Every id ever removed from the membership (replicated with it).
const META_REMOVED: &[u8] = b"removed";
/// This member is offline for maintenance (local, not replicated).
const META_OFFLINE: &[u8] = b"offline";

/// Key-value pairs of a guest's state, in key order.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// Keyspaces written in index order and compacted from the front, whose
/// large records are kept apart from their keys (see [`Store::open`]).
const APPEND_ONLY_KEYSPACES: [&str; 3] = ["log", "history", "session_log"];

/// The key whose removal an emptied keyspace keeps as its one table. It is
/// removed only from a keyspace just emptied, before anything is written to
/// it again, so it can shadow no record even if one had this key.
const EMPTIED_MARKER: &[u8] = b"\0emptied";

/// Longest state machine name (it prefixes every key of its state).
pub const STATE_MACHINE_NAME_MAX_BYTES: usize = 64;
/// Largest guest key and value.
pub const STATE_KEY_MAX_BYTES: usize = 4 << 10;
pub const STATE_VALUE_MAX_BYTES: usize = 4 << 20;

/// A failure of the store. Every variant names where it happened.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("database in {dir}: {source}")]
    Db { dir: PathBuf, source: fjall::Error },
    #[error("data directory {dir} is corrupt: {what}; restore it from a snapshot or wipe it and re-add the member")]
    Corrupt { dir: PathBuf, what: String },
    #[error(
        "data directory {dir} was written by a newer raft-host (format {found}; this build reads up to {supported})"
    )]
    NewerFormat { dir: PathBuf, found: u32, supported: u32 },
    #[error("data directory {dir} belongs to cluster {found:?}, not {expected:?}")]
    WrongCluster { dir: PathBuf, found: String, expected: String },
    #[error("data directory {dir} belongs to node {found}, not node {expected}")]
    WrongNode { dir: PathBuf, found: u64, expected: u64 },
    #[error("invalid identity: {0}")]
    InvalidIdentity(String),
    #[error("data directory {dir} holds a database but no {IDENTITY_FILE} file; refusing to guess whose it is")]
    MissingIdentity { dir: PathBuf },
    #[error("cannot append entries starting at index {first}: the log holds {log_first}..={log_last}")]
    InvalidAppend { first: Index, log_first: Index, log_last: Index },
    #[error("cannot compact the log up to {index}: {why}")]
    InvalidCompaction { index: Index, why: &'static str },
    #[error("{what} of {bytes} bytes is above the limit of {limit} bytes")]
    TooLarge { what: &'static str, bytes: usize, limit: usize },
    #[error("state machine name {0:?} must be 1 to {STATE_MACHINE_NAME_MAX_BYTES} bytes")]
    InvalidStateMachineName(String),
    #[error("the applied index may not move back from {from} to {to}")]
    AppliedBackwards { from: Index, to: Index },
    #[error("snapshot at index {index} is malformed: {why}")]
    InvalidSnapshot { index: Index, why: String },
    #[error("snapshot ({index}, {term}) is not completely staged, so it cannot be installed")]
    SnapshotNotStaged { index: Index, term: Term },
    #[error("data directory {dir} already holds a log or state; restore into a new, empty directory")]
    NotEmpty { dir: PathBuf },
}

impl From<StoreError> for StorageError {
    fn from(e: StoreError) -> StorageError {
        StorageError::Other(Box::new(e))
    }
}

/// Whether writes are synced to disk before they are acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before `persist` returns. The only safe mode.
    Fsync,
    /// No sync at all: a power loss can lose acknowledged writes and votes,
    /// and so break Raft's guarantees. For benchmarks only.
    UnsafeNoSync,
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub durability: Durability,
    /// fjall background threads (flush, compaction).
    pub worker_threads: usize,
    pub memory: StoreMemory,
    pub history: HistoryLimits,
    /// The priority of the fjall background threads: no write waits for a
    /// flush or a compaction, so they yield the cores to those that do
    /// (none lower by default; a member's default is
    /// [`DEFAULT_BACKGROUND_NICE`](crate::process::DEFAULT_BACKGROUND_NICE)).
    pub background: BackgroundPriority,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            durability: Durability::Fsync,
            worker_threads: 1,
            memory: StoreMemory::default(),
            history: HistoryLimits::default(),
            background: BackgroundPriority::new(0),
        }
    }
}

/// What the store may keep in memory, and so what a member holds at rest
/// and how long a restart replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreMemory {
    /// The block cache, shared by every keyspace: blocks of the on-disk
    /// tables, read again without touching the disk.
    pub cache_bytes: u64,
    /// Each keyspace's memtable (log, state, sessions, ...) is flushed to a
    /// table past this size. fjall records it when a data directory is
    /// created: a data directory keeps the size it was made with.
    pub memtable_bytes: u64,
    /// The write-ahead journals in all: past this, fjall flushes memtables
    /// so old journals can go. What a restart replays is at most this.
    pub journal_bytes: u64,
    /// The guests' latest values kept in front of the store (see
    /// [`state_cache`]): reads of hot keys skip the LSM tree. 0 turns it off.
    pub state_cache_bytes: u64,
}

/// fjall refuses journals under 64 MiB in all.
pub const JOURNAL_BYTES_MIN: u64 = 64 << 20;

/// Memtables below this flush so often that writes stall on them.
pub const MEMTABLE_BYTES_MIN: u64 = 1 << 20;

impl StoreMemory {
    /// The settings for a machine (or container) with `available` bytes of
    /// memory: the state cache takes 1/512 of it, from 16 MiB to 256 MiB
    /// (48 MiB on 24 GiB); the block cache and memtables keep their fixed
    /// defaults, which larger sizes did not make faster.
    pub fn for_memory(available: u64) -> StoreMemory {
        StoreMemory { state_cache_bytes: (available / 512).clamp(16 << 20, 256 << 20), ..StoreMemory::default() }
    }
}

impl Default for StoreMemory {
    fn default() -> StoreMemory {
        StoreMemory {
            cache_bytes: 16 << 20,
            memtable_bytes: 8 << 20,
            journal_bytes: JOURNAL_BYTES_MIN,
            state_cache_bytes: 32 << 20,
        }
    }
}

/// One guest write inside an apply batch; `None` deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateWrite {
    /// Shared by every write of a batch to the same state machine.
    pub state_machine: Arc<str>,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// One guest write as the change history records it: the entry's index,
/// the write, and the value it replaced when the caller knows it (the guest
/// read it, or the batch wrote it before).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub index: Index,
    pub write: StateWrite,
    /// `Some(None)`: the key had no value; `None`: not known, looked up.
    pub previous: Option<Option<Vec<u8>>>,
}

/// Everything the apply of a run of committed entries changes, made durable
/// atomically by [`Store::apply`].
#[derive(Clone, Debug, Default)]
pub struct ApplyBatch {
    /// Index and term of the last entry of the run.
    pub applied_index: Index,
    pub applied_term: Term,
    /// The replicated clock after the run: the latest entry timestamp seen,
    /// so that the time guests observe never goes back, across restarts too.
    pub clock_ms: u64,
    pub writes: Vec<StateWrite>,
    /// The same writes one by one, in the order they were applied, each
    /// with the index of its entry (`writes` holds each key's last): the
    /// change history's records.
    pub changes: Vec<StateChange>,
    /// Session records by client id that changed, or ended.
    pub sessions: SessionChanges,
    /// Every session's record, by client id: a checkpoint of the table that
    /// replaces what the store holds (`sessions` is then ignored). The apply
    /// task sends one when [`Store::session_checkpoint_due`].
    pub sessions_checkpoint: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Module chunks and records (deploys and activations); `None` deletes.
    pub modules: Vec<(ModuleKey, Option<Vec<u8>>)>,
    /// The membership after a membership change.
    pub membership: Option<Membership>,
}

/// In-memory mirror of the small, hot parts of the store.
#[derive(Debug)]
struct Cached {
    first_index: Index,
    last_index: Index,
    snapshot: SnapshotMeta,
    /// Term runs of the log: `(first index of the run, term)`, ascending, so
    /// `term(i)` never reads an entry (which may be a megabyte-sized module chunk).
    term_runs: Vec<(Index, Term)>,
    /// Where each record of the log starts, ascending (the first may start
    /// before `first_index`).
    chunks: VecDeque<log::ChunkStart>,
    hard_state: HardState,
    /// `hard_state.commit` moved past what the disk holds (see
    /// [`Store::record_commit`]).
    commit_unwritten: bool,
    conf_state: ConfState,
    applied: (Index, Term),
    history: history::HistoryMark,
    /// The history records this store wrote, oldest first.
    history_records: history::KnownRecords,
    session_log: SessionLogMark,
    /// The index of the last session record written, and the `seq` the
    /// next changes at that index take.
    session_changes_at: (Index, u32),
}

impl Cached {
    fn term(&self, index: Index) -> Option<Term> {
        if index < self.first_index || index > self.last_index {
            return None;
        }
        let run = self.term_runs.partition_point(|&(start, _)| start <= index);
        self.term_runs.get(run.checked_sub(1)?).map(|&(_, term)| term)
    }

    /// The record holding `index` (which must be in the log).
    fn chunk_of(&self, index: Index) -> Option<log::ChunkStart> {
        let at = self.chunks.partition_point(|chunk| chunk.first <= index);
        self.chunks.get(at.checked_sub(1)?).copied()
    }

    /// After `entries` were written as the records `runs` (one each).
    fn record_appended(&mut self, entries: &[Entry], runs: &[&[Entry]]) {
        let Some(first) = entries.first() else { return };
        let kept = self.chunks.partition_point(|chunk| chunk.first < first.index);
        self.chunks.truncate(kept);
        self.chunks.extend(runs.iter().map(|run| log::ChunkStart { first: run[0].index, legacy: false }));
        self.term_runs.retain(|&(start, _)| start < first.index);
        for entry in entries {
            if self.term_runs.last().is_none_or(|&(_, term)| term != entry.term) {
                self.term_runs.push((entry.index, entry.term));
            }
        }
        self.last_index = entries.last().map_or(self.last_index, |e| e.index);
    }
}

struct Inner {
    dir: PathBuf,
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    state: Keyspace,
    sessions: Keyspace,
    session_log: Keyspace,
    modules: Keyspace,
    /// The staging area of releases before 2026-12-06, shared by every
    /// stream: emptied at open, never written since.
    staging: Keyspace,
    /// Snapshots being received or waiting for their install, each in a
    /// keyspace of its own ([`snapshot`]).
    streams: Mutex<BTreeMap<(Index, Term), snapshot::Stream>>,
    /// The memtable size keyspaces are created with (a stream's too).
    memtable_bytes: u64,
    history: Keyspace,
    history_limits: HistoryLimits,
    state_cache: state_cache::StateCache,
    durability: Durability,
    cached: Mutex<Cached>,
    /// Serializes writers of the log, so `cached` can be unlocked while a
    /// batch syncs: the core keeps reading terms and entries during an fsync.
    log_writer: Mutex<()>,
}

/// A point-in-time view of the replicated state ([`Store::state_view`]).
pub struct StateView {
    view: fjall::Snapshot,
}

/// A node's durable store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the data directory `dir` for `identity`, refusing
    /// one that belongs to another node or cluster, was written by a newer
    /// format, or is corrupt.
    pub fn open(dir: &Path, identity: &Identity, options: &StoreOptions) -> Result<Store, StoreError> {
        let io = |e| StoreError::Io { path: dir.to_path_buf(), source: e };
        std::fs::create_dir_all(dir).map_err(io)?;
        let db_dir = dir.join("db");
        if dir.join(IDENTITY_FILE).exists() {
            identity::check(dir, identity)?;
        } else if db_dir.exists() {
            return Err(StoreError::MissingIdentity { dir: dir.to_path_buf() });
        } else {
            identity::write(dir, identity)?;
        }
        if options.durability == Durability::UnsafeNoSync {
            tracing::warn!(dir = %dir.display(), "storage runs WITHOUT fsync: a crash or power loss can lose acknowledged writes; benchmarks only");
        }
        let db_error = |source| StoreError::Db { dir: dir.to_path_buf(), source };
        let memory = options.memory;
        let builder = Database::builder(&db_dir)
            .worker_threads(options.worker_threads.max(1))
            .cache_size(memory.cache_bytes)
            .max_journaling_size(memory.journal_bytes.max(JOURNAL_BYTES_MIN))
            // The journals only live until their memtables are flushed, and
            // what they hold is mostly compressed again on flush (blob files,
            // deeper tables): compressing it twice costs CPU on every write
            // to save bytes that are dropped within seconds.
            .journal_compression(fjall::CompressionType::None);
        // The worker pool is spawned by `open` and inherits its priority.
        let db = options.background.spawning_lowered(|| builder.open()).map_err(io)?.map_err(db_error)?;
        let memtable_bytes = memory.memtable_bytes.max(MEMTABLE_BYTES_MIN);
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                let options = KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes);
                // Fixed when the keyspace is created.
                match name {
                    "state" => state_keyspace_options(options, memtable_bytes),
                    // Written in index order and dropped from the front:
                    // records of over 1 KiB (most, batched) go to blob files
                    // written once, so compaction moves small pointers
                    // instead of rewriting values, and a blob file whose
                    // records are all gone is dropped whole. Their blobs are
                    // not compressed: a log record lives until the next
                    // snapshot and the history and session log are bounded
                    // by their own byte counts, so compressing saves no bytes
                    // that matter and costs every member CPU on each flush
                    // (4% of a follower's, profiled).
                    _ if APPEND_ONLY_KEYSPACES.contains(&name) => options.with_kv_separation(Some(
                        fjall::KvSeparationOptions::default().compression(fjall::CompressionType::None),
                    )),
                    _ => options,
                }
            })
            .map_err(db_error)
        };
        let (log, meta, state, sessions, modules, staging, history, session_log) = (
            keyspace("log")?,
            keyspace("meta")?,
            keyspace("state")?,
            keyspace("sessions")?,
            keyspace("modules")?,
            keyspace("staging")?,
            keyspace("history")?,
            keyspace("session_log")?,
        );
        let placeholder = Cached {
            first_index: 1,
            last_index: 0,
            snapshot: SnapshotMeta::default(),
            term_runs: Vec::new(),
            chunks: VecDeque::new(),
            hard_state: HardState::default(),
            commit_unwritten: false,
            conf_state: ConfState::default(),
            applied: (0, 0),
            history: history::HistoryMark::default(),
            history_records: history::KnownRecords::new(),
            session_log: SessionLogMark::default(),
            session_changes_at: (0, 0),
        };
        let inner = Inner {
            dir: dir.to_path_buf(),
            db,
            log,
            meta,
            state,
            sessions,
            session_log,
            modules,
            staging,
            streams: Mutex::new(BTreeMap::new()),
            memtable_bytes,
            history,
            history_limits: options.history,
            state_cache: state_cache::StateCache::new(memory.state_cache_bytes),
            durability: options.durability,
            cached: Mutex::new(placeholder),
            log_writer: Mutex::new(()),
        };
        inner.find_staged_streams()?;
        // An install interrupted by a crash may have copied the snapshot's
        // applied position before the log moved to it: that is checked once
        // the install is finished, not before.
        let installing = inner.read_meta(snapshot::META_INSTALLING, codec::decode_snapshot_meta)?;
        let recovered = inner.recover(installing.is_some())?;
        *inner.lock() = recovered;
        let store = Store { inner: Arc::new(inner) };
        if let Some(meta) = installing {
            tracing::warn!(dir = %dir.display(), index = meta.index, "finishing a snapshot install interrupted by a crash");
            store.finish_install(&meta)?;
            let checked = store.inner.recover(false)?;
            *store.inner.lock() = checked;
        }
        // What is left staged (a partly received snapshot, or one that waited
        // for its install) is useless after a restart: the leader sends a
        // fresh one. Every stream's keyspace goes; the shared area of earlier
        // releases is emptied once.
        store.inner.drop_staging_at_open()?;
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Records the initial members of a new cluster and their addresses. A
    /// store that already has members keeps them: on a restart, and once
    /// membership changes have moved on from the initial set, the store
    /// knows better than the command line.
    pub fn bootstrap(&self, conf: &ConfState, addresses: &BTreeMap<NodeId, String>) -> Result<(), StoreError> {
        let mut cached = self.inner.lock();
        if !cached.conf_state.voters.is_empty() || cached.applied.0 > 0 {
            if cached.conf_state != *conf {
                tracing::warn!(
                    dir = %self.inner.dir.display(),
                    stored = ?cached.conf_state,
                    flags = ?conf,
                    "the stored membership differs from --peer; the store wins (change members with `raft-host members`)"
                );
            }
            return Ok(());
        }
        let mut batch = self.inner.db.batch().durability(self.inner.persist_mode());
        batch.insert(&self.inner.meta, META_CONF_STATE, codec::encode_conf_state(conf));
        batch.insert(&self.inner.meta, META_MEMBERS, codec::encode_members(addresses));
        batch.commit().map_err(|e| self.inner.db_error(e))?;
        cached.conf_state = conf.clone();
        Ok(())
    }

    /// The membership as of the applied index (empty for a member that has
    /// not joined yet).
    pub fn membership(&self) -> Result<Membership, StoreError> {
        Ok(Membership {
            conf: self.conf_state(),
            addresses: self.inner.read_meta(META_MEMBERS, codec::decode_members)?.unwrap_or_default(),
            removed: self.inner.read_meta(META_REMOVED, codec::decode_ids)?.unwrap_or_default(),
        })
    }

    /// Whether this member was taken offline for maintenance.
    pub fn offline(&self) -> Result<bool, StoreError> {
        Ok(self.inner.meta.get(META_OFFLINE).map_err(|e| self.inner.db_error(e))?.is_some())
    }

    /// Records (durably) whether this member is offline for maintenance.
    pub fn set_offline(&self, offline: bool) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut batch = inner.db.batch().durability(inner.persist_mode());
        if offline {
            batch.insert(&inner.meta, META_OFFLINE, codec::encode_blob(b"1"));
        } else {
            batch.remove(&inner.meta, META_OFFLINE);
        }
        batch.commit().map_err(|e| inner.db_error(e))
    }

    /// Makes a Ready's `entries` and `hard_state` durable in one batch and one
    /// sync. Entries from the first one's index on replace what the log held
    /// there; they must start inside the log or right after it.
    pub fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), StoreError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let inner = &self.inner;
        let _writer = inner.log_writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (log_first, log_last, unwritten, replaced, head) = {
            let cached = inner.lock();
            let from = entries.first().map_or(Index::MAX, |e| e.index);
            // Records from `from` on are replaced; the one holding `from`, if
            // it starts before, keeps its entries before `from`.
            let from_chunk = cached.chunks.partition_point(|c| c.first < from);
            let replaced: Vec<log::ChunkStart> = cached.chunks.range(from_chunk..).copied().collect();
            let head = (from <= cached.last_index)
                .then(|| cached.chunk_of(from))
                .flatten()
                .filter(|c| c.first < from && !c.legacy);
            (
                cached.first_index,
                cached.last_index,
                cached.commit_unwritten.then_some(cached.hard_state),
                replaced,
                head,
            )
        };
        // A commit index recorded without a write goes down with this batch.
        let hard_state = hard_state.or(unwritten.as_ref());
        let mut batch = inner.db.batch().durability(inner.persist_mode());
        let runs = log::chunk_runs(entries);
        if let Some(first) = entries.first() {
            if first.index < log_first || first.index > log_last + 1 {
                return Err(StoreError::InvalidAppend { first: first.index, log_first, log_last });
            }
            debug_assert!(entries.windows(2).all(|w| w[1].index == w[0].index + 1), "entries are contiguous");
            // Every item of a batch shares one sequence number, so no key
            // may appear twice: a record the new ones overwrite is not
            // removed first.
            let written: Vec<([u8; 9], fjall::Slice)> = runs.iter().map(|run| log::encode_chunk(run)).collect();
            for chunk in &replaced {
                let key = chunk.key();
                if !written.iter().any(|(new, _)| new[..] == key[..]) {
                    batch.remove(&inner.log, key);
                }
            }
            if let Some(head) = head {
                let kept = self.entries_before(head, first.index)?;
                batch.insert(&inner.log, head.key(), log::encode_chunk(&kept).1);
            }
            for (key, value) in written {
                batch.insert(&inner.log, key, value);
            }
        }
        if let Some(hs) = hard_state {
            batch.insert(&inner.meta, META_HARD_STATE, codec::encode_hard_state(hs));
        }
        // The sync happens here, without holding `cached`.
        batch.commit().map_err(|e| inner.db_error(e))?;
        if let Some(delay) = crate::faults::sync_delay() {
            std::thread::sleep(delay);
        }
        let mut cached = inner.lock();
        cached.record_appended(entries, &runs);
        if let Some(hs) = hard_state {
            cached.hard_state = *hs;
            cached.commit_unwritten = false;
        }
        Ok(())
    }

    /// Records a hard state that differs from the durable one only in its
    /// commit index, without touching the disk: the new commit index rides
    /// along with the next `persist` batch. Losing it is safe (Raft
    /// recomputes it, and a restart resumes applying from the applied index
    /// anyway), so it must cost neither an fdatasync nor a journal write on
    /// the write path, where it sat between a write's quorum and its apply.
    /// A change of term or vote is synced as `persist` would.
    pub fn record_commit(&self, hard_state: &HardState) -> Result<(), StoreError> {
        let durable = self.hard_state();
        if (durable.term, durable.vote) != (hard_state.term, hard_state.vote) {
            return self.persist(&[], Some(hard_state));
        }
        let mut cached = self.inner.lock();
        cached.hard_state = *hard_state;
        cached.commit_unwritten = true;
        Ok(())
    }

    /// Applies a batch atomically: guest writes, session changes and the new
    /// applied position land together or not at all.
    pub fn apply(&self, batch: &ApplyBatch) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut cached = inner.lock();
        if batch.applied_index < cached.applied.0 {
            return Err(StoreError::AppliedBackwards { from: cached.applied.0, to: batch.applied_index });
        }
        let mut value_sizes = batch.writes.iter().filter_map(|write| write.value.as_ref().map(Vec::len));
        if let Some(bytes) = value_sizes.find(|&bytes| bytes > STATE_VALUE_MAX_BYTES) {
            return Err(StoreError::TooLarge { what: "a state value", bytes, limit: STATE_VALUE_MAX_BYTES });
        }
        // From the first swap into the state cache until the commit, a
        // failure leaves values in it that the store does not hold.
        let uncommitted = ClearOnFailure(&inner.state_cache);
        inner.state_cache.begin_writes();
        let mut fjall_batch = inner.db.batch();
        // What the state cache held for each written key before the batch,
        // where it held anything: the history's previous values.
        let keeps_history = inner.history_limits.keeps_history();
        let mut replaced = CachedBefore::default();
        for write in &batch.writes {
            let key = state_key(&write.state_machine, &write.key)?;
            let value = write.value.as_deref().map(codec::encode_blob);
            match &value {
                Some(value) => fjall_batch.insert(&inner.state, key.clone(), value.clone()),
                None => fjall_batch.remove(&inner.state, key.clone()),
            }
            let previous = inner.state_cache.swap(key, value);
            if let Some(previous) = previous.filter(|_| keeps_history) {
                replaced.insert((&*write.state_machine, &write.key[..]), previous);
            }
        }
        let (session_log, session_changes_at) =
            inner.record_sessions(&mut fjall_batch, batch, cached.session_log, cached.session_changes_at)?;
        for (key, value) in &batch.modules {
            match value {
                Some(value) => fjall_batch.insert(&inner.modules, key.encode()?, codec::encode_blob(value)),
                None => fjall_batch.remove(&inner.modules, key.encode()?),
            }
        }
        if let Some(membership) = &batch.membership {
            fjall_batch.insert(&inner.meta, META_CONF_STATE, codec::encode_conf_state(&membership.conf));
            fjall_batch.insert(&inner.meta, META_MEMBERS, codec::encode_members(&membership.addresses));
            fjall_batch.insert(&inner.meta, META_REMOVED, codec::encode_ids(&membership.removed));
        }
        let history = inner.record_history(
            &mut fjall_batch,
            (&batch.changes, &replaced),
            cached.history,
            &cached.history_records,
            (cached.applied.0, batch.applied_index),
        )?;
        fjall_batch.insert(&inner.meta, META_APPLIED, codec::encode_applied(batch.applied_index, batch.applied_term));
        fjall_batch.insert(&inner.meta, META_APPLY_CLOCK, codec::encode_blob(&batch.clock_ms.to_be_bytes()));
        fjall_batch.commit().map_err(|e| inner.db_error(e))?;
        uncommitted.disarm();
        inner.state_cache.committed();
        cached.applied = (batch.applied_index, batch.applied_term);
        cached.history = history.mark;
        cached.history_records.drain(..history.dropped_known);
        cached.history_records.extend(history.written);
        cached.session_log = session_log;
        cached.session_changes_at = session_changes_at;
        if let Some(membership) = &batch.membership {
            cached.conf_state = membership.conf.clone();
        }
        Ok(())
    }

    /// Drops log entries up to and including `index`, which must be applied:
    /// the state they produced is in the store, which is what a snapshot
    /// ships. The snapshot point moves to `index`.
    pub fn compact(&self, index: Index) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _writer = inner.log_writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut cached = inner.lock();
        if index < cached.first_index {
            return Ok(());
        }
        if index > cached.applied.0 {
            return Err(StoreError::InvalidCompaction {
                index,
                why: "entries past the applied index are still needed",
            });
        }
        let term = cached.term(index).ok_or(StoreError::InvalidCompaction { index, why: "index is past the log" })?;
        let snapshot = SnapshotMeta { index, term, conf_state: cached.conf_state.clone() };
        let mut batch = inner.db.batch().durability(inner.persist_mode());
        // Records wholly at or below `index` go; one that holds entries on
        // both sides stays until a later compaction passes its end.
        let last_of = |at: usize| cached.chunks.get(at + 1).map_or(cached.last_index, |next| next.first - 1);
        let dropped = (0..cached.chunks.len()).take_while(|&at| last_of(at) <= index).count();
        for chunk in cached.chunks.iter().take(dropped) {
            batch.remove(&inner.log, chunk.key());
        }
        batch.insert(&inner.meta, META_SNAPSHOT, codec::encode_snapshot_meta(&snapshot));
        batch.commit().map_err(|e| inner.db_error(e))?;
        cached.chunks.drain(..dropped);
        let first = index + 1;
        let keep_from = cached.term_runs.partition_point(|&(start, _)| start <= first).saturating_sub(1);
        cached.term_runs.drain(..keep_from);
        if let Some(run) = cached.term_runs.first_mut() {
            run.0 = run.0.max(first);
        }
        if first > cached.last_index {
            cached.term_runs.clear();
        }
        cached.first_index = first;
        cached.last_index = cached.last_index.max(index);
        cached.snapshot = snapshot;
        Ok(())
    }

    /// The durable hard state.
    pub fn hard_state(&self) -> HardState {
        self.inner.lock().hard_state
    }

    /// The durable membership.
    pub fn conf_state(&self) -> ConfState {
        self.inner.lock().conf_state.clone()
    }

    /// Index and term of the last applied entry.
    pub fn applied(&self) -> (Index, Term) {
        self.inner.lock().applied
    }

    /// The replicated clock as of the applied index (see [`ApplyBatch::clock_ms`]).
    pub fn apply_clock_ms(&self) -> Result<u64, StoreError> {
        let Some(value) = self.inner.meta.get(META_APPLY_CLOCK).map_err(|e| self.inner.db_error(e))? else {
            return Ok(0);
        };
        let bytes = self.inner.unseal(&value, || "the apply clock".to_string())?;
        let bytes: [u8; 8] =
            bytes.try_into().map_err(|_| self.inner.corrupt("the apply clock is not 8 bytes".into()))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Every client session, in client id order (read once when a node
    /// starts, and after a snapshot install): format 1's records, then the
    /// session log's checkpoint and changes on top.
    pub fn session_scan(&self) -> Result<KeyValues, StoreError> {
        let inner = &self.inner;
        let mut reader = session_log::TableReader::default();
        for guard in inner.sessions.iter() {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let value = inner.unseal(&value, || format!("session {:?}", &key[..]))?;
            reader.table.insert(key.to_vec(), value);
        }
        for guard in inner.session_log.iter() {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            reader
                .read(&key, &value)
                .map_err(|DecodeError(why)| inner.corrupt(format!("session log record {:?}: {why}", &key[..])))?;
        }
        inner.lock().session_log = reader.mark;
        Ok(reader.table.into_iter().collect())
    }

    /// Whether the next apply batch should carry a checkpoint of the
    /// session table ([`ApplyBatch::sessions_checkpoint`]).
    pub fn session_checkpoint_due(&self) -> bool {
        self.inner.lock().session_log.checkpoint_due()
    }

    /// Bytes the state cache holds now.
    pub fn state_cache_bytes(&self) -> u64 {
        self.inner.state_cache.bytes()
    }

    /// A guest's value for `key`.
    pub fn state_get(&self, state_machine: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.state_value(state_machine, key)
    }

    /// A guest's keys in `[start, end)` (to the end of its state when `end`
    /// is `None`), in order, at most `limit` of them.
    pub fn state_scan(
        &self,
        state_machine: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyValues, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.state_scan_each(state_machine, start, end, |key, value| {
            out.push((key, value));
            if out.len() >= limit { std::ops::ControlFlow::Break(()) } else { std::ops::ControlFlow::Continue(()) }
        })?;
        Ok(out)
    }

    /// Hands a guest's pairs in `[start, end)` (to the end of its state when
    /// `end` is `None`) to `visit`, in key order, one at a time, until it
    /// breaks: memory holds only what `visit` keeps.
    pub fn state_scan_each(
        &self,
        state_machine: &str,
        start: &[u8],
        end: Option<&[u8]>,
        mut visit: impl FnMut(Vec<u8>, Vec<u8>) -> std::ops::ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let prefix = state_key(state_machine, &[])?;
        let low = Bound::Included(state_key(state_machine, start)?);
        let high = match end {
            Some(end) => Bound::Excluded(state_key(state_machine, end)?),
            None => prefix_end(&prefix).map_or(Bound::Unbounded, |end| Bound::Excluded(end.into())),
        };
        for guard in self.inner.state.range::<fjall::Slice, _>((low, high)) {
            let (key, value) = guard.into_inner().map_err(|e| self.inner.db_error(e))?;
            let user_key = key[prefix.len()..].to_vec();
            let value = self.inner.unseal(&value, || format!("state key {user_key:?} of {state_machine:?}"))?;
            if visit(user_key, value).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// A consistent view of every state machine's state as applied now,
    /// for digests taken later on another thread (taking it is cheap; it
    /// pins what it saw until dropped).
    pub fn state_view(&self) -> StateView {
        StateView { view: self.inner.db.snapshot() }
    }

    /// A digest of a state machine's whole state (its own keys, without the
    /// name that prefixes them in the store, and values, in order): equal on
    /// replicas that applied the same entries, and equal for two state
    /// machines that hold the same pairs. It reads all of it: keep it off
    /// the apply thread (see [`Store::state_view`]).
    pub fn state_digest(&self, state_machine: &str) -> Result<[u8; 32], StoreError> {
        self.state_digest_in(&self.state_view(), state_machine)
    }

    /// [`Store::state_digest`] as `view` saw the state.
    pub fn state_digest_in(&self, view: &StateView, state_machine: &str) -> Result<[u8; 32], StoreError> {
        let prefix = state_key(state_machine, &[])?;
        let mut hasher = Sha256::new();
        for guard in view.view.prefix(&self.inner.state, &prefix) {
            let (key, value) = guard.into_inner().map_err(|e| self.inner.db_error(e))?;
            let user_key = &key[prefix.len()..];
            let value = self.inner.unseal(&value, || format!("state key {user_key:?}"))?;
            hasher.update((user_key.len() as u64).to_be_bytes());
            hasher.update(user_key);
            hasher.update((value.len() as u64).to_be_bytes());
            hasher.update(&value);
        }
        Ok(hasher.finalize().into())
    }

    /// The state machines that hold any state, by name, with how many keys
    /// each holds.
    pub fn state_machines_with_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for guard in self.inner.state.iter() {
            let key = guard.key().map_err(|e| self.inner.db_error(e))?;
            let name = key
                .split_first()
                .and_then(|(&len, rest)| rest.get(..len as usize))
                .and_then(|name| std::str::from_utf8(name).ok())
                .ok_or_else(|| self.inner.corrupt(format!("state key {:?} names no state machine", &key[..])))?;
            match out.last_mut() {
                Some((last, keys)) if last == name => *keys += 1,
                _ => out.push((name.to_string(), 1)),
            }
        }
        Ok(out)
    }

    /// A client's session record (reads the whole table: for tools and
    /// tests).
    pub fn session_get(&self, client: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.session_scan()?.into_iter().find_map(|(c, record)| (c == client).then_some(record)))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Cached> {
        // A panic while holding the lock leaves only cached copies of durable
        // state behind; they stay consistent because every update happens
        // after its batch committed.
        self.cached.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value of a state key as the store holds it, past the state
    /// cache (which may already hold the value of a batch about to commit).
    fn stored_state_value(&self, state_machine: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_state(state_machine, key, &state_key(state_machine, key)?)?.1)
    }

    fn state_value(&self, state_machine: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let full_key = state_key(state_machine, key)?;
        let (cached, miss) = self.state_cache.get(&full_key);
        if let Some(value) = cached {
            return Ok(value);
        }
        let (stored, value) = self.read_state(state_machine, key, &full_key)?;
        self.state_cache.fill(full_key, stored, miss);
        Ok(value)
    }

    /// The state key `full_key` (`key` of `state_machine`) as stored, and
    /// its value with the checksum checked and stripped.
    fn read_state(
        &self,
        state_machine: &str,
        key: &[u8],
        full_key: &[u8],
    ) -> Result<(Option<fjall::Slice>, Option<Vec<u8>>), StoreError> {
        let stored = self.state.get(full_key).map_err(|e| self.db_error(e))?;
        let value = stored
            .as_ref()
            .map(|v| self.unseal(v, || format!("state key {key:?} of {state_machine:?}")))
            .transpose()?;
        Ok((stored, value))
    }

    /// Adds a batch's session changes (or checkpoint) to `batch`; returns
    /// the log's mark and where its changes are, once `batch` commits.
    fn record_sessions(
        &self,
        fjall_batch: &mut fjall::OwnedWriteBatch,
        batch: &ApplyBatch,
        mut mark: SessionLogMark,
        (last_index, last_seq): (Index, u32),
    ) -> Result<(SessionLogMark, (Index, u32)), StoreError> {
        let index = batch.applied_index;
        if let Some(table) = &batch.sessions_checkpoint {
            // Everything up to this index goes (changes written at it before
            // would sort after the checkpoint), format 1's records too: the
            // checkpoint holds every session. Its own keys are not removed
            // first: a batch holds each key once.
            let parts = session_log::encode_checkpoint(index, table);
            for guard in self.session_log.range(..session_log::records_from(index + 1).to_vec()) {
                let key = guard.key().map_err(|e| self.db_error(e))?;
                if !parts.iter().any(|(part, _)| part[..] == key[..]) {
                    fjall_batch.remove(&self.session_log, key.to_vec());
                }
            }
            for guard in self.sessions.iter() {
                fjall_batch.remove(&self.sessions, guard.key().map_err(|e| self.db_error(e))?.to_vec());
            }
            mark = SessionLogMark::default();
            for (key, value) in parts {
                mark.checkpoint_bytes += (key.len() + value.len()) as u64;
                fjall_batch.insert(&self.session_log, key, value);
            }
            return Ok((mark, (index, 0)));
        }
        if batch.sessions.is_empty() {
            return Ok((mark, (last_index, last_seq)));
        }
        let seq = if last_index == index { last_seq } else { 0 };
        let key = session_log::changes_key(index, seq);
        let value = session_log::encode_changes(&batch.sessions);
        mark.changes_bytes += (key.len() + value.len()) as u64;
        fjall_batch.insert(&self.session_log, key, value);
        Ok((mark, (index, seq + 1)))
    }

    fn persist_mode(&self) -> Option<PersistMode> {
        match self.durability {
            Durability::Fsync => Some(PersistMode::SyncData),
            Durability::UnsafeNoSync => None,
        }
    }

    /// Removes every record of `keyspace` and the files that held them.
    ///
    /// fjall's `clear` alone is not enough on a member that runs for long:
    /// it leaves the dropped tables' files on disk until the next restart,
    /// and a keyspace left with no table keeps every journal it had
    /// records in from being deleted (fjall issue #288). A member that
    /// installed snapshots or received broken streams filled its disk that
    /// way. So the tables are dropped as a compaction does (their files are
    /// deleted), `clear` drops the memtables and journals the removal (a
    /// replay after a crash brings nothing back; a flush already under way
    /// is not registered), and the removal of a marker key, flushed in the
    /// background, gives the keyspace a table newer than every journal
    /// before it. Nothing here waits for a flush: an install runs it on a
    /// follower that must catch up. Callers redo it after a crash (an
    /// install's marker, the staging area at open), so a crash midway
    /// loses nothing.
    fn empty_keyspace(&self, keyspace: &Keyspace) -> Result<(), StoreError> {
        use fjall::AbstractTree;
        let db_error = |e| self.db_error(e);
        keyspace.tree.drop_range::<&[u8], _>(..).map_err(|e| db_error(fjall::Error::from(e)))?;
        keyspace.clear().map_err(db_error)?;
        keyspace.remove(EMPTIED_MARKER).map_err(db_error)?;
        keyspace.rotate_memtable().map_err(db_error)?;
        Ok(())
    }

    fn db_error(&self, source: fjall::Error) -> StoreError {
        StoreError::Db { dir: self.dir.clone(), source }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt { dir: self.dir.clone(), what }
    }

    fn unseal(&self, value: &[u8], what: impl FnOnce() -> String) -> Result<Vec<u8>, StoreError> {
        codec::unseal(value).map(<[u8]>::to_vec).map_err(|DecodeError(why)| self.corrupt(format!("{}: {why}", what())))
    }

    fn read_meta<T>(
        &self,
        key: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, StoreError> {
        let Some(value) = self.meta.get(key).map_err(|e| self.db_error(e))? else { return Ok(None) };
        decode(&value)
            .map(Some)
            .map_err(|DecodeError(why)| self.corrupt(format!("meta key {:?}: {why}", String::from_utf8_lossy(key))))
    }

    /// Rebuilds the cache from disk, verifying everything it reads. While a
    /// snapshot install is `interrupted`, the applied position may already
    /// be the snapshot's, past the log: the install's redo fixes that.
    fn recover(&self, interrupted: bool) -> Result<Cached, StoreError> {
        let hard_state = self.read_meta(META_HARD_STATE, codec::decode_hard_state)?.unwrap_or_default();
        let conf_state = self.read_meta(META_CONF_STATE, codec::decode_conf_state)?.unwrap_or_default();
        let snapshot = self.read_meta(META_SNAPSHOT, codec::decode_snapshot_meta)?.unwrap_or_default();
        let applied = self.read_meta(META_APPLIED, codec::decode_applied)?.unwrap_or((0, 0));
        // A directory from before the history holds none of it.
        let history = self
            .read_meta(history::META_HISTORY, history::decode_mark)?
            .unwrap_or(history::HistoryMark { floor: applied.0, bytes: 0 });

        let mut term_runs: Vec<(Index, Term)> = Vec::new();
        let mut chunks = VecDeque::new();
        let mut expected = snapshot.index + 1;
        let mut last_term = snapshot.term;
        for guard in self.log.iter() {
            let (key, value) = guard.into_inner().map_err(|e| self.db_error(e))?;
            let (start, entries) = log::parse_record(&key, &value)
                .map_err(|DecodeError(why)| self.corrupt(format!("log record {:?}: {why}", &key[..])))?;
            // Only the first record may reach back past the snapshot point.
            if start.first > expected || (start.first < expected && !chunks.is_empty()) {
                return Err(self.corrupt(format!("log entry {expected} is missing (found {} next)", start.first)));
            }
            chunks.push_back(start);
            for item in entries {
                let (index, bytes) =
                    item.map_err(|DecodeError(why)| self.corrupt(format!("log record at {}: {why}", start.first)))?;
                if index < expected {
                    continue;
                }
                let entry = codec::decode_entry(index, bytes)
                    .map_err(|DecodeError(why)| self.corrupt(format!("log entry {index}: {why}")))?;
                if entry.term < last_term {
                    return Err(
                        self.corrupt(format!("log entry {index} has term {} after term {last_term}", entry.term))
                    );
                }
                if term_runs.last().is_none_or(|&(_, t)| t != entry.term) {
                    term_runs.push((index, entry.term));
                }
                last_term = entry.term;
                expected += 1;
            }
        }
        let last_index = expected - 1;
        if hard_state.commit > last_index {
            return Err(self.corrupt(format!(
                "hard state says index {} is committed but the log ends at {last_index}: committed entries were lost",
                hard_state.commit
            )));
        }
        if applied.0 > last_index.max(snapshot.index) && !interrupted {
            return Err(self.corrupt(format!("applied index {} is past the end of the log ({last_index})", applied.0)));
        }
        Ok(Cached {
            first_index: snapshot.index + 1,
            last_index,
            snapshot,
            term_runs,
            chunks,
            hard_state,
            commit_unwritten: false,
            conf_state,
            applied,
            history,
            history_records: history::KnownRecords::new(),
            session_log: SessionLogMark::default(),
            session_changes_at: (0, 0),
        })
    }
}

impl LogStore for Store {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        let cached = self.inner.lock();
        Ok((cached.hard_state, cached.conf_state.clone()))
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.inner.lock().snapshot.clone())
    }

    fn first_index(&self) -> Result<Index, StorageError> {
        Ok(self.inner.lock().first_index)
    }

    fn last_index(&self) -> Result<Index, StorageError> {
        Ok(self.inner.lock().last_index)
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        let cached = self.inner.lock();
        if index == cached.snapshot.index {
            return Ok(cached.snapshot.term);
        }
        if index < cached.snapshot.index {
            return Err(StorageError::Compacted(index));
        }
        cached.term(index).ok_or(StorageError::Unavailable(index))
    }

    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        let start = {
            let cached = self.inner.lock();
            if low < cached.first_index {
                return Err(StorageError::Compacted(low));
            }
            if high > cached.last_index + 1 {
                return Err(StorageError::Unavailable(high - 1));
            }
            if low >= high {
                return Ok(Vec::new());
            }
            cached.chunk_of(low)
        };
        let Some(start) = start else {
            return Err(self.inner.corrupt(format!("log entry {low} is in no record")).into());
        };
        self.entries_from(start, low, high, max_bytes)
    }
}

impl Store {
    /// [`LogStore::entries`] from the record `start`, which held `low` when
    /// looked up: a compaction may have dropped it since.
    fn entries_from(
        &self,
        start: log::ChunkStart,
        low: Index,
        high: Index,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut total = 0u64;
        'records: for guard in self.inner.log.range(log::scan_from(start.first)..) {
            let (key, value) = guard.into_inner().map_err(|e| StorageError::from(self.inner.db_error(e)))?;
            let (_, entries) = log::parse_record(&key, &value).map_err(|DecodeError(why)| {
                StorageError::from(self.inner.corrupt(format!("log record {:?}: {why}", &key[..])))
            })?;
            for item in entries {
                let (index, bytes) = item.map_err(|DecodeError(why)| {
                    StorageError::from(self.inner.corrupt(format!("log record {:?}: {why}", &key[..])))
                })?;
                if index < low {
                    continue;
                }
                if index >= high {
                    break 'records;
                }
                let expected = low + out.len() as u64;
                if index != expected {
                    if out.is_empty() && low < self.inner.lock().first_index {
                        return Err(StorageError::Compacted(low));
                    }
                    return Err(self.inner.corrupt(format!("log entry {expected} is missing")).into());
                }
                let entry = codec::decode_entry(index, bytes).map_err(|DecodeError(why)| {
                    StorageError::from(self.inner.corrupt(format!("log entry {index}: {why}")))
                })?;
                total += entry.size_bytes();
                if !out.is_empty() && total > max_bytes {
                    break 'records;
                }
                out.push(entry);
            }
        }
        if out.is_empty() {
            // Compacted away since the check above, or lost.
            if low < self.inner.lock().first_index {
                return Err(StorageError::Compacted(low));
            }
            return Err(self.inner.corrupt(format!("log entry {low} is missing")).into());
        }
        Ok(out)
    }

    /// The entries of the log record starting at `head` that come before
    /// `before`, to write it back shortened.
    fn entries_before(&self, head: log::ChunkStart, before: Index) -> Result<Vec<Entry>, StoreError> {
        let inner = &self.inner;
        let key = head.key();
        let value = inner
            .log
            .get(&key)
            .map_err(|e| inner.db_error(e))?
            .ok_or_else(|| inner.corrupt(format!("log record at {} is missing", head.first)))?;
        let (_, entries) = log::parse_record(&key, &value)
            .map_err(|DecodeError(why)| inner.corrupt(format!("log record at {}: {why}", head.first)))?;
        let mut kept = Vec::new();
        for item in entries {
            let (index, bytes) =
                item.map_err(|DecodeError(why)| inner.corrupt(format!("log record at {}: {why}", head.first)))?;
            if index >= before {
                break;
            }
            kept.push(
                codec::decode_entry(index, bytes)
                    .map_err(|DecodeError(why)| inner.corrupt(format!("log entry {index}: {why}")))?,
            );
        }
        Ok(kept)
    }
}

/// The values a batch's writes replaced in the state cache, by state
/// machine and key, as stored (sealed); `None` for a key known to have had
/// none.
pub(super) type CachedBefore<'a> = rustc_hash::FxHashMap<(&'a str, &'a [u8]), Option<fjall::Slice>>;

/// Clears the state cache when dropped: on every way out of
/// [`Store::apply`] between its first swap and its commit.
struct ClearOnFailure<'a>(&'a state_cache::StateCache);

impl ClearOnFailure<'_> {
    /// The batch committed: the cache holds what the store does.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for ClearOnFailure<'_> {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// How many times `--memtable-bytes` the state keyspace's memtable holds.
const STATE_MEMTABLE_FACTOR: u64 = 2;

/// Tables the state keyspace's level 0 gathers before they are merged
/// into level 1 (fjall's default: 4).
const STATE_L0_TABLES: u8 = 16;

/// The state is the one keyspace whose keys are overwritten in no order,
/// so its tables are merged for real: each merge of level 0 into level 1
/// rewrites all of level 1, where the guests' state lives. Twice the
/// memtable and four times the level-0 tables per merge make those merges
/// about eight times rarer; that took a third to a half off fjall's
/// background CPU at 256 clients (~1.3 µs per write per member with 100,000
/// keys; alike with 1,000,000). The cost is up to 16 tables' filters
/// searched on a read that misses the state cache (~0.5 µs per write on the
/// apply thread), and one more memtable's bytes.
fn state_keyspace_options(options: KeyspaceCreateOptions, memtable_bytes: u64) -> KeyspaceCreateOptions {
    options
        .max_memtable_size(memtable_bytes.saturating_mul(STATE_MEMTABLE_FACTOR))
        .compaction_strategy(Arc::new(fjall::compaction::Leveled::default().with_l0_threshold(STATE_L0_TABLES)))
}

/// A state machine's key as the store keys it: `[name len][name][key]`,
/// built straight into the buffer fjall keeps (see [`codec::encode_blob`]);
/// short keys fit inside it with no allocation.
fn state_key(state_machine: &str, key: &[u8]) -> Result<fjall::Slice, StoreError> {
    if state_machine.is_empty() || state_machine.len() > STATE_MACHINE_NAME_MAX_BYTES {
        return Err(StoreError::InvalidStateMachineName(state_machine.to_string()));
    }
    if key.len() > STATE_KEY_MAX_BYTES {
        return Err(StoreError::TooLarge { what: "a state key", bytes: key.len(), limit: STATE_KEY_MAX_BYTES });
    }
    let mut prefix = [0u8; 1 + STATE_MACHINE_NAME_MAX_BYTES];
    let name = state_machine.as_bytes();
    prefix[0] = name.len() as u8;
    prefix[1..=name.len()].copy_from_slice(name);
    Ok(fjall::Slice::from(byteview::ByteView::fused(&prefix[..=name.len()], key)))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryKind;
    use bytes::Bytes;
    use snapshot::StagingStart;

    #[test]
    fn a_state_key_is_its_name_length_name_and_key_and_checked() {
        let longest_name = "n".repeat(STATE_MACHINE_NAME_MAX_BYTES);
        for name in ["kv", longest_name.as_str()] {
            for key in [&b""[..], b"k1", &[0xff; 40], &vec![7; STATE_KEY_MAX_BYTES]] {
                let laid_out = [&[name.len() as u8][..], name.as_bytes(), key].concat();
                assert_eq!(&*state_key(name, key).expect("a valid key"), laid_out.as_slice());
            }
        }
        let too_long = "n".repeat(STATE_MACHINE_NAME_MAX_BYTES + 1);
        assert!(matches!(state_key(&too_long, b"k"), Err(StoreError::InvalidStateMachineName(_))));
        assert!(matches!(state_key("", b"k"), Err(StoreError::InvalidStateMachineName(_))));
        let oversized = vec![0; STATE_KEY_MAX_BYTES + 1];
        assert!(matches!(state_key("kv", &oversized), Err(StoreError::TooLarge { .. })));
    }

    fn entry(index: Index, term: Term) -> Entry {
        Entry { term, index, kind: EntryKind::Normal, data: Bytes::from(vec![index as u8; 40]) }
    }

    fn options() -> StoreOptions {
        StoreOptions { durability: Durability::UnsafeNoSync, ..StoreOptions::default() }
    }

    /// Polls `check` until it passes (fjall flushes, merges and drops
    /// journals on its own threads); fails with its last complaint after
    /// `seconds`.
    fn eventually(seconds: u64, mut check: impl FnMut() -> Result<(), String>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        while let Err(complaint) = check() {
            assert!(std::time::Instant::now() < deadline, "after {seconds} s: {complaint}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// fjall keeps a journal until every keyspace with records in it has a
    /// table at least as new; a keyspace cleared with fjall's `clear` has
    /// none, and every journal after it stayed on disk (fjall issue #288).
    #[test]
    fn an_emptied_keyspace_keeps_no_journal_alive() {
        use fjall::AbstractTree;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &Identity::new("journals", 1), &options()).expect("open");
        let inner = &store.inner;
        let journals = || {
            std::fs::read_dir(dir.path().join("db"))
                .expect("db folder")
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().ends_with(".jnl"))
                .count()
        };
        let value = vec![7u8; 1 << 20];
        let fill = |from: usize, count: usize| {
            for i in from..from + count {
                inner.state.insert(format!("key-{i}"), &value).expect("insert");
            }
            inner.state.rotate_memtable_and_wait().expect("flush");
        };
        // Unflushed when the first journal is sealed: that journal needs it.
        inner.staging.insert(b"staged", &value).expect("stage");
        fill(0, 80);
        let before = inner.state.tree.get_highest_persisted_seqno().expect("state flushed");
        inner.empty_keyspace(&inner.staging).expect("empty");
        assert!(inner.staging.is_empty().expect("read"));
        // The marker is flushed in the background.
        eventually(10, || match inner.staging.tree.get_highest_persisted_seqno() {
            Some(seqno) if seqno > before => Ok(()),
            emptied => Err(format!(
                "the emptied keyspace has no table newer than what came before it ({emptied:?} vs {before})"
            )),
        });
        fill(80, 256);
        // Over the budget, fjall flushes the keyspaces that hold the oldest
        // journal in the background and drops it after: on a busy machine the
        // count comes down a moment after the last write, not at it.
        eventually(10, || match journals() {
            ..=2 => Ok(()),
            journals => Err(format!("{journals} journals after 336 MiB of writes, with a 64 MiB budget")),
        });
    }

    /// The state keyspace takes twice the memtable of the others and merges
    /// level 0 only at 16 tables; `modules` (fjall's defaults apart from
    /// the memtable) shows that the background worker acted on the same
    /// requests meanwhile, so the state's not acting is its settings.
    #[test]
    fn the_state_keyspace_flushes_and_merges_level_0_less_often_than_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = StoreMemory { memtable_bytes: MEMTABLE_BYTES_MIN, ..StoreMemory::default() };
        let store = Store::open(dir.path(), &Identity::new("state-tables", 1), &StoreOptions { memory, ..options() })
            .expect("open");
        let inner = &store.inner;
        let wait_until = |what: &str, done: &dyn Fn() -> bool| {
            eventually(20, || if done() { Ok(()) } else { Err(format!("{what} did not happen")) });
        };
        // One and a half memtables of the others: one worker thread takes
        // the state's rotation request, had there been one, before the
        // control's.
        let value = vec![3u8; 64 << 10];
        for keyspace in [&inner.state, &inner.modules] {
            for i in 0..24 {
                keyspace.insert(format!("fill-{i}"), &value).expect("insert");
            }
        }
        wait_until("the control keyspace's flush", &|| inner.modules.table_count() > 0);
        assert_eq!((inner.state.sealed_memtable_count(), inner.state.table_count()), (0, 0), "1.5 MiB flushed");

        // Tables whose keys overlap, as random writes make them (disjoint
        // ones are moved down whole, never merged).
        let add_l0_tables = |keyspace: &Keyspace, count: usize| {
            for i in 0..count {
                for key in ["a", "z"] {
                    keyspace.insert(key, format!("{i}")).expect("insert");
                }
                keyspace.rotate_memtable_and_wait().expect("flush");
            }
        };
        add_l0_tables(&inner.state, 8);
        add_l0_tables(&inner.modules, 8);
        wait_until("the control keyspace's merge of level 0", &|| inner.modules.l0_table_count() < 5);
        // The first table may have been moved down whole into the empty
        // level below; fjall's default would have merged the rest at 4.
        let state_l0 = inner.state.l0_table_count();
        assert!(state_l0 >= 7, "level 0 merged at {state_l0} tables, below 16");
        add_l0_tables(&inner.state, 10);
        wait_until("the state's merge of level 0 past 16 tables", &|| inner.state.l0_table_count() < 16);
    }

    #[test]
    fn a_format_1_log_of_one_record_per_entry_reads_appends_truncates_and_compacts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::new("old", 1);
        {
            let store = Store::open(dir.path(), &identity, &options()).expect("open");
            // What format 1 wrote: each entry under its plain index.
            let mut batch = store.inner.db.batch();
            for index in 1..=10 {
                batch.insert(&store.inner.log, codec::log_key(index), codec::encode_entry(&entry(index, 1)));
            }
            let hard_state = HardState { term: 1, vote: Some(1), commit: 6 };
            batch.insert(&store.inner.meta, META_HARD_STATE, codec::encode_hard_state(&hard_state));
            batch.commit().expect("commit");
        }
        let store = Store::open(dir.path(), &identity, &options()).expect("reopen");
        let all: Vec<Entry> = (1..=10).map(|i| entry(i, 1)).collect();
        assert_eq!(store.entries(1, 11, u64::MAX).expect("read"), all);
        assert_eq!(store.entries(4, 7, u64::MAX).expect("read"), all[3..6]);

        // Appended after, and replacing a suffix that starts among the old records.
        store.persist(&(11..=14).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).expect("append");
        let replacement: Vec<Entry> = (8..=12).map(|i| entry(i, 2)).collect();
        store.persist(&replacement, None).expect("replace a suffix");
        let expected: Vec<Entry> = all[..7].iter().cloned().chain(replacement.iter().cloned()).collect();
        assert_eq!(store.entries(1, 13, u64::MAX).expect("read"), expected);
        assert_eq!(store.last_index().expect("last"), 12);

        store.apply(&ApplyBatch { applied_index: 9, applied_term: 2, ..ApplyBatch::default() }).expect("apply up to 9");
        store.compact(5).expect("compact among the old records");
        drop(store);
        let store = Store::open(dir.path(), &identity, &options()).expect("reopen after compaction");
        assert_eq!(store.first_index().expect("first"), 6);
        assert_eq!(store.entries(6, 13, u64::MAX).expect("read"), expected[5..]);
        assert_eq!(store.term(9).expect("term"), 2);
        assert!(matches!(store.entries(5, 7, u64::MAX), Err(StorageError::Compacted(5))));
    }

    #[test]
    fn cached_state_is_the_committed_state_through_writes_deletes_and_a_snapshot_install() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |key: &str, value: Option<&str>| StateWrite {
            state_machine: "kv".into(),
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
        };
        let apply = |store: &Store, index: Index, writes: Vec<StateWrite>| {
            store.persist(&[entry(index, 1)], None).expect("persist");
            store
                .apply(&ApplyBatch { applied_index: index, applied_term: 1, writes, ..ApplyBatch::default() })
                .expect("apply");
        };
        let leader = Store::open(&dir.path().join("leader"), &Identity::new("c", 1), &options()).expect("open");
        leader.bootstrap(&ConfState::with_voters([1, 2]), &Default::default()).expect("bootstrap");
        apply(&leader, 1, vec![write("a", Some("from the leader"))]);
        let follower = Store::open(&dir.path().join("follower"), &Identity::new("c", 2), &options()).expect("open");
        apply(&follower, 1, vec![write("a", Some("mine")), write("b", Some("gone soon"))]);
        assert_eq!(follower.state_get("kv", b"a").expect("read"), Some(b"mine".to_vec()));
        assert_eq!(follower.state_get("kv", b"c").expect("read"), None, "cached as absent");
        apply(&follower, 2, vec![write("b", None)]);
        assert_eq!(follower.state_get("kv", b"b").expect("read"), None, "a delete goes through");
        assert!(follower.state_cache_bytes() > 0, "those reads were cached");

        let reader = leader.snapshot_reader().expect("reader");
        let StagingStart::Fresh(mut staging) = follower.begin_staging(reader.meta().clone()).expect("staging") else {
            panic!("not staged yet")
        };
        reader.for_each_chunk(1 << 20, |chunk| staging.write_chunk(&chunk).is_ok()).expect("stream");
        follower.install_snapshot(&staging.finish().expect("finish")).expect("install");
        assert_eq!(follower.state_get("kv", b"a").expect("read"), Some(b"from the leader".to_vec()));
        assert_eq!(follower.state_get("kv", b"b").expect("read"), None);
    }

    #[test]
    fn sessions_are_changes_on_a_checkpoint_that_replaces_everything_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::new("sessions", 1);
        let apply =
            |store: &Store, index: Index, changes: Vec<(&str, Option<&str>)>, checkpoint: Option<Vec<(&str, &str)>>| {
                let sessions = SessionChanges::of_text(&changes);
                let sessions_checkpoint = checkpoint
                    .map(|all| all.into_iter().map(|(c, r)| (c.as_bytes().to_vec(), r.as_bytes().to_vec())).collect());
                if store.last_index().expect("last") < index {
                    store.persist(&[entry(index, 1)], None).expect("persist");
                }
                let batch = ApplyBatch {
                    applied_index: index,
                    applied_term: 1,
                    sessions,
                    sessions_checkpoint,
                    ..ApplyBatch::default()
                };
                store.apply(&batch).expect("apply");
            };
        let table = |store: &Store| -> Vec<(String, String)> {
            store
                .session_scan()
                .expect("scan")
                .into_iter()
                .map(|(c, r)| (String::from_utf8(c).expect("utf-8"), String::from_utf8(r).expect("utf-8")))
                .collect()
        };
        {
            let store = Store::open(dir.path(), &identity, &options()).expect("open");
            // Format 1's records: one per client, in `sessions`.
            for (client, record) in [("old-a", "a0"), ("old-b", "b0")] {
                store.inner.sessions.insert(client, codec::encode_blob(record.as_bytes())).expect("insert");
            }
            apply(&store, 1, vec![("old-a", Some("a1")), ("new", Some("n1"))], None);
            apply(&store, 2, vec![("old-b", None)], None);
            // Two batches at one index, the second a checkpoint: the first's
            // changes must not outlive it.
            apply(&store, 3, vec![("new", Some("n3"))], None);
            assert_eq!(table(&store), [("new".into(), "n3".into()), ("old-a".into(), "a1".into())]);
        }
        let store = Store::open(dir.path(), &identity, &options()).expect("reopen");
        assert_eq!(table(&store), [("new".into(), "n3".into()), ("old-a".into(), "a1".into())]);
        apply(&store, 3, Vec::new(), Some(vec![("new", "n3x"), ("old-a", "a1")]));
        apply(&store, 4, vec![("late", Some("l4"))], None);
        assert_eq!(store.inner.sessions.iter().count(), 0, "format 1's records are gone");
        let records: Vec<Vec<u8>> = store.inner.session_log.iter().map(|g| g.key().expect("key").to_vec()).collect();
        assert_eq!(records.len(), 2, "the checkpoint's one part and the changes after it: {records:?}");
        drop(store);
        let store = Store::open(dir.path(), &identity, &options()).expect("reopen");
        assert_eq!(
            table(&store),
            [("late".into(), "l4".into()), ("new".into(), "n3x".into()), ("old-a".into(), "a1".into())]
        );
        assert!(!store.session_checkpoint_due(), "a few bytes of changes do not call for one");
    }

    #[test]
    fn a_read_racing_a_compaction_is_told_compacted_not_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &Identity::new("race", 1), &options()).expect("open");
        for start in (1..=60).step_by(6) {
            store.persist(&(start..start + 6).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).expect("append");
        }
        store.apply(&ApplyBatch { applied_index: 60, applied_term: 1, ..ApplyBatch::default() }).expect("apply");
        // The reader looked its record up before the compaction removed it.
        let start = store.inner.lock().chunk_of(8).expect("a record holds 8");
        store.compact(30).expect("compact");
        assert!(store.inner.log.get(start.key()).expect("get").is_none(), "the record is gone");
        assert!(matches!(store.entries_from(start, 8, 10, u64::MAX), Err(StorageError::Compacted(8))));
        assert!(matches!(store.entries(8, 10, u64::MAX), Err(StorageError::Compacted(8))));
        assert_eq!(store.entries(31, 40, u64::MAX).expect("read").len(), 9);
    }
}
