//! The change history: every guest write a member applies, with the value
//! it replaced, kept by log index so that watchers can be served from the
//! store, from any index the history still holds, at their own pace.
//!
//! Layout, in the `history` keyspace: one record per applied batch that
//! changed anything, under the first and last index of its changes,
//! ```text
//! first (u64 BE) last (u64 BE) -> checksummed [count u32] count x change
//! change: [index u64][len][state machine][key len u32][key]
//!         [0 | 1 value len u32 value][0 | 1 prev len u32 prev]
//! ```
//! in apply order; a change's place among those of its index is its `seq`.
//! In `meta`, `history` -> (floor, bytes): the history holds every change
//! at an index above the floor, and its records take `bytes`. Directories
//! of format 1 hold one record per change under `index (u64 BE) seq (u32
//! BE)`, a change without the index; they are read alike and compacted away.
//!
//! One record per batch rather than per change is what keeps the history
//! cheap in an LSM tree, where each record costs a memtable insert, a place
//! in a flushed table and a tombstone, whatever its size.
//!
//! The records of a batch of applied entries land in the same atomic batch
//! as the writes themselves ([`Store::apply`]), so the history never lags or
//! leads the state. They are compacted there too, whole records at a time,
//! oldest first, to the configured number of indexes and bytes; the store
//! remembers the records it wrote, so compaction reads back only records
//! from before it opened. The history travels in snapshots and backups, so
//! a member that installs one serves the same watches as the leader that
//! sent it.
//!
//! The history is not replicated state: two members may keep different
//! lengths of it (their limits may differ), and state digests ignore it.

use super::codec::{self, DecodeError};
use super::{Inner, META_APPLIED, Store, StoreError};
use crate::raft::Index;
use fjall::Readable;
use std::collections::VecDeque;

/// Key of the history's mark in `meta`.
pub(super) const META_HISTORY: &[u8] = b"history";

/// How much history a member keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Log indexes of changes kept behind the applied index (0 keeps none:
    /// nothing can be watched).
    pub entries: u64,
    /// Bytes of records kept: past this the oldest indexes go first.
    pub bytes: u64,
}

impl Default for HistoryLimits {
    fn default() -> HistoryLimits {
        HistoryLimits { entries: 100_000, bytes: 64 << 20 }
    }
}

impl HistoryLimits {
    /// Whether any history is kept.
    pub fn keeps_history(&self) -> bool {
        self.entries > 0 && self.bytes > 0
    }
}

/// Where the history starts and how large it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct HistoryMark {
    /// Every change at an index above this is held.
    pub floor: Index,
    pub bytes: u64,
}

/// Records deleted per applied batch at most: compaction keeps pace with
/// appends without a pause of its own.
const COMPACT_RECORDS_PER_BATCH: usize = 4096;

/// What one stored record covers: its changes' first and last index and
/// the bytes of its key and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RecordSpan {
    pub first: Index,
    pub last: Index,
    pub bytes: u64,
    /// A format 1 record: one change, at this `seq` of `first`.
    legacy_seq: Option<u32>,
}

impl RecordSpan {
    fn key(&self) -> Vec<u8> {
        match self.legacy_seq {
            Some(seq) => legacy_key(self.first, seq).to_vec(),
            None => record_key(self.first, self.last).to_vec(),
        }
    }
}

/// Records this store wrote since it opened (or since a snapshot replaced
/// the history), oldest first.
pub(super) type KnownRecords = VecDeque<RecordSpan>;

/// What [`Inner::record_history`] changes once its batch commits.
#[derive(Debug)]
pub(super) struct HistoryUpdate {
    pub mark: HistoryMark,
    /// Known records compacted away (from the front).
    pub dropped_known: usize,
    pub written: Option<RecordSpan>,
}

/// Indexes the history may run over its limit before compaction starts, so
/// that it runs in steps rather than on every batch.
const COMPACT_SLACK_ENTRIES: u64 = 256;

/// One change to one key, as a watcher sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The log index of the entry that made it.
    pub index: Index,
    pub state_machine: String,
    pub key: Vec<u8>,
    /// The new value; `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// The value before the change; `None` if the key had none.
    pub previous: Option<Vec<u8>>,
}

impl Change {
    /// Bytes of keys and values it carries.
    pub fn bytes(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len) + self.previous.as_ref().map_or(0, Vec::len)
    }
}

