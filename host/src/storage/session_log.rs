//! The client session table on disk, as a log of changes.
//!
//! Every applied batch changes the sessions of the clients it answered. One
//! record per changed session cost an LSM insert each (~1.7 us of memtable
//! search here, plus its flush and compaction), once per write on every
//! member. Instead, in the `session_log` keyspace:
//! ```text
//! index (u64 BE) 0x01 seq (u32)   -> checksummed changes: the sessions the
//!                                    batch up to `index` changed (`seq`
//!                                    orders batches that end at one index)
//! index (u64 BE) 0x00 part (u32)  -> checksummed checkpoint: every session
//!                                    as of `index`, in parts
//! changes: [count u32] count x ([client len u32][client][0 | 1 [len u32][record]])
//! ```
//! Reading the table is reading the records in key order: a checkpoint
//! starts the table over, changes apply on top. The apply task writes a
//! checkpoint instead of changes once the changes since the last one
//! outweigh the table ([`SessionLogMark::checkpoint_due`]); the same batch
//! deletes every older record, so a restart reads at most about twice the
//! table.
//!
//! Directories of format 1 keep one record per client in the `sessions`
//! keyspace; it is read first, as the table the log's changes apply to, and
//! emptied by the first checkpoint.

use super::codec::{self, DecodeError};
use crate::raft::Index;
use std::collections::BTreeMap;

/// Bytes one checkpoint part holds at most (a session larger than that has
/// a part of its own).
const CHECKPOINT_PART_BYTES: usize = 4 << 20;

/// Changes since the last checkpoint never wait for one below this.
const CHECKPOINT_MIN_BYTES: u64 = 1 << 20;

const TAG_CHECKPOINT: u8 = 0x00;
const TAG_CHANGES: u8 = 0x01;

/// A batch's session changes, encoded as they are added: the body of its
/// changes record (without the checksum), so a change costs no allocation
/// of its own on the way to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionChanges {
    /// The change count, then the changes; the count is kept current.
    body: Vec<u8>,
    count: u32,
}

impl Default for SessionChanges {
    fn default() -> SessionChanges {
        SessionChanges { body: vec![0; 4], count: 0 }
    }
}

impl SessionChanges {
    /// Room for changes of about `bytes` in all.
    pub fn with_capacity(bytes: usize) -> SessionChanges {
        let mut body = Vec::with_capacity(4 + bytes + 4);
        body.extend_from_slice(&[0; 4]);
        SessionChanges { body, count: 0 }
    }

    /// `client`'s session is now `record`, or has ended (`None`).
    pub fn push(&mut self, client: &[u8], record: Option<&[u8]>) {
        push_change(&mut self.body, client, record);
        self.counted();
    }

    /// `client`'s session is now the record of `len` bytes that `encode`
    /// appends to the buffer it is given.
    pub fn push_encoded(&mut self, client: &[u8], len: usize, encode: impl FnOnce(&mut Vec<u8>)) {
        codec::push_sized(&mut self.body, client);
        codec::push_present(&mut self.body, len, encode);
        self.counted();
    }

    fn counted(&mut self) {
        self.count += 1;
        self.body[..4].copy_from_slice(&self.count.to_be_bytes());
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many changes.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Changes of text client ids and records, in order.
    #[cfg(test)]
    pub fn of_text(changes: &[(&str, Option<&str>)]) -> SessionChanges {
        let mut encoded = SessionChanges::default();
        for (client, record) in changes {
            encoded.push(client.as_bytes(), record.map(str::as_bytes));
        }
        encoded
    }

    /// The changes, decoded back from their record.
    #[cfg(test)]
    pub fn decoded(&self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut changes = Vec::new();
        decode_changes(&encode_changes(self), |client, record| {
            changes.push((client.to_vec(), record.map(<[u8]>::to_vec)))
        })
        .expect("a batch's changes decode");
        changes
    }
}

/// How much of the session log is changes, and how large the table was at
/// its last checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionLogMark {
    pub changes_bytes: u64,
    pub checkpoint_bytes: u64,
}

