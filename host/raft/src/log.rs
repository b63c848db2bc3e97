//! The core's view of the log: the durable part (read through [`LogStore`])
//! followed by the unstable tail (entries appended in memory that the driver
//! has not yet made durable), plus the commit and apply cursors.
//!
//! Invariants: `applied <= committed <= last_index()`; unstable entries are
//! contiguous from `unstable_offset`; durable entries at or after
//! `unstable_offset` are stale (about to be overwritten) and never read.

use super::log_store::{LogStore, StorageError, take_within_bytes};
use super::types::{Entry, Index, SnapshotMeta, Term};

/// The log as the consensus core sees it.
pub struct RaftLog<S: LogStore> {
    store: S,
    unstable: Vec<Entry>,
    /// Index of `unstable[0]`, or of the next entry to append when empty.
    unstable_offset: Index,
    committed: Index,
    /// Highest index handed to the driver to apply.
    applied: Index,
    /// A snapshot this log was restored from that the driver has not yet
    /// installed: the log starts right after it.
    unstable_snapshot: Option<SnapshotMeta>,
}

impl<S: LogStore> RaftLog<S> {
    /// Opens the log over `store`, with the driver's last applied index.
    pub fn new(store: S, committed: Index, applied: Index) -> Result<RaftLog<S>, StorageError> {
        let first = store.first_index()?;
        let last = store.last_index()?;
        let snapshot_index = first - 1;
        // Applied entries were committed even if the commit index was not yet
        // durable, and the snapshot covers only committed entries.
        let committed = committed.max(applied).max(snapshot_index);
        assert!(committed <= last, "commit index {committed} is past the last durable index {last}");
        Ok(RaftLog {
            store,
            unstable: Vec::new(),
            unstable_offset: last + 1,
            committed,
            applied: applied.max(snapshot_index),
            unstable_snapshot: None,
        })
    }

