//! What a log entry carries, as bytes.
//!
//! The core replicates opaque entry data. The node puts one of three things
//! in a normal entry (a client command, a chunk of a module being deployed,
//! an activation), stamped with the leader's clock so that every replica
//! sees the same time; a membership change entry carries the address book
//! of the configuration it makes. Both codecs live here, next to each other,
//! so that the writer (the core task) and the reader (the apply task) cannot
//! drift apart.

use super::pb::{self, entry_payload};
use crate::raft::{Entry, EntryKind, NodeId};
use bytes::Bytes;
use prost::Message as _;
use std::collections::BTreeMap;

/// What a normal entry carries: a command, a module chunk or an activation.
pub type Payload = entry_payload::Kind;

/// A decoded normal entry: its payload and the leader's clock when it was
/// proposed.
#[derive(Clone, Debug, PartialEq)]
pub struct StampedPayload {
    pub timestamp_ms: u64,
    pub payload: Payload,
}

/// Encodes what an entry carries, stamped with the leader's clock.
pub fn encode_payload(timestamp_ms: u64, payload: Payload) -> Bytes {
    let payload = pb::EntryPayload { timestamp_ms, kind: Some(payload) };
    Bytes::from(payload.encode_to_vec())
}

/// The payload of a normal entry; `None` for a leader's no-op, a membership
/// change, or data this version cannot decode (which every replica then
/// skips alike).
pub fn decode_payload(entry: &Entry) -> Option<StampedPayload> {
    if entry.kind != EntryKind::Normal || entry.is_noop() {
        return None;
    }
    let decoded = pb::EntryPayload::decode(entry.data.clone()).ok()?;
    Some(StampedPayload { timestamp_ms: decoded.timestamp_ms, payload: decoded.kind? })
}

/// Encodes an address book for a membership change entry's context.
pub fn encode_addresses(addresses: &BTreeMap<NodeId, String>) -> Bytes {
    let text: String = addresses.iter().map(|(id, address)| format!("{id}={address}\n")).collect();
    Bytes::from(text)
}

/// Decodes [`encode_addresses`]; malformed lines are skipped (a leader of
/// this version never writes them).
pub fn decode_addresses(bytes: &[u8]) -> BTreeMap<NodeId, String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|line| {
            let (id, address) = line.split_once('=')?;
            Some((id.parse().ok()?, address.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(data: Bytes) -> Entry {
        Entry { term: 2, index: 7, kind: EntryKind::Normal, data }
    }

    #[test]
    fn a_payload_round_trips_with_its_stamp() {
        let command = pb::Command {
            state_machine: "kv".into(),
            command: Bytes::from_static(b"{}"),
            client_id: Bytes::from_static(b"c"),
            sequence: 3,
            lowest_unanswered: 2,
        };
        let entry = normal(encode_payload(1_700_000_000_000, Payload::Command(command.clone())));
        assert_eq!(
            decode_payload(&entry),
            Some(StampedPayload { timestamp_ms: 1_700_000_000_000, payload: Payload::Command(command) })
        );
    }

    #[test]
    fn no_ops_membership_changes_and_garbage_carry_no_payload() {
        assert_eq!(decode_payload(&normal(Bytes::new())), None, "a leader's no-op");
        assert_eq!(decode_payload(&normal(Bytes::from_static(b"\xff\xff\xff"))), None, "garbage");
        let data = encode_payload(1, Payload::Activate(pb::Activate::default()));
        let change = Entry { kind: EntryKind::ConfChange, ..normal(data) };
        assert_eq!(decode_payload(&change), None, "a membership change is the core's format");
    }

    #[test]
    fn addresses_round_trip_and_malformed_lines_are_skipped() {
        let addresses: BTreeMap<NodeId, String> =
            [(1, "127.0.0.1:7001".to_string()), (2, "[::1]:7002".to_string())].into();
        assert_eq!(decode_addresses(&encode_addresses(&addresses)), addresses);
        assert_eq!(decode_addresses(b"garbage\n3=h:1\nx=y\n"), [(3, "h:1".to_string())].into());
    }
}