impl SessionLogMark {
    /// Whether the next batch should write a checkpoint rather than changes.
    pub fn checkpoint_due(&self) -> bool {
        self.changes_bytes > self.checkpoint_bytes.max(CHECKPOINT_MIN_BYTES)
    }
}

fn record_key(index: Index, tag: u8, seq: u32) -> [u8; 13] {
    let mut key = [0; 13];
    key[..8].copy_from_slice(&index.to_be_bytes());
    key[8] = tag;
    key[9..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(super) fn changes_key(index: Index, seq: u32) -> [u8; 13] {
    record_key(index, TAG_CHANGES, seq)
}

fn checkpoint_key(index: Index, part: u32) -> [u8; 13] {
    record_key(index, TAG_CHECKPOINT, part)
}

/// The first key of every record at or after `index`.
pub(super) fn records_from(index: Index) -> [u8; 8] {
    index.to_be_bytes()
}

/// The record of a batch's session changes.
pub(super) fn encode_changes(changes: &SessionChanges) -> Vec<u8> {
    let mut value = Vec::with_capacity(changes.body.len() + 4);
    value.extend_from_slice(&changes.body);
    codec::seal(value)
}

fn push_change(body: &mut Vec<u8>, client: &[u8], record: Option<&[u8]>) {
    codec::push_sized(body, client);
    codec::push_optional(body, record);
}

/// The records of a checkpoint of `table` at `index`: keys and values.
pub(super) fn encode_checkpoint(index: Index, table: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut parts = Vec::new();
    let mut body = vec![0; 4];
    let mut count = 0u32;
    let mut finish = |body: &mut Vec<u8>, count: &mut u32| {
        body[..4].copy_from_slice(&count.to_be_bytes());
        let part = parts.len() as u32;
        parts.push((checkpoint_key(index, part).to_vec(), codec::seal(std::mem::replace(body, vec![0; 4]))));
        *count = 0;
    };
    for (client, record) in table {
        if count > 0 && body.len() + client.len() + record.len() > CHECKPOINT_PART_BYTES {
            finish(&mut body, &mut count);
        }
        push_change(&mut body, client, Some(record));
        count += 1;
    }
    // An empty table still has one (empty) part: the checkpoint says so.
    finish(&mut body, &mut count);
    parts
}

/// What a stored record of the log is.
pub(super) enum Record {
    /// A part of the checkpoint at `index`.
    Checkpoint {
        index: Index,
    },
    Changes,
}

/// What a stored record of the log is, from its key.
pub(super) fn record_kind(key: &[u8]) -> Result<Record, DecodeError> {
    match (key.len(), key.get(8)) {
        (13, Some(&TAG_CHANGES)) => Ok(Record::Changes),
        (13, Some(&TAG_CHECKPOINT)) => {
            Ok(Record::Checkpoint { index: Index::from_be_bytes(key[..8].try_into().expect("8 bytes")) })
        }
        _ => Err(DecodeError("session log key is neither changes nor a checkpoint part")),
    }
}

/// Gives the changes a stored record holds to `each`, in order.
pub(super) fn decode_changes(value: &[u8], mut each: impl FnMut(&[u8], Option<&[u8]>)) -> Result<(), DecodeError> {
    let mut reader = codec::FieldReader::new(codec::unseal(value)?);
    for _ in 0..reader.u32()? {
        let client = reader.sized()?;
        each(client, reader.optional()?);
    }
    reader.finish()
}

/// The table being read back: format 1 records first, then the log.
#[derive(Default)]
pub(super) struct TableReader {
    pub table: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The checkpoint whose parts are being read, if any.
    checkpoint: Option<Index>,
    pub mark: SessionLogMark,
}

impl TableReader {
    /// Reads one record of the log, in key order.
    pub fn read(&mut self, key: &[u8], value: &[u8]) -> Result<(), DecodeError> {
        let bytes = (key.len() + value.len()) as u64;
        match record_kind(key)? {
            Record::Checkpoint { index } => {
                if self.checkpoint != Some(index) {
                    self.table.clear();
                    self.checkpoint = Some(index);
                    self.mark = SessionLogMark::default();
                }
                self.mark.checkpoint_bytes += bytes;
            }
            Record::Changes => self.mark.changes_bytes += bytes,
        }
        let table = &mut self.table;
        decode_changes(value, |client, record| match record {
            Some(record) => {
                table.insert(client.to_vec(), record.to_vec());
            }
            None => {
                table.remove(client);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(records: &[(Vec<u8>, Vec<u8>)]) -> Result<TableReader, DecodeError> {
        let mut reader = TableReader::default();
        let mut sorted = records.to_vec();
        sorted.sort();
        for (key, value) in &sorted {
            reader.read(key, value)?;
        }
        Ok(reader)
    }

    #[test]
    fn changes_apply_in_index_order_and_a_checkpoint_starts_the_table_over() {
        let encode_changes = |changes: &[(&str, Option<&str>)]| encode_changes(&SessionChanges::of_text(changes));
        let mut records = vec![
            (changes_key(3, 0).to_vec(), encode_changes(&[("a", Some("a3")), ("b", Some("b3"))])),
            (changes_key(5, 0).to_vec(), encode_changes(&[("a", None), ("c", Some("c5"))])),
        ];
        let reader = read_all(&records).expect("reads");
        let table: Vec<_> = reader.table.into_iter().collect();
        assert_eq!(table, [(b"b".to_vec(), b"b3".to_vec()), (b"c".to_vec(), b"c5".to_vec())]);
        // A checkpoint at 7 that says only "z" replaces what came before;
        // changes written after it at the same index apply on top (the
        // store deletes changes written at an index before a checkpoint).
        records.extend(encode_checkpoint(7, &[(b"z".to_vec(), b"z7".to_vec())]));
        records.push((changes_key(7, 0).to_vec(), encode_changes(&[("x", Some("x7"))])));
        records.push((changes_key(8, 0).to_vec(), encode_changes(&[("y", Some("y8"))])));
        let reader = read_all(&records).expect("reads");
        assert_eq!(reader.table.keys().cloned().collect::<Vec<_>>(), [b"x".to_vec(), b"y".to_vec(), b"z".to_vec()]);
        assert!(reader.mark.checkpoint_bytes > 0 && reader.mark.changes_bytes > 0);
    }

    #[test]
    fn a_large_checkpoint_comes_in_parts_and_reads_whole() {
        let table: Vec<(Vec<u8>, Vec<u8>)> =
            (0..40u32).map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; 300 << 10])).collect();
        let parts = encode_checkpoint(9, &table);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        assert!(parts.iter().all(|(_, value)| value.len() <= CHECKPOINT_PART_BYTES + (300 << 10) + 64));
        let reader = read_all(&parts).expect("reads");
        assert_eq!(reader.table.into_iter().collect::<Vec<_>>(), table);
        let empty = encode_checkpoint(10, &[]);
        assert_eq!(empty.len(), 1, "an empty table is one empty part");
        assert!(read_all(&empty).expect("reads").table.is_empty());
    }

    #[test]
    fn damage_is_an_error() {
        let mut changes = SessionChanges::default();
        changes.push(b"client", Some(b"record"));
        let value = encode_changes(&changes);
        for at in 0..value.len() {
            let mut broken = value.clone();
            broken[at] ^= 1;
            assert!(decode_changes(&broken, |_, _| {}).is_err(), "byte {at}");
        }
        assert!(record_kind(b"short").is_err(), "an unknown key");
    }

    #[test]
    fn a_checkpoint_is_due_once_the_changes_outweigh_the_table() {
        let mark = SessionLogMark { changes_bytes: 2 << 20, checkpoint_bytes: 3 << 20 };
        assert!(!mark.checkpoint_due());
        assert!(SessionLogMark { changes_bytes: 4 << 20, ..mark }.checkpoint_due());
        assert!(!SessionLogMark { changes_bytes: 512 << 10, checkpoint_bytes: 0 }.checkpoint_due(), "never tiny ones");
    }
}
