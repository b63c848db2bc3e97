//! Byte layouts of everything the store writes. Every value carries a CRC32 of
//! its contents (and, for log entries, of its index), so a flipped bit, a
//! torn write that fjall did not catch, or a value moved under another key is
//! detected when read, never returned as data.
//!
//! Integers are big-endian so that keys sort numerically.

use crate::raft::{ConfState, Entry, EntryKind, HardState, Index, NodeId, SnapshotMeta, Term};
use bytes::Bytes;
use std::collections::BTreeSet;

/// Why a stored value could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

/// Key of the log entry at `index`.
pub fn log_key(index: Index) -> [u8; 8] {
    index.to_be_bytes()
}

pub fn decode_log_key(key: &[u8]) -> Result<Index, DecodeError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| DecodeError("log key is not 8 bytes"))?;
    Ok(Index::from_be_bytes(bytes))
}

const LOG_HEADER_BYTES: usize = 4 + 8 + 1;

/// An entry as the log stores it (see [`write_entry`]), on its own: format 1's
/// record, and the reference the tests check chunks against.
#[cfg(test)]
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut out = vec![0; encoded_entry_len(entry)];
    write_entry(entry, &mut out);
    out
}

/// Bytes [`write_entry`] makes of `entry`.
pub fn encoded_entry_len(entry: &Entry) -> usize {
    LOG_HEADER_BYTES + entry.data.len()
}

/// Writes `entry` as `[crc32 of (index, rest)][term][kind][data]` into
/// `out`, which is exactly [`encoded_entry_len`] long: log records are
/// built in place this way.
pub fn write_entry(entry: &Entry, out: &mut [u8]) {
    debug_assert_eq!(out.len(), encoded_entry_len(entry), "an entry fills its place exactly");
    out[4..12].copy_from_slice(&entry.term.to_be_bytes());
    out[12] = match entry.kind {
        EntryKind::Normal => 0,
        EntryKind::ConfChange => 1,
    };
    out[LOG_HEADER_BYTES..].copy_from_slice(&entry.data);
    let crc = entry_crc(entry.index, &out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
}

fn entry_crc(index: Index, rest: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_be_bytes());
    hasher.update(rest);
    hasher.finalize()
}

/// Decodes and verifies the entry stored under `index`.
pub fn decode_entry(index: Index, value: &[u8]) -> Result<Entry, DecodeError> {
    if value.len() < LOG_HEADER_BYTES {
        return Err(DecodeError("log entry shorter than its header"));
    }
    let stored = u32::from_be_bytes(value[..4].try_into().expect("4 bytes"));
    if entry_crc(index, &value[4..]) != stored {
        return Err(DecodeError("log entry checksum mismatch"));
    }
    let term = Term::from_be_bytes(value[4..12].try_into().expect("8 bytes"));
    let kind = match value[12] {
        0 => EntryKind::Normal,
        1 => EntryKind::ConfChange,
        _ => return Err(DecodeError("unknown log entry kind")),
    };
    Ok(Entry { term, index, kind, data: Bytes::copy_from_slice(&value[LOG_HEADER_BYTES..]) })
}

/// Bytes [`seal`] appends.
pub(super) const CHECKSUM_BYTES: usize = 4;

/// Appends a CRC32 to a metadata value.
pub(super) fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_be_bytes());
    body
}

/// Checks and strips the CRC32 of a metadata value.
pub fn unseal(value: &[u8]) -> Result<&[u8], DecodeError> {
    if value.len() < CHECKSUM_BYTES {
        return Err(DecodeError("value shorter than its checksum"));
    }
    let (body, crc) = value.split_at(value.len() - CHECKSUM_BYTES);
    if crc32fast::hash(body) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err(DecodeError("checksum mismatch"));
    }
    Ok(body)
}

/// The body of a sealed value whose checksum was already checked (or made
/// here), without checking it again.
pub(super) fn sealed_body(value: &[u8]) -> &[u8] {
    &value[..value.len().saturating_sub(CHECKSUM_BYTES)]
}