    /// The durable store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Mutable access to the durable store, for drivers that keep it inside
    /// the core (the simulator, tests and the demo).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn committed(&self) -> Index {
        self.committed
    }

    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Index of the first entry still available (after the snapshot).
    pub fn first_index(&self) -> Result<Index, StorageError> {
        match &self.unstable_snapshot {
            Some(snapshot) => Ok(snapshot.index + 1),
            None => self.store.first_index(),
        }
    }

    /// The snapshot to ship to a follower that needs compacted entries.
    pub fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        match &self.unstable_snapshot {
            Some(snapshot) => Ok(snapshot.clone()),
            None => self.store.snapshot_meta(),
        }
    }

    /// A restored snapshot the driver has yet to install.
    pub fn unstable_snapshot(&self) -> Option<&SnapshotMeta> {
        self.unstable_snapshot.as_ref()
    }

    /// Replaces the whole log with `snapshot`: everything up to its index is
    /// committed and applied, and the log continues after it. The driver
    /// installs the snapshot's data before anything that follows.
    pub fn restore(&mut self, snapshot: SnapshotMeta) {
        assert!(
            snapshot.index > self.committed,
            "restoring snapshot {} would move the commit index {} back",
            snapshot.index,
            self.committed
        );
        self.unstable.clear();
        self.unstable_offset = snapshot.index + 1;
        self.committed = snapshot.index;
        self.applied = snapshot.index;
        self.unstable_snapshot = Some(snapshot);
    }

    /// Marks the restored snapshot at `index` as installed by the driver.
    pub fn stable_snapshot_to(&mut self, index: Index) {
        if self.unstable_snapshot.as_ref().is_some_and(|s| s.index == index) {
            self.unstable_snapshot = None;
        }
    }

    pub fn last_index(&self) -> Result<Index, StorageError> {
        if self.unstable.is_empty() {
            Ok(self.unstable_offset - 1)
        } else {
            Ok(self.unstable_offset + self.unstable.len() as u64 - 1)
        }
    }

    /// The last index that is durable and still part of this log.
    pub fn persisted_index(&self) -> Index {
        self.unstable_offset - 1
    }

    pub fn last_term(&self) -> Result<Term, StorageError> {
        self.term(self.last_index()?)
    }

    /// Term of the entry at `index`; index 0 has term 0.
    pub fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index == 0 {
            return Ok(0);
        }
        if let Some(snapshot) = &self.unstable_snapshot {
            if index == snapshot.index {
                return Ok(snapshot.term);
            }
            if index < snapshot.index {
                return Err(StorageError::Compacted(index));
            }
        }
        if index >= self.unstable_offset {
            return self
                .unstable
                .get((index - self.unstable_offset) as usize)
                .map(|e| e.term)
                .ok_or(StorageError::Unavailable(index));
        }
        self.store.term(index)
    }

    /// Whether the entry at `index` exists and has `term`. A compacted or
    /// missing entry does not match; a failing store is an error.
    pub fn matches(&self, index: Index, term: Term) -> Result<bool, StorageError> {
        match self.term(index) {
            Ok(t) => Ok(t == term),
            Err(StorageError::Compacted(_) | StorageError::Unavailable(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Raft §5.4.1: a log is at least as up to date as ours if its last term is
    /// higher, or the same with an index at least as high.
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> Result<bool, StorageError> {
        let our_term = self.last_term()?;
        Ok(last_term > our_term || (last_term == our_term && last_index >= self.last_index()?))
    }

    /// Entries in `[low, high)` within `max_bytes` (at least one if any).
    pub fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if low >= high {
            return Ok(Vec::new());
        }
        let last = self.last_index()?;
        if high > last + 1 {
            return Err(StorageError::Unavailable(high - 1));
        }
        if low < self.first_index()? {
            return Err(StorageError::Compacted(low));
        }
        let mut out = Vec::new();
        if low < self.unstable_offset {
            let stable_high = high.min(self.unstable_offset);
            out = self.store.entries(low, stable_high, max_bytes)?;
            let got = out.len() as u64;
            if low + got < stable_high || stable_high == high {
                // Either the byte budget ran out inside the durable part, or
                // the range ended there.
                return Ok(out);
            }
        }
        let used: u64 = out.iter().map(Entry::size_bytes).sum();
        let start = low.max(self.unstable_offset);
        let from = (start - self.unstable_offset) as usize;
        let to = (high - self.unstable_offset) as usize;
        if out.is_empty() {
            return Ok(take_within_bytes(&self.unstable[from..to], max_bytes));
        }
        for entry in &self.unstable[from..to] {
            if used + entry.size_bytes() > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    /// Appends entries that start at most one past the end, replacing any
    /// conflicting suffix. Returns the new last index.
    pub fn append(&mut self, entries: &[Entry]) -> Result<Index, StorageError> {
        let Some(first) = entries.first() else { return self.last_index() };
        let after = first.index - 1;
        assert!(
            after >= self.committed,
            "appending at {} would overwrite committed index {}",
            first.index,
            self.committed
        );
        assert!(after <= self.last_index()?, "appending at {} leaves a gap after {}", first.index, self.last_index()?);
        if after + 1 < self.unstable_offset {
            // The new entries replace part of the durable log: they all become
            // unstable and the driver overwrites the durable tail.
            self.unstable.clear();
            self.unstable_offset = after + 1;
        } else {
            self.unstable.truncate((after + 1 - self.unstable_offset) as usize);
        }
        self.unstable.extend_from_slice(entries);
        self.last_index()
    }

    /// The AppendEntries receiver rule (Raft §5.3): if our log has
    /// `(prev_index, prev_term)`, keep the matching prefix of `entries`, append
    /// the rest, and advance the commit index up to the last new entry.
    /// Returns the index of the last entry now known to match the leader, or
    /// `None` when `prev` does not match.
    pub fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        leader_commit: Index,
        entries: &[Entry],
    ) -> Result<Option<Index>, StorageError> {
        if !self.matches(prev_index, prev_term)? {
            return Ok(None);
        }
        let last_new = prev_index + entries.len() as u64;
        let conflict = self.find_conflict(entries)?;
        if conflict != 0 {
            assert!(
                conflict > self.committed,
                "entry {conflict} conflicts with the committed prefix up to {}",
                self.committed
            );
            let skip = (conflict - prev_index - 1) as usize;
            self.append(&entries[skip..])?;
        }
        // Only entries up to `last_new` are known to match; anything after may
        // be a stale suffix from an older term.
        self.commit_to(leader_commit.min(last_new));
        Ok(Some(last_new))
    }

    /// Index of the first entry in `entries` that is missing or has another
    /// term in our log; 0 when all are present.
    fn find_conflict(&self, entries: &[Entry]) -> Result<Index, StorageError> {
        for entry in entries {
            if !self.matches(entry.index, entry.term)? {
                return Ok(entry.index);
            }
        }
        Ok(0)
    }

    /// The largest index `<= index` whose term is `<= term`, with its term.
    /// Used on both sides of fast backtracking: every entry between the result
    /// and `index` has a term above `term`, so none of them can match a log
    /// whose entry at `index` has `term`.
    pub fn find_conflict_by_term(&self, index: Index, term: Term) -> Result<(Index, Term), StorageError> {
        let mut index = index.min(self.last_index()?);
        loop {
            match self.term(index) {
                Ok(t) if t > term => index -= 1,
                Ok(t) => return Ok((index, t)),
                // Compacted entries are committed, so they match everywhere.
                Err(StorageError::Compacted(_)) => return Ok((index, 0)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Advances the commit index; never moves it back.
    pub fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            let last = self.last_index().unwrap_or(0);
            assert!(index <= last, "commit index {index} is past the last index {last}");
            self.committed = index;
        }
    }

    /// Commits `index` if it is newer and its entry is from `term` (Raft §5.4.2:
    /// a leader commits only entries of its own term by counting replicas).
    pub fn maybe_commit(&mut self, index: Index, term: Term) -> Result<bool, StorageError> {
        if index > self.committed && self.term(index)? == term {
            self.commit_to(index);
            return Ok(true);
        }
        Ok(false)
    }

    /// Entries appended in memory and not yet durable.
    pub fn unstable_entries(&self) -> &[Entry] {
        &self.unstable
    }

    /// Marks entries up to `(index, term)` as durable. Does nothing if the
    /// unstable tail was replaced in the meantime, since then the durable copy
    /// is stale.
    pub fn stable_to(&mut self, index: Index, term: Term) {
        if index < self.unstable_offset {
            return;
        }
        let slot = (index - self.unstable_offset) as usize;
        if self.unstable.get(slot).map(|e| e.term) == Some(term) {
            self.unstable.drain(..=slot);
            self.unstable_offset = index + 1;
        }
    }

    /// Whether committed entries are waiting to be applied.
    pub fn has_next_committed(&self) -> bool {
        self.committed > self.applied
    }

    /// The next committed entries to apply, within `max_bytes` (at least one).
    pub fn next_committed(&self, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if !self.has_next_committed() {
            return Ok(Vec::new());
        }
        self.entries(self.applied + 1, self.committed + 1, max_bytes)
    }

    /// Records that entries up to `index` were handed out for applying.
    pub fn applied_to(&mut self, index: Index) {
        assert!(index <= self.committed, "applied index {index} is past the commit index {}", self.committed);
        if index > self.applied {
            self.applied = index;
        }
    }
}