/// Which changes a watcher wants: one state machine's keys in
/// `[start, end)` (to the end of its keys when `end` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryFilter {
    pub state_machine: String,
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl HistoryFilter {
    /// Every key of `state_machine` that starts with `prefix`.
    pub fn prefix(state_machine: &str, prefix: &[u8]) -> HistoryFilter {
        HistoryFilter {
            state_machine: state_machine.to_string(),
            start: prefix.to_vec(),
            end: super::prefix_end(prefix).filter(|_| !prefix.is_empty()),
        }
    }

    fn matches(&self, state_machine: &[u8], key: &[u8]) -> bool {
        state_machine == self.state_machine.as_bytes()
            && key >= self.start.as_slice()
            && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// A position in the history: the next record to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistoryPosition {
    pub index: Index,
    pub seq: u32,
}

impl HistoryPosition {
    /// The first record of `index`.
    pub fn at(index: Index) -> HistoryPosition {
        HistoryPosition { index, seq: 0 }
    }
}

/// How much one page may hold.
#[derive(Clone, Copy, Debug)]
pub struct PageLimits {
    /// A page ends at the first index boundary past this many changes or
    /// bytes...
    pub changes: usize,
    pub bytes: usize,
    /// ...or past this many records read (matching or not), so a narrow
    /// filter over a long history still answers in bounded time.
    pub scanned: usize,
    /// A page ends inside one index only past this many bytes (one entry's
    /// changes larger than a message).
    pub hard_bytes: usize,
}

/// What one read of the history found.
#[derive(Debug)]
pub enum HistoryRead {
    Page(HistoryPage),
    /// The history no longer holds changes at the index asked for: only
    /// those above `floor`.
    Compacted {
        floor: Index,
    },
}

/// Matching changes from one position on, in log order.
#[derive(Debug)]
pub struct HistoryPage {
    pub changes: Vec<Change>,
    /// Every matching change at or below this index is in this page or was
    /// before the position read from.
    pub covered: Index,
    /// Where the next page starts.
    pub next: HistoryPosition,
    /// The applied index of the view the page was read from.
    pub applied: Index,
}

fn record_key(first: Index, last: Index) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&first.to_be_bytes());
    key[8..].copy_from_slice(&last.to_be_bytes());
    key
}

fn legacy_key(index: Index, seq: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&index.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The span a record's key names (its bytes counted from `value_len`).
fn decode_span(key: &[u8], value_len: usize) -> Result<RecordSpan, DecodeError> {
    let bytes = (key.len() + value_len) as u64;
    let index = |at: usize| Index::from_be_bytes(key[at..at + 8].try_into().expect("8 bytes"));
    match key.len() {
        16 => {
            let (first, last) = (index(0), index(8));
            if first > last {
                return Err(DecodeError("history record ends before it starts"));
            }
            Ok(RecordSpan { first, last, bytes, legacy_seq: None })
        }
        12 => {
            let seq = u32::from_be_bytes(key[8..].try_into().expect("4 bytes"));
            Ok(RecordSpan { first: index(0), last: index(0), bytes, legacy_seq: Some(seq) })
        }
        _ => Err(DecodeError("history key is neither 12 nor 16 bytes")),
    }
}

/// Bytes [`put_change`] writes for one change with its index.
fn change_bytes(state_machine: &str, key: &[u8], value: Option<&[u8]>, previous: Option<&[u8]>) -> usize {
    let optional = |v: Option<&[u8]>| v.map_or(1, |v| 5 + v.len());
    8 + 1 + state_machine.len() + 4 + key.len() + optional(value) + optional(previous)
}

/// One change's fields, appended to a record body (the format-1 records'
/// layout, kept for the tests that write them).
#[cfg(test)]
fn push_change(out: &mut Vec<u8>, state_machine: &str, key: &[u8], value: Option<&[u8]>, previous: Option<&[u8]>) {
    out.push(state_machine.len() as u8);
    out.extend_from_slice(state_machine.as_bytes());
    codec::push_sized(out, key);
    codec::push_optional(out, value);
    codec::push_optional(out, previous);
}

/// One change, with its index, written into a record's buffer: the
/// layout [`record_changes`] reads.
fn put_change(out: &mut codec::FieldWriter<'_>, (change, previous): &(&super::StateChange, Previous<'_>)) {
    let write = &change.write;
    out.put(&change.index.to_be_bytes());
    out.put(&[write.state_machine.len() as u8]);
    out.put(write.state_machine.as_bytes());
    out.put_sized(&write.key);
    out.put_optional(write.value.as_deref());
    out.put_optional(previous.as_deref());
}

/// A change's previous value: borrowed from the batch or the state cache, or read
/// from the store (owned).
enum Previous<'a> {
    Borrowed(Option<&'a [u8]>),
    Stored(Option<Vec<u8>>),
}

impl Previous<'_> {
    fn as_deref(&self) -> Option<&[u8]> {
        match self {
            Previous::Borrowed(value) => *value,
            Previous::Stored(value) => value.as_deref(),
        }
    }
}

/// One change as stored, borrowed from its record.
struct StoredChange<'a> {
    position: HistoryPosition,
    state_machine: &'a [u8],
    key: &'a [u8],
    value: Option<&'a [u8]>,
    previous: Option<&'a [u8]>,
}