/// Appends `bytes` with its length before it (u32 BE).
pub(super) fn push_sized(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Appends `0` for none, or `1` and the bytes as [`push_sized`] does.
pub(super) fn push_optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => push_present(out, bytes.len(), |out| out.extend_from_slice(bytes)),
        None => out.push(0),
    }
}

/// Appends a present value as [`push_optional`] does, `len` bytes long,
/// that `write` appends in place (encoding it straight into `out`).
pub(super) fn push_present(out: &mut Vec<u8>, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
    out.push(1);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    let start = out.len();
    write(out);
    debug_assert_eq!(out.len() - start, len, "a value is as long as announced");
}

/// Writes the fields [`push_sized`] and [`push_optional`] append, in the
/// same layout, into a buffer sized for them up front (one fjall keeps, so
/// a record is not built in a Vec and copied), then seals it. Writing past
/// the buffer, or sealing one not filled to its checksum, is a bug in the
/// caller's size count and panics.
pub(super) struct FieldWriter<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> FieldWriter<'a> {
    pub fn new(out: &'a mut [u8]) -> FieldWriter<'a> {
        FieldWriter { out, at: 0 }
    }

    pub fn put(&mut self, bytes: &[u8]) {
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    pub fn put_sized(&mut self, bytes: &[u8]) {
        self.put(&(bytes.len() as u32).to_be_bytes());
        self.put(bytes);
    }

    pub fn put_optional(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            Some(bytes) => {
                self.put(&[1]);
                self.put_sized(bytes);
            }
            None => self.put(&[0]),
        }
    }

    /// Writes the checksum [`seal`] appends over what was written, into
    /// the buffer's last [`CHECKSUM_BYTES`].
    pub fn seal(self) {
        assert_eq!(self.at + CHECKSUM_BYTES, self.out.len(), "a sealed buffer is filled up to its checksum");
        let crc = crc32fast::hash(&self.out[..self.at]);
        self.out[self.at..].copy_from_slice(&crc.to_be_bytes());
    }
}

/// Reads the fields [`push_sized`] and [`push_optional`] write (and
/// big-endian integers) off the front of a record's body.
pub(super) struct FieldReader<'a>(&'a [u8]);

impl<'a> FieldReader<'a> {
    pub fn new(body: &'a [u8]) -> FieldReader<'a> {
        FieldReader(body)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("record ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    pub fn sized(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()?;
        self.take(len as usize)
    }

    pub fn optional(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => self.sized().map(Some),
            _ => Err(DecodeError("record has an unknown value tag")),
        }
    }

    /// The body must end here.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() { Ok(()) } else { Err(DecodeError("record has trailing bytes")) }
    }
}

/// Reads big-endian integers off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64, DecodeError> {
        if self.0.len() < 8 {
            return Err(DecodeError("value ends early"));
        }
        let (head, rest) = self.0.split_at(8);
        self.0 = rest;
        Ok(u64::from_be_bytes(head.try_into().expect("8 bytes")))
    }

    fn set(&mut self) -> Result<BTreeSet<NodeId>, DecodeError> {
        let len = self.u64()?;
        if len > 4096 {
            return Err(DecodeError("implausibly large member set"));
        }
        (0..len).map(|_| self.u64()).collect()
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() { Ok(()) } else { Err(DecodeError("trailing bytes")) }
    }
}

pub fn encode_hard_state(hs: &HardState) -> Vec<u8> {
    let mut body = Vec::with_capacity(24);
    body.extend_from_slice(&hs.term.to_be_bytes());
    body.extend_from_slice(&hs.vote.unwrap_or(0).to_be_bytes());
    body.extend_from_slice(&hs.commit.to_be_bytes());
    seal(body)
}

pub fn decode_hard_state(value: &[u8]) -> Result<HardState, DecodeError> {
    let mut r = Reader(unseal(value)?);
    let term = r.u64()?;
    let vote = r.u64()?;
    let commit = r.u64()?;
    r.finish()?;
    Ok(HardState { term, vote: (vote != 0).then_some(vote), commit })
}

