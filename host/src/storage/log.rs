//! The Raft log's records in the `log` keyspace.
//!
//! Entries appended together (one [`Store::persist`]) are stored as one
//! record, a chunk, under the first one's index:
//! ```text
//! first index (u64 BE) 0x01 -> [count u32 BE] count x ([len u32 BE][entry])
//! ```
//! where each entry is as [`codec::write_entry`] writes it, with its own
//! CRC32 over its index and contents, so a chunk under the wrong key or a
//! flipped bit anywhere is caught. A chunk holds at most
//! [`CHUNK_BYTES_MAX`] of entries (an entry larger than that has one of its
//! own). One record per append instead of one per entry is what makes the
//! log cheap in an LSM tree: each record costs a memtable insert, a journal
//! record, a place in a flushed table and later a tombstone, whatever its
//! size.
//!
//! Directories of format 1 hold one record per entry under its plain index
//! (8-byte keys); they read as chunks of one, and stay until compacted.
//!
//! Invariants: records are contiguous (each starts right after the one
//! before) and the first may start before the snapshot point (compaction
//! drops only records wholly at or below it). The store keeps where each
//! record starts in memory ([`ChunkStart`]), so that appends, truncations
//! and compaction never read the log back to find its keys.
//!
//! [`Store::persist`]: super::Store::persist

use super::codec::{self, DecodeError};
use crate::raft::{Entry, Index};

/// Bytes of entries one chunk holds at most.
pub(super) const CHUNK_BYTES_MAX: usize = 256 << 10;

/// The byte after the index in a chunk's key (format 2).
const CHUNK_KEY_TAG: u8 = 0x01;

/// Where one record of the log starts, and how its key is spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChunkStart {
    pub first: Index,
    /// A format 1 record: one entry under its plain index.
    pub legacy: bool,
}

impl ChunkStart {
    /// The record's key.
    pub fn key(&self) -> Vec<u8> {
        if self.legacy { codec::log_key(self.first).to_vec() } else { chunk_key(self.first).to_vec() }
    }
}

fn chunk_key(first: Index) -> [u8; 9] {
    let mut key = [CHUNK_KEY_TAG; 9];
    key[..8].copy_from_slice(&first.to_be_bytes());
    key
}

/// The key a range read starts at to find the record that starts at `first`
/// (whichever its format: a chunk's key sorts right after the plain index).
pub(super) fn scan_from(first: Index) -> [u8; 8] {
    codec::log_key(first)
}

/// Cuts contiguous `entries` into runs of at most [`CHUNK_BYTES_MAX`], one
/// chunk each.
pub(super) fn chunk_runs(entries: &[Entry]) -> Vec<&[Entry]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (at, entry) in entries.iter().enumerate() {
        let size = entry.data.len() + 32;
        if at > start && bytes + size > CHUNK_BYTES_MAX {
            runs.push(&entries[start..at]);
            start = at;
            bytes = 0;
        }
        bytes += size;
    }
    if start < entries.len() {
        runs.push(&entries[start..]);
    }
    runs
}

/// The record of a run of contiguous entries: its key and value, the value
/// built in fjall's own buffer (the entries' bytes are copied once, there).
pub(super) fn encode_chunk(entries: &[Entry]) -> ([u8; 9], fjall::Slice) {
    let first = entries.first().map_or(0, |e| e.index);
    let size = 4 + entries.iter().map(|e| 4 + codec::encoded_entry_len(e)).sum::<usize>();
    let mut value = byteview::ByteView::with_size(size);
    {
        let mut out = value.get_mut().expect("a new buffer has no other owner");
        out[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        let mut at = 4;
        for entry in entries {
            let len = codec::encoded_entry_len(entry);
            out[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
            codec::write_entry(entry, &mut out[at + 4..at + 4 + len]);
            at += 4 + len;
        }
    }
    (chunk_key(first), fjall::Slice::from(value))
}

/// A record's entries, in order, each as its index and still-encoded bytes
/// (decoded, and its checksum verified, by [`codec::decode_entry`]).
pub(super) struct ChunkEntries<'a> {
    next: Index,
    rest: &'a [u8],
    remaining: u32,
    /// Each entry is preceded by its length (a chunk); else the record is
    /// one entry (format 1).
    prefixed: bool,
}

impl<'a> Iterator for ChunkEntries<'a> {
    type Item = Result<(Index, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return (!self.rest.is_empty()).then(|| {
                self.rest = &[];
                Err(DecodeError("log chunk has trailing bytes"))
            });
        }
        self.remaining -= 1;
        let index = self.next;
        self.next += 1;
        if !self.prefixed {
            return Some(Ok((index, std::mem::take(&mut self.rest))));
        }
        let parsed = self.rest.split_first_chunk::<4>().and_then(|(len, rest)| {
            let len = u32::from_be_bytes(*len) as usize;
            (rest.len() >= len).then(|| rest.split_at(len))
        });
        match parsed {
            Some((entry, rest)) => {
                self.rest = rest;
                Some(Ok((index, entry)))
            }
            None => {
                (self.remaining, self.rest) = (0, &[]);
                Some(Err(DecodeError("log chunk ends early")))
            }
        }
    }
}

