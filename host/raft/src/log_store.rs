//! The read side of durable storage, as the core sees it.
//!
//! The driver owns writing: it appends the entries and hard state of each
//! `Ready` to its durable store and only then calls `advance()`. The core reads
//! back through [`LogStore`] what it no longer keeps in memory. `MemLogStore` is
//! the in-memory implementation used by the simulator, the tests, the benchmark
//! and the demo; the node implements the trait on fjall.

use super::types::{ConfState, Entry, HardState, Index, SnapshotMeta, Term};
use thiserror::Error;

/// Why a read from the log store failed.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The requested index is at or below the snapshot and its entry is gone.
    #[error("log index {0} is compacted into a snapshot")]
    Compacted(Index),
    /// The requested index is past the end of the log.
    #[error("log index {0} is past the end of the log")]
    Unavailable(Index),
    /// The store itself failed (I/O, corruption). Fatal for the node.
    #[error("log store failed: {0}")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Read access to the durable log and state.
///
/// Invariants an implementation keeps: entries are contiguous from
/// `first_index()` to `last_index()`; `term(first_index() - 1)` answers the
/// snapshot's term; an empty log has `first_index() == last_index() + 1`.
pub trait LogStore {
    /// The durable hard state and membership, read once when the core starts.
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError>;
    /// The snapshot the log starts after (index 0 when there is none).
    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError>;
    /// Index of the first entry still in the log.
    fn first_index(&self) -> Result<Index, StorageError>;
    /// Index of the last entry in the log (the snapshot index when empty).
    fn last_index(&self) -> Result<Index, StorageError>;
    /// Term of the entry at `index`, for `first_index() - 1 ..= last_index()`.
    fn term(&self, index: Index) -> Result<Term, StorageError>;
    /// Entries in `[low, high)`, stopping once their total `size_bytes` passes
    /// `max_bytes` but always returning at least one entry when `low < high`.
    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError>;
}

/// A log store kept in memory: the whole durable state of a simulated node.
#[derive(Clone, Debug, Default)]
pub struct MemLogStore {
    hard_state: HardState,
    /// The membership as of the applied index (what a restart starts from).
    conf_state: ConfState,
    snapshot: SnapshotMeta,
    /// `entries[i]` has index `snapshot.index + 1 + i`.
    entries: Vec<Entry>,
}

impl MemLogStore {
    /// A new, empty store for a node of a cluster bootstrapped with `conf`.
    pub fn new_with_conf_state(conf: ConfState) -> MemLogStore {
        MemLogStore {
            conf_state: conf.clone(),
            snapshot: SnapshotMeta { conf_state: conf, ..SnapshotMeta::default() },
            ..MemLogStore::default()
        }
    }

    /// Makes the membership after an applied change durable.
    pub fn set_conf_state(&mut self, conf: ConfState) {
        self.conf_state = conf;
    }

    /// Drops entries up to and including `index`, which the driver has
    /// applied while the membership was `conf`: the snapshot point moves there.
    pub fn compact(&mut self, index: Index, conf: ConfState) {
        if index <= self.snapshot.index {
            return;
        }
        let term = self.term(index).expect("compacting inside the log");
        let drop = (index - self.snapshot.index) as usize;
        self.entries.drain(..drop);
        self.snapshot = SnapshotMeta { index, term, conf_state: conf };
    }

    /// Replaces the whole log by a snapshot received from the leader.
    pub fn install_snapshot(&mut self, snapshot: SnapshotMeta) {
        self.entries.clear();
        self.conf_state = snapshot.conf_state.clone();
        self.hard_state.commit = self.hard_state.commit.max(snapshot.index);
        self.snapshot = snapshot;
    }

    /// Makes `hard_state` durable.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// The durable hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Appends `new` (a `Ready`'s entries), first dropping any existing suffix
    /// that starts at or after the first new index: the core only hands out
    /// entries that replace a conflicting tail, never ones that leave a gap.
    pub fn append(&mut self, new: &[Entry]) {
        let Some(first) = new.first() else { return };
        let offset = self.snapshot.index + 1;
        assert!(
            first.index >= offset,
            "append at {} would overwrite the snapshot at {}",
            first.index,
            self.snapshot.index
        );
        let keep = (first.index - offset) as usize;
        assert!(
            keep <= self.entries.len(),
            "append at {} leaves a gap after {}",
            first.index,
            offset + self.entries.len() as u64 - 1
        );
        self.entries.truncate(keep);
        self.entries.extend_from_slice(new);
    }

    /// All entries currently in the store.
    pub fn all_entries(&self) -> &[Entry] {
        &self.entries
    }
}

impl LogStore for MemLogStore {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        Ok((self.hard_state, self.conf_state.clone()))
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot.clone())
    }

    fn first_index(&self) -> Result<Index, StorageError> {
        Ok(self.snapshot.index + 1)
    }

    fn last_index(&self) -> Result<Index, StorageError> {
        Ok(self.snapshot.index + self.entries.len() as u64)
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.snapshot.index {
            return Err(StorageError::Compacted(index));
        }
        let slot = (index - self.snapshot.index - 1) as usize;
        self.entries.get(slot).map(|e| e.term).ok_or(StorageError::Unavailable(index))
    }

    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if low <= self.snapshot.index {
            return Err(StorageError::Compacted(low));
        }
        let last = self.snapshot.index + self.entries.len() as u64;
        if high > last + 1 {
            return Err(StorageError::Unavailable(high - 1));
        }
        let start = (low - self.snapshot.index - 1) as usize;
        let end = (high - self.snapshot.index - 1) as usize;
        Ok(take_within_bytes(&self.entries[start..end], max_bytes))
    }
}

/// The longest prefix of `entries` within `max_bytes`, but never empty when
/// `entries` is not: one oversized entry must still be able to move.
pub(crate) fn take_within_bytes(entries: &[Entry], max_bytes: u64) -> Vec<Entry> {
    let mut total = 0u64;
    let mut count = 0;
    for entry in entries {
        total += entry.size_bytes();
        if count > 0 && total > max_bytes {
            break;
        }
        count += 1;
    }
    entries[..count].to_vec()
}