/// The changes of one stored record, in order, checked against its span.
fn record_changes<'a>(span: RecordSpan, value: &'a [u8]) -> Result<Vec<StoredChange<'a>>, DecodeError> {
    let body = codec::unseal(value)?;
    let mut reader = codec::FieldReader::new(body);
    let change = |reader: &mut codec::FieldReader<'a>, position| -> Result<StoredChange<'a>, DecodeError> {
        let name_len = reader.take(1)?[0] as usize;
        let state_machine = reader.take(name_len)?;
        let key = reader.sized()?;
        let value = reader.optional()?;
        let previous = reader.optional()?;
        Ok(StoredChange { position, state_machine, key, value, previous })
    };
    let changes = match span.legacy_seq {
        Some(seq) => vec![change(&mut reader, HistoryPosition { index: span.first, seq })?],
        None => {
            let count = reader.u32()?;
            let mut changes = Vec::with_capacity(count.min(1 << 16) as usize);
            let mut position = HistoryPosition { index: span.first, seq: 0 };
            for at in 0..count {
                let index = reader.u64()?;
                if index < span.first || index > span.last || (at > 0 && index < position.index) {
                    return Err(DecodeError("history change outside its record's indexes or out of order"));
                }
                position = match at > 0 && index == position.index {
                    true => HistoryPosition { index, seq: position.seq + 1 },
                    false => HistoryPosition::at(index),
                };
                changes.push(change(&mut reader, position)?);
            }
            if changes.first().map(|c| c.position.index) != Some(span.first) || position.index != span.last {
                return Err(DecodeError("history record's key does not match its changes"));
            }
            changes
        }
    };
    reader.finish()?;
    Ok(changes)
}

pub(super) fn encode_mark(mark: &HistoryMark) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&mark.floor.to_be_bytes());
    out.extend_from_slice(&mark.bytes.to_be_bytes());
    codec::seal(out)
}

pub(super) fn decode_mark(value: &[u8]) -> Result<HistoryMark, DecodeError> {
    let body = codec::unseal(value)?;
    let body: [u8; 16] = body.try_into().map_err(|_| DecodeError("history mark is not 16 bytes"))?;
    let (floor, bytes) = body.split_at(8);
    Ok(HistoryMark {
        floor: u64::from_be_bytes(floor.try_into().expect("8 bytes")),
        bytes: u64::from_be_bytes(bytes.try_into().expect("8 bytes")),
    })
}

impl Inner {
    /// Adds one record holding `changes` (in apply order, each with the
    /// index that made it) to `batch`, then compacts what the limits no
    /// longer keep. The mark it returns is written by `batch` too; the
    /// caller takes the update once `batch` commits.
    pub(super) fn record_history(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        changes: (&[super::StateChange], &super::CachedBefore),
        mark: HistoryMark,
        known: &KnownRecords,
        (applied_before, applied): (Index, Index),
    ) -> Result<HistoryUpdate, StoreError> {
        let limits = self.history_limits;
        let mut update = HistoryUpdate { mark, dropped_known: 0, written: None };
        // This batch's own record is not in the store yet: compaction
        // reaches no further than what earlier batches applied.
        let keep_above = applied.saturating_sub(limits.entries).min(applied_before);
        let over_entries = mark.floor + COMPACT_SLACK_ENTRIES < keep_above;
        if !limits.keeps_history() || over_entries || mark.bytes > limits.bytes {
            self.compact_history(batch, &mut update, known, keep_above, applied_before)?;
        }
        if limits.keeps_history() {
            update.written = self.write_record(batch, changes, &mut update.mark)?;
        } else {
            update.mark.floor = applied;
        }
        batch.insert(&self.meta, META_HISTORY, encode_mark(&update.mark));
        Ok(update)
    }