/// The start and entries of a stored record.
pub(super) fn parse_record<'a>(key: &[u8], value: &'a [u8]) -> Result<(ChunkStart, ChunkEntries<'a>), DecodeError> {
    match key.len() {
        8 => {
            let first = codec::decode_log_key(key)?;
            let entries = ChunkEntries { next: first, rest: value, remaining: 1, prefixed: false };
            Ok((ChunkStart { first, legacy: true }, entries))
        }
        9 if key[8] == CHUNK_KEY_TAG => {
            let first = codec::decode_log_key(&key[..8])?;
            let (count, rest) =
                value.split_first_chunk::<4>().ok_or(DecodeError("log chunk shorter than its count"))?;
            let remaining = u32::from_be_bytes(*count);
            if remaining == 0 {
                return Err(DecodeError("log chunk holds no entry"));
            }
            Ok((ChunkStart { first, legacy: false }, ChunkEntries { next: first, rest, remaining, prefixed: true }))
        }
        _ => Err(DecodeError("log key is neither an index nor a chunk's")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryKind;
    use bytes::Bytes;

    fn entry(index: Index, bytes: usize) -> Entry {
        Entry { term: 3, index, kind: EntryKind::Normal, data: Bytes::from(vec![index as u8; bytes]) }
    }

    fn decode_all(key: &[u8], value: &[u8]) -> Result<Vec<Entry>, DecodeError> {
        let (_, entries) = parse_record(key, value)?;
        entries.map(|item| item.and_then(|(index, bytes)| codec::decode_entry(index, bytes))).collect()
    }

    #[test]
    fn a_chunk_gives_back_its_entries_and_a_legacy_record_reads_as_a_chunk_of_one() {
        let entries: Vec<Entry> = (7..12).map(|i| entry(i, i as usize * 10)).collect();
        let (key, value) = encode_chunk(&entries);
        assert_eq!(decode_all(&key, &value), Ok(entries.clone()));
        let legacy = codec::encode_entry(&entries[0]);
        assert_eq!(decode_all(&codec::log_key(7), &legacy), Ok(vec![entries[0].clone()]));
        let (start, _) = parse_record(&key, &value).expect("parses");
        assert_eq!((start, start.key()), (ChunkStart { first: 7, legacy: false }, key.to_vec()));
    }

    #[test]
    fn a_chunk_is_spelled_as_the_format_says() {
        let entries = [
            Entry { term: 3, index: 5, kind: EntryKind::Normal, data: Bytes::from_static(b"ab") },
            Entry { term: 4, index: 6, kind: EntryKind::ConfChange, data: Bytes::new() },
        ];
        let mut expected = 2u32.to_be_bytes().to_vec();
        for entry in &entries {
            let mut rest = entry.term.to_be_bytes().to_vec();
            rest.push(u8::from(entry.kind == EntryKind::ConfChange));
            rest.extend_from_slice(&entry.data);
            let crc = crc32fast::hash(&[&entry.index.to_be_bytes()[..], &rest].concat());
            expected.extend_from_slice(&(4 + rest.len() as u32).to_be_bytes());
            expected.extend_from_slice(&crc.to_be_bytes());
            expected.extend_from_slice(&rest);
        }
        let (key, value) = encode_chunk(&entries);
        assert_eq!((&key[..], &*value), (&[0, 0, 0, 0, 0, 0, 0, 5, CHUNK_KEY_TAG][..], &expected[..]));
    }

    #[test]
    fn damage_anywhere_in_a_chunk_is_caught() {
        let entries: Vec<Entry> = (1..4).map(|i| entry(i, 20)).collect();
        let (key, value) = encode_chunk(&entries);
        let value = value.to_vec();
        for at in 0..value.len() {
            let mut broken = value.clone();
            broken[at] ^= 0x40;
            assert!(decode_all(&key, &broken).is_err(), "a flipped bit at byte {at} went unnoticed");
        }
        for len in 0..value.len() {
            assert!(decode_all(&key, &value[..len]).is_err(), "cut at {len}");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode_all(&key, &longer).is_err(), "trailing byte");
        // The same chunk under another index fails every entry's checksum.
        let (moved, _) = encode_chunk(&[entry(2, 1)]);
        assert!(decode_all(&moved, &value).is_err());
    }

    #[test]
    fn runs_stay_under_the_chunk_size_except_for_one_large_entry() {
        let entries: Vec<Entry> = (1..=40).map(|i| entry(i, if i == 20 { 600 << 10 } else { 30 << 10 })).collect();
        let runs = chunk_runs(&entries);
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), 40);
        assert!(runs.iter().any(|r| r.len() == 1 && r[0].index == 20), "the large entry travels alone");
        for run in &runs {
            let bytes: usize = run.iter().map(|e| e.data.len()).sum();
            assert!(run.len() == 1 || bytes <= CHUNK_BYTES_MAX, "{} entries, {bytes} bytes", run.len());
            assert!(run.windows(2).all(|w| w[1].index == w[0].index + 1));
        }
        assert!(chunk_runs(&[]).is_empty());
    }
}