fn push_set(body: &mut Vec<u8>, set: &BTreeSet<NodeId>) {
    body.extend_from_slice(&(set.len() as u64).to_be_bytes());
    for id in set {
        body.extend_from_slice(&id.to_be_bytes());
    }
}

fn push_conf_state(body: &mut Vec<u8>, conf: &ConfState) {
    push_set(body, &conf.voters);
    push_set(body, &conf.voters_outgoing);
    push_set(body, &conf.learners);
}

fn read_conf_state(r: &mut Reader<'_>) -> Result<ConfState, DecodeError> {
    Ok(ConfState { voters: r.set()?, voters_outgoing: r.set()?, learners: r.set()? })
}

pub fn encode_conf_state(conf: &ConfState) -> Vec<u8> {
    let mut body = Vec::new();
    push_conf_state(&mut body, conf);
    seal(body)
}

pub fn decode_conf_state(value: &[u8]) -> Result<ConfState, DecodeError> {
    let mut r = Reader(unseal(value)?);
    let conf = read_conf_state(&mut r)?;
    r.finish()?;
    Ok(conf)
}

/// A set of member ids (the members removed from a cluster over its life,
/// which may outgrow a configuration's bound).
pub fn encode_ids(ids: &BTreeSet<NodeId>) -> Vec<u8> {
    let mut body = Vec::new();
    push_set(&mut body, ids);
    seal(body)
}

pub fn decode_ids(value: &[u8]) -> Result<BTreeSet<NodeId>, DecodeError> {
    const IDS_MAX: u64 = 1 << 20;
    let mut r = Reader(unseal(value)?);
    let len = r.u64()?;
    if len > IDS_MAX {
        return Err(DecodeError("implausibly many member ids"));
    }
    let ids = (0..len).map(|_| r.u64()).collect::<Result<_, _>>()?;
    r.finish()?;
    Ok(ids)
}

pub fn encode_snapshot_meta(meta: &SnapshotMeta) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&meta.index.to_be_bytes());
    body.extend_from_slice(&meta.term.to_be_bytes());
    push_conf_state(&mut body, &meta.conf_state);
    seal(body)
}

pub fn decode_snapshot_meta(value: &[u8]) -> Result<SnapshotMeta, DecodeError> {
    let mut r = Reader(unseal(value)?);
    let index = r.u64()?;
    let term = r.u64()?;
    let conf_state = read_conf_state(&mut r)?;
    r.finish()?;
    Ok(SnapshotMeta { index, term, conf_state })
}

/// The applied position: index and term of the last applied entry.
pub fn encode_applied(index: Index, term: Term) -> Vec<u8> {
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&index.to_be_bytes());
    body.extend_from_slice(&term.to_be_bytes());
    seal(body)
}

pub fn decode_applied(value: &[u8]) -> Result<(Index, Term), DecodeError> {
    let mut r = Reader(unseal(value)?);
    let index = r.u64()?;
    let term = r.u64()?;
    r.finish()?;
    Ok((index, term))
}

/// The members' addresses: `[count u64]` then `[id u64][len u64][address]`.
pub fn encode_members(members: &std::collections::BTreeMap<NodeId, String>) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(members.len() as u64).to_be_bytes());
    for (id, address) in members {
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&(address.len() as u64).to_be_bytes());
        body.extend_from_slice(address.as_bytes());
    }
    seal(body)
}

pub fn decode_members(value: &[u8]) -> Result<std::collections::BTreeMap<NodeId, String>, DecodeError> {
    let mut r = Reader(unseal(value)?);
    let count = r.u64()?;
    if count > 4096 {
        return Err(DecodeError("implausibly many members"));
    }
    let mut members = std::collections::BTreeMap::new();
    for _ in 0..count {
        let id = r.u64()?;
        let len = r.u64()? as usize;
        if len > r.0.len() {
            return Err(DecodeError("value ends early"));
        }
        let (address, rest) = r.0.split_at(len);
        r.0 = rest;
        let address = String::from_utf8(address.to_vec()).map_err(|_| DecodeError("address is not UTF-8"))?;
        members.insert(id, address);
    }
    r.finish()?;
    Ok(members)
}