    /// The record of a batch's changes, if any changed anything.
    fn write_record(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        (changes, cached_before): (&[super::StateChange], &super::CachedBefore),
        mark: &mut HistoryMark,
    ) -> Result<Option<RecordSpan>, StoreError> {
        // The value each key held before the batch is what the state cache
        // gave up for it, or else in the store (the batch is not committed
        // yet); within the batch, the last change. Found first, so the
        // record's length is known and it is written once, straight into
        // the buffer fjall keeps (a record holds a whole batch's values:
        // a copy of it took ~1% of the members' CPU under load in a profile).
        let mut latest: rustc_hash::FxHashMap<(&str, &[u8]), Option<&[u8]>> = Default::default();
        let mut resolved = Vec::with_capacity(changes.len());
        let mut len = 4 + codec::CHECKSUM_BYTES;
        for change in changes {
            let super::StateChange { write, previous, .. } = change;
            let previous = match latest.get(&(&*write.state_machine, write.key.as_slice())) {
                Some(value) => Previous::Borrowed(*value),
                None => match previous {
                    Some(known) => Previous::Borrowed(known.as_deref()),
                    None => match cached_before.get(&(&*write.state_machine, write.key.as_slice())) {
                        Some(cached) => Previous::Borrowed(cached.as_deref().map(codec::sealed_body)),
                        None => Previous::Stored(self.stored_state_value(&write.state_machine, &write.key)?),
                    },
                },
            };
            let value = write.value.as_deref();
            if previous.as_deref().is_none() && value.is_none() {
                // Deleting a key that is not there changes nothing.
                continue;
            }
            len += change_bytes(&write.state_machine, &write.key, value, previous.as_deref());
            latest.insert((&*write.state_machine, write.key.as_slice()), value);
            resolved.push((change, previous));
        }
        let (Some((first, _)), Some((last, _))) = (resolved.first(), resolved.last()) else { return Ok(None) };
        let key = record_key(first.index, last.index);
        let mut value = byteview::ByteView::with_size(len);
        {
            let mut buffer = value.get_mut().expect("a new buffer has no other owner");
            let mut out = codec::FieldWriter::new(&mut buffer);
            out.put(&(resolved.len() as u32).to_be_bytes());
            for change in &resolved {
                put_change(&mut out, change);
            }
            out.seal();
        }
        let span =
            RecordSpan { first: first.index, last: last.index, bytes: (key.len() + len) as u64, legacy_seq: None };
        mark.bytes += span.bytes;
        batch.insert(&self.history, key, fjall::Slice::from(value));
        Ok(Some(span))
    }

    /// Deletes the oldest records, whole, while one ends at or below
    /// `keep_above` or the records take more than three quarters of their
    /// bytes (room to grow before the next round); at most
    /// [`COMPACT_RECORDS_PER_BATCH`] records per call, none past `upto`.
    /// Records this store wrote are taken from `known`; older ones (from
    /// before it opened) are read to find their spans.
    fn compact_history(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        update: &mut HistoryUpdate,
        known: &KnownRecords,
        keep_above: Index,
        upto: Index,
    ) -> Result<(), StoreError> {
        let bytes_target = self.history_limits.bytes - self.history_limits.bytes / 4;
        let keeps = self.history_limits.keeps_history();
        let mut deleted = 0;
        // Drops `span` if it is due; false at the first record kept.
        let mut drop_if_due = |span: RecordSpan, mark: &mut HistoryMark| -> bool {
            if deleted >= COMPACT_RECORDS_PER_BATCH {
                return false;
            }
            let due = !keeps || span.last <= keep_above || mark.bytes > bytes_target;
            if !due || span.last > upto {
                // Nothing is left between the floor and this record.
                mark.floor = mark.floor.max(keep_above.min(span.first - 1));
                return false;
            }
            batch.remove(&self.history, span.key());
            mark.bytes = mark.bytes.saturating_sub(span.bytes);
            mark.floor = mark.floor.max(span.last);
            deleted += 1;
            true
        };
        // Every stored record starts above the floor; those before the
        // first known one are from before this store opened.
        let low = legacy_key(update.mark.floor + 1, 0).to_vec();
        let older = match known.front() {
            Some(front) => self.history.range(low..front.key()),
            None => self.history.range(low..),
        };
        for guard in older {
            let (key, value) = guard.into_inner().map_err(|e| self.db_error(e))?;
            let span = decode_span(&key, value.len())
                .map_err(|DecodeError(why)| self.corrupt(format!("history key {:?}: {why}", &key[..])))?;
            if !drop_if_due(span, &mut update.mark) {
                return Ok(());
            }
        }
        for span in known {
            if !drop_if_due(*span, &mut update.mark) {
                return Ok(());
            }
            update.dropped_known += 1;
        }
        // No record at or below `upto` is left.
        if deleted < COMPACT_RECORDS_PER_BATCH {
            update.mark.floor = update.mark.floor.max(keep_above);
        }
        Ok(())
    }
}

impl Store {
    /// The history's floor: changes at indexes above it can be watched.
    pub fn history_floor(&self) -> Index {
        self.inner.lock().history.floor
    }

    /// Whether this member keeps a change history at all.
    pub fn keeps_history(&self) -> bool {
        self.inner.history_limits.keeps_history()
    }