/// Checksummed opaque value (guest state, sessions, artifacts), built
/// straight into the buffer fjall keeps: one allocation and one copy of the
/// value, where a Vec handed to fjall costs two of each (fjall copies it
/// into its own buffer).
pub fn encode_blob(value: &[u8]) -> fjall::Slice {
    let crc = crc32fast::hash(value).to_be_bytes();
    fjall::Slice::from(byteview::ByteView::fused(value, &crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_the_sealed_value_and_unseals_to_it() {
        for len in [0, 1, 15, 16, 17, 20, 21, 256, 70_000] {
            let value: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let blob = encode_blob(&value);
            assert_eq!(&*blob, seal(value.clone()).as_slice(), "{len} bytes");
            assert_eq!(unseal(&blob).expect("checksum"), value.as_slice(), "{len} bytes");
        }
    }

    #[test]
    fn a_field_writer_writes_what_the_appending_helpers_and_seal_make() {
        let fields: [(&[u8], Option<&[u8]>); 3] = [(b"key", Some(b"value")), (b"", None), (&[7; 300], Some(&[]))];
        let mut appended = Vec::new();
        for (sized, optional) in fields {
            push_sized(&mut appended, sized);
            push_optional(&mut appended, optional);
        }
        let appended = seal(appended);
        let mut written = vec![0xaa; appended.len()];
        let mut out = FieldWriter::new(&mut written);
        for (sized, optional) in fields {
            out.put_sized(sized);
            out.put_optional(optional);
        }
        out.seal();
        assert_eq!(written, appended);
        assert!(unseal(&written).is_ok());
    }

    #[test]
    #[should_panic(expected = "filled up to its checksum")]
    fn sealing_a_buffer_sized_wrong_is_caught() {
        let mut written = vec![0; 16];
        let mut out = FieldWriter::new(&mut written);
        out.put(b"short");
        out.seal();
    }

    #[test]
    fn entries_round_trip_and_any_flipped_bit_is_caught() {
        let entry = Entry { term: 7, index: 42, kind: EntryKind::ConfChange, data: Bytes::from_static(b"payload") };
        let encoded = encode_entry(&entry);
        assert_eq!(decode_entry(42, &encoded), Ok(entry));
        for byte in 0..encoded.len() {
            for bit in 0..8 {
                let mut bad = encoded.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode_entry(42, &bad).is_err(), "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
        assert!(decode_entry(43, &encoded).is_err(), "an entry moved under another index is caught");
    }

    #[test]
    fn metadata_round_trips() {
        let hs = HardState { term: 5, vote: Some(3), commit: 99 };
        assert_eq!(decode_hard_state(&encode_hard_state(&hs)), Ok(hs));
        let none = HardState { term: 1, vote: None, commit: 0 };
        assert_eq!(decode_hard_state(&encode_hard_state(&none)), Ok(none));
        let conf = ConfState { voters: [1, 2, 3].into(), voters_outgoing: [4].into(), learners: [5, 6].into() };
        assert_eq!(decode_conf_state(&encode_conf_state(&conf)), Ok(conf.clone()));
        let meta = SnapshotMeta { index: 10, term: 2, conf_state: conf };
        assert_eq!(decode_snapshot_meta(&encode_snapshot_meta(&meta)), Ok(meta));
        assert_eq!(decode_applied(&encode_applied(8, 3)), Ok((8, 3)));
        let members: std::collections::BTreeMap<NodeId, String> =
            [(1, "127.0.0.1:7001".to_string()), (4, "[::1]:7004".to_string())].into();
        assert_eq!(decode_members(&encode_members(&members)), Ok(members));
        let removed: BTreeSet<NodeId> = [3, 9].into();
        assert_eq!(decode_ids(&encode_ids(&removed)), Ok(removed));
        let mut bad = encode_applied(8, 3);
        bad[0] ^= 1;
        assert!(decode_applied(&bad).is_err());
    }
}