    /// The changes `filter` matches from `from` on, as far as this member
    /// has applied, from one consistent view of the store: at most a page
    /// of them (see [`PageLimits`]). [`HistoryRead::Compacted`] if the
    /// history no longer reaches back to `from`.
    pub fn history_page(
        &self,
        from: HistoryPosition,
        filter: &HistoryFilter,
        limits: PageLimits,
    ) -> Result<HistoryRead, StoreError> {
        let inner = &self.inner;
        let view = inner.db.snapshot();
        let applied = match view.get(&inner.meta, META_APPLIED).map_err(|e| inner.db_error(e))? {
            Some(value) => {
                codec::decode_applied(&value)
                    .map_err(|DecodeError(why)| inner.corrupt(format!("the applied position: {why}")))?
                    .0
            }
            None => 0,
        };
        let floor = match view.get(&inner.meta, META_HISTORY).map_err(|e| inner.db_error(e))? {
            Some(value) => {
                decode_mark(&value).map_err(|DecodeError(why)| inner.corrupt(format!("the history mark: {why}")))?.floor
            }
            None => applied,
        };
        if from.index <= floor {
            return Ok(HistoryRead::Compacted { floor });
        }
        let mut page = HistoryPage {
            changes: Vec::new(),
            covered: applied.max(from.index - 1),
            next: HistoryPosition::at(applied.max(from.index - 1) + 1),
            applied,
        };
        if from.index > applied {
            return Ok(HistoryRead::Page(page));
        }
        // The record holding `from.index` may start before it; a format 1
        // record holds one change, found under its own position.
        let holding = view
            .range(&inner.history, ..=record_key(from.index, Index::MAX).to_vec())
            .next_back()
            .map(|guard| guard.into_inner().map_err(|e| inner.db_error(e)))
            .transpose()?
            .map(|(key, value)| decode_span(&key, value.len()).map(|span| (span, key)))
            .transpose()
            .map_err(|DecodeError(why)| inner.corrupt(format!("history key: {why}")))?;
        let start = match holding {
            Some((span, key)) if span.legacy_seq.is_none() && span.last >= from.index => key.to_vec(),
            _ => legacy_key(from.index, from.seq).to_vec(),
        };
        let (mut bytes, mut scanned) = (0, 0);
        let mut last_index = None;
        for guard in view.range(&inner.history, start..=record_key(applied, Index::MAX).to_vec()) {
            let (key, value) = guard.into_inner().map_err(|e| inner.db_error(e))?;
            let corrupt = |why: &str| inner.corrupt(format!("history record {:?}: {why}", &key[..]));
            let span = decode_span(&key, value.len()).map_err(|DecodeError(why)| corrupt(why))?;
            let changes = record_changes(span, &value).map_err(|DecodeError(why)| corrupt(why))?;
            for stored in changes {
                let position = stored.position;
                if position < from {
                    continue;
                }
                let full = page.changes.len() >= limits.changes || bytes >= limits.bytes || scanned >= limits.scanned;
                if last_index != Some(position.index) && full {
                    page.covered = position.index - 1;
                    page.next = HistoryPosition::at(position.index);
                    return Ok(HistoryRead::Page(page));
                }
                if bytes >= limits.hard_bytes {
                    // One index's changes outgrow a page: the next page goes
                    // on inside it, and this one covers only the index before.
                    page.covered = position.index - 1;
                    page.next = position;
                    return Ok(HistoryRead::Page(page));
                }
                last_index = Some(position.index);
                scanned += 1;
                if !filter.matches(stored.state_machine, stored.key) {
                    continue;
                }
                let change = Change {
                    index: position.index,
                    state_machine: filter.state_machine.clone(),
                    key: stored.key.to_vec(),
                    value: stored.value.map(<[u8]>::to_vec),
                    previous: stored.previous.map(<[u8]>::to_vec),
                };
                bytes += change.bytes();
                page.changes.push(change);
            }
        }
        Ok(HistoryRead::Page(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{ConfState, Entry, EntryKind};
    use crate::storage::{ApplyBatch, Durability, Identity, StagingStart, StateChange, StateWrite, StoreOptions};

    const ALL: PageLimits =
        PageLimits { changes: usize::MAX, bytes: usize::MAX, scanned: usize::MAX, hard_bytes: usize::MAX };

    fn open(dir: &std::path::Path, history: HistoryLimits) -> Store {
        let options = StoreOptions { durability: Durability::UnsafeNoSync, history, ..StoreOptions::default() };
        Store::open(dir, &Identity::new("history", 1), &options).expect("store opens")
    }

    fn write(index: Index, key: &str, value: Option<&str>) -> StateChange {
        let write = StateWrite {
            state_machine: "kv".into(),
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
        };
        StateChange { index, write, previous: None }
    }

    /// Applies `changes` as one batch up to `applied`, with the log holding
    /// the entries (so the store reopens), and `writes` each key's last.
    fn apply(store: &Store, applied: Index, changes: Vec<StateChange>) {
        let last = store.applied().0;
        let entries: Vec<Entry> = (last + 1..=applied)
            .map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: bytes::Bytes::from_static(b"e") })
            .collect();
        store.persist(&entries, None).expect("persist");
        let mut writes: Vec<StateWrite> = Vec::new();
        for change in &changes {
            writes.retain(|w| w.key != change.write.key);
            writes.push(change.write.clone());
        }
        let batch = ApplyBatch { applied_index: applied, applied_term: 1, writes, changes, ..ApplyBatch::default() };
        store.apply(&batch).expect("apply");
    }

    fn page(store: &Store, from: Index, filter: &HistoryFilter, limits: PageLimits) -> HistoryPage {
        match store.history_page(HistoryPosition::at(from), filter, limits).expect("read") {
            HistoryRead::Page(page) => page,
            HistoryRead::Compacted { floor } => panic!("compacted at {floor}"),
        }
    }

    /// Bytes of keys and values the history keyspace holds.
    fn stored_bytes(store: &Store) -> u64 {
        let record = |g: fjall::Guard| g.into_inner().map(|(k, v)| (k.len() + v.len()) as u64).expect("record");
        store.inner.history.iter().map(record).sum()
    }

    fn shown(changes: &[Change]) -> Vec<String> {
        let text = |v: &Option<Vec<u8>>| v.as_deref().map_or("-".to_string(), |v| String::from_utf8_lossy(v).into());
        changes
            .iter()
            .map(|c| {
                format!("{} {} {} was {}", c.index, String::from_utf8_lossy(&c.key), text(&c.value), text(&c.previous))
            })
            .collect()
    }

    #[test]
    fn every_change_is_kept_in_log_order_with_the_value_it_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), HistoryLimits::default());
        apply(&store, 2, vec![write(1, "a", Some("1")), write(1, "b", Some("1")), write(2, "a", Some("2"))]);
        // A delete of a key that is not there changes nothing and is not kept.
        apply(&store, 4, vec![write(3, "a", None), write(3, "zz", None), write(4, "a", Some("3"))]);
        let everything = HistoryFilter::prefix("kv", b"");
        let all = page(&store, 1, &everything, ALL);
        assert_eq!(
            shown(&all.changes),
            ["1 a 1 was -", "1 b 1 was -", "2 a 2 was 1", "3 a - was 2", "4 a 3 was -"],
            "each change once, the previous value within a batch from the batch"
        );
        assert_eq!((all.covered, all.next, all.applied), (4, HistoryPosition::at(5), 4));
        assert_eq!(shown(&page(&store, 3, &everything, ALL).changes), ["3 a - was 2", "4 a 3 was -"]);
        let only_b = HistoryFilter { state_machine: "kv".into(), start: b"b".to_vec(), end: Some(b"c".to_vec()) };
        assert_eq!(shown(&page(&store, 1, &only_b, ALL).changes), ["1 b 1 was -"]);
        let other = HistoryFilter::prefix("other", b"");
        assert!(page(&store, 1, &other, ALL).changes.is_empty(), "another state machine's changes are not mine");
        // Ahead of what is applied: nothing yet, and nothing claimed past the start.
        let ahead = page(&store, 9, &everything, ALL);
        assert!(ahead.changes.is_empty());
        assert_eq!((ahead.covered, ahead.next), (8, HistoryPosition::at(9)));

        drop(store);
        let store = open(dir.path(), HistoryLimits::default());
        assert_eq!(page(&store, 1, &everything, ALL).changes, all.changes, "kept across a restart");

        // A previous value the applier already knows (the guest read it) is
        // taken as is, without a lookup.
        let known = StateChange { previous: Some(Some(b"read by the guest".to_vec())), ..write(5, "b", Some("2")) };
        apply(&store, 5, vec![known]);
        assert_eq!(shown(&page(&store, 5, &everything, ALL).changes), ["5 b 2 was read by the guest"]);
    }

    #[test]
    fn previous_values_read_alike_from_the_state_cache_or_the_store_and_a_failed_batch_leaves_none() {
        for cache_bytes in [0, 1 << 20] {
            let dir = tempfile::tempdir().expect("tempdir");
            let memory = crate::storage::StoreMemory { state_cache_bytes: cache_bytes, ..Default::default() };
            let options = StoreOptions { durability: Durability::UnsafeNoSync, memory, ..StoreOptions::default() };
            let open = || Store::open(dir.path(), &Identity::new("history", 1), &options).expect("store opens");
            let store = open();
            apply(&store, 1, vec![write(1, "a", Some("1")), write(1, "b", Some("1"))]);
            // The cache swaps a batch's values in before its commit; one
            // that fails after that (a key over the limit, after "a") must
            // leave neither its value nor a history record behind.
            let too_long = "k".repeat(crate::storage::STATE_KEY_MAX_BYTES + 1);
            let failing = vec![write(2, "a", Some("never")), write(2, &too_long, Some("x"))];
            let writes = failing.iter().map(|change| change.write.clone()).collect();
            let batch =
                ApplyBatch { applied_index: 2, applied_term: 1, writes, changes: failing, ..Default::default() };
            store
                .persist(&[Entry { term: 1, index: 2, kind: EntryKind::Normal, data: bytes::Bytes::new() }], None)
                .expect("persist");
            assert!(store.apply(&batch).is_err(), "cache {cache_bytes}");
            assert_eq!(store.state_get("kv", b"a").expect("read"), Some(b"1".to_vec()), "cache {cache_bytes}");
            // "a" is cached now (that read filled it); "c" never was.
            apply(&store, 2, vec![write(2, "a", Some("2")), write(2, "c", Some("1"))]);
            drop(store);
            // After a restart nothing is cached: previous values come from the store.
            let store = open();
            apply(&store, 3, vec![write(3, "b", Some("2")), write(3, "c", None)]);
            let everything = page(&store, 1, &HistoryFilter::prefix("kv", b""), ALL);
            assert_eq!(
                shown(&everything.changes),
                ["1 a 1 was -", "1 b 1 was -", "2 a 2 was 1", "2 c 1 was -", "3 b 2 was 1", "3 c - was 1"],
                "cache {cache_bytes}"
            );
        }
    }

    #[test]
    fn pages_end_between_entries_unless_one_entry_outgrows_a_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), HistoryLimits::default());
        let mut changes = vec![write(1, "a", Some("1")), write(2, "b", Some("1"))];
        changes.extend((0..5).map(|n| write(3, &format!("c{n}"), Some("x"))));
        changes.push(write(4, "d", Some("1")));
        apply(&store, 4, changes);
        let everything = HistoryFilter::prefix("kv", b"");
        let two = PageLimits { changes: 2, ..ALL };
        let first = page(&store, 1, &everything, two);
        assert_eq!((first.changes.len(), first.covered, first.next), (2, 2, HistoryPosition::at(3)));
        // Entry 3's five changes stay together although the page holds two.
        let second = page(&store, 3, &everything, two);
        assert_eq!((second.changes.len(), second.covered, second.next), (5, 3, HistoryPosition::at(4)));
        // Past the hard limit a page ends inside an entry and covers only
        // the one before; the next goes on from there.
        let tight = PageLimits { hard_bytes: 5, ..ALL };
        let cut = page(&store, 3, &everything, tight);
        assert_eq!(cut.covered, 2);
        assert!(cut.next.index == 3 && cut.next.seq > 0, "{:?}", cut.next);
        let HistoryRead::Page(rest) = store.history_page(cut.next, &everything, ALL).expect("read") else {
            panic!("compacted")
        };
        let mut joined = cut.changes.clone();
        joined.extend(rest.changes);
        assert_eq!(joined, page(&store, 3, &everything, ALL).changes, "nothing lost or repeated at the cut");
    }

    #[test]
    fn compaction_keeps_the_newest_entries_and_refuses_older_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = HistoryLimits { entries: 100, bytes: 64 << 20 };
        let store = open(dir.path(), limits);
        for index in 1..=1000 {
            apply(&store, index, vec![write(index, &format!("k{}", index % 7), Some(&index.to_string()))]);
        }
        let floor = store.history_floor();
        assert!((1000 - 100 - COMPACT_SLACK_ENTRIES - 1..=900).contains(&floor), "floor {floor}");
        let everything = HistoryFilter::prefix("kv", b"");
        match store.history_page(HistoryPosition::at(floor), &everything, ALL).expect("read") {
            HistoryRead::Compacted { floor: said } => assert_eq!(said, floor),
            HistoryRead::Page(_) => panic!("a start at the floor is compacted"),
        }
        let kept = page(&store, floor + 1, &everything, ALL);
        assert_eq!(kept.changes.len() as u64, 1000 - floor, "everything above the floor is there");
        assert_eq!(kept.changes.first().map(|c| c.index), Some(floor + 1));
        let stored = store.inner.history.iter().count() as u64;
        assert_eq!(stored, 1000 - floor, "nothing at or below the floor is left on disk");
        assert_eq!(store.inner.lock().history.bytes, stored_bytes(&store), "the byte count is exact");
    }

    #[test]
    fn compaction_by_bytes_drops_the_oldest_entries_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = HistoryLimits { entries: 1_000_000, bytes: 64 << 10 };
        let store = open(dir.path(), limits);
        let value = "v".repeat(1000);
        for index in 1..=300 {
            apply(&store, index, vec![write(index, "k", Some(&value))]);
        }
        let mark = store.inner.lock().history;
        assert!(mark.bytes <= limits.bytes + 4096, "{mark:?}");
        assert!(mark.floor > 200, "{mark:?}");
        let kept = page(&store, mark.floor + 1, &HistoryFilter::prefix("kv", b""), ALL);
        assert_eq!(kept.changes.len() as u64, 300 - mark.floor);
    }

    #[test]
    fn a_member_without_history_keeps_none_and_a_new_limit_applies_on_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), HistoryLimits::default());
        apply(&store, 3, vec![write(1, "a", Some("1")), write(3, "b", Some("1"))]);
        drop(store);
        let store = open(dir.path(), HistoryLimits { entries: 0, bytes: 64 << 20 });
        assert!(!store.keeps_history());
        apply(&store, 4, vec![write(4, "c", Some("1"))]);
        assert_eq!(store.history_floor(), 4);
        assert_eq!(store.inner.history.iter().count(), 0, "the old history is dropped");
    }

    #[test]
    fn a_snapshot_carries_the_history_and_its_floor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leader = open(&dir.path().join("leader"), HistoryLimits::default());
        leader.bootstrap(&ConfState::with_voters([1, 2, 3]), &Default::default()).expect("bootstrap");
        apply(&leader, 5, vec![write(2, "a", Some("1")), write(5, "a", None)]);
        let reader = leader.snapshot_reader().expect("reader");
        let follower = open(&dir.path().join("follower"), HistoryLimits::default());
        // The follower had a history of its own, which the snapshot replaces.
        apply(&follower, 1, vec![write(1, "stale", Some("x"))]);
        let StagingStart::Fresh(mut staging) = follower.begin_staging(reader.meta().clone()).expect("staging") else {
            panic!("not staged yet")
        };
        reader.for_each_chunk(1 << 20, |chunk| staging.write_chunk(&chunk).is_ok()).expect("stream");
        let meta = staging.finish().expect("finish");
        follower.install_snapshot(&meta).expect("install");
        let everything = HistoryFilter::prefix("kv", b"");
        assert_eq!(page(&follower, 1, &everything, ALL).changes, page(&leader, 1, &everything, ALL).changes);
        assert_eq!(follower.history_floor(), leader.history_floor());
        assert_eq!(follower.state_digest("kv").expect("digest"), leader.state_digest("kv").expect("digest"));
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), HistoryLimits::default());
        apply(&store, 1, vec![write(1, "a", Some("1"))]);
        store.inner.history.insert(record_key(1, 1), b"garbage".to_vec()).expect("insert");
        let error = store.history_page(HistoryPosition::at(1), &HistoryFilter::prefix("kv", b""), ALL).unwrap_err();
        assert!(error.to_string().contains("history record"), "{error}");
        // A record whose key names other indexes than its changes hold.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), HistoryLimits::default());
        apply(&store, 2, vec![write(1, "a", Some("1")), write(2, "a", Some("2"))]);
        let value = store.inner.history.get(record_key(1, 2)).expect("get").expect("the record");
        store.inner.history.remove(record_key(1, 2)).expect("remove");
        store.inner.history.insert(record_key(1, 3), value).expect("insert");
        let error = store.history_page(HistoryPosition::at(1), &HistoryFilter::prefix("kv", b""), ALL).unwrap_err();
        assert!(error.to_string().contains("does not match"), "{error}");
    }

    #[test]
    fn a_format_1_history_of_one_record_per_change_reads_and_compacts_with_the_new_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = HistoryLimits { entries: 6, bytes: 64 << 20 };
        let store = open(dir.path(), limits);
        apply(&store, 4, Vec::new());
        // What format 1 wrote for entries 2 and 4: a record per change.
        let old = |state_machine: &str, key: &str, value: &str| {
            let mut body = Vec::new();
            push_change(&mut body, state_machine, key.as_bytes(), Some(value.as_bytes()), None);
            codec::seal(body)
        };
        let records = [
            (legacy_key(2, 0), old("kv", "a", "1")),
            (legacy_key(2, 1), old("kv", "b", "1")),
            (legacy_key(4, 0), old("kv", "a", "2")),
        ];
        let bytes: u64 = records.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        for (key, value) in &records {
            store.inner.history.insert(key, value).expect("insert");
        }
        let mark = HistoryMark { floor: 1, bytes };
        store.inner.meta.insert(META_HISTORY, encode_mark(&mark)).expect("mark");
        drop(store);
        let store = open(dir.path(), limits);
        let replacing = StateChange { previous: Some(Some(b"2".to_vec())), ..write(5, "a", Some("3")) };
        apply(&store, 6, vec![replacing, write(6, "c", Some("1"))]);
        let everything = HistoryFilter::prefix("kv", b"");
        assert_eq!(
            shown(&page(&store, 2, &everything, ALL).changes),
            ["2 a 1 was -", "2 b 1 was -", "4 a 2 was -", "5 a 3 was 2", "6 c 1 was -"]
        );
        let from_second = HistoryPosition { index: 2, seq: 1 };
        let HistoryRead::Page(rest) = store.history_page(from_second, &everything, ALL).expect("read") else {
            panic!("compacted")
        };
        assert_eq!(rest.changes.len(), 4, "a position inside an old index");
        // Past the entry limit the old records go first, read to find them.
        for index in 7..=300 {
            apply(&store, index, vec![write(index, "k", Some("v"))]);
        }
        assert!(store.history_floor() > 6, "floor {}", store.history_floor());
        assert!(store.inner.history.iter().all(|g| g.key().expect("key").len() == 16), "no format 1 record is left");
        assert_eq!(store.inner.lock().history.bytes, stored_bytes(&store), "the byte count stays exact");
    }
}
