//! Peer messages on the wire: the envelope that carries a batch of core
//! messages between two members, and the conversions between protobuf and the
//! consensus core's own types. Everything that arrives is checked here before
//! the core sees it: the cluster id, the sender, the receiver, and every
//! field's shape.

use super::bounded::MESSAGES_PER_ENVELOPE_MAX;
use super::pb;
use crate::raft::{ConfState, Entry, EntryKind, Message, MessageBody, NodeId, SnapshotMeta};
use thiserror::Error;

/// Why an incoming envelope was refused. Nothing in it reached the core.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("message from cluster {found:?}, this is cluster {expected:?}")]
    WrongCluster { found: String, expected: String },
    #[error("message from node {0}, which is not a member of this cluster")]
    UnknownSender(NodeId),
    #[error("message from node {0}, which was removed from this cluster; removed members never count again")]
    RemovedSender(NodeId),
    #[error("message claims to come from member {claimed}, but the connection's certificate is member {certified}'s")]
    NotTheCertificateHolder { claimed: NodeId, certified: NodeId },
    #[error("message for node {found}, this is node {expected}")]
    WrongReceiver { found: NodeId, expected: NodeId },
    #[error("envelope carries {0} messages, above the limit of {MESSAGES_PER_ENVELOPE_MAX}")]
    TooManyMessages(usize),
    #[error("message {position} of the envelope has no body")]
    EmptyMessage { position: usize },
    #[error("message {position} of the envelope is a snapshot without its data; snapshots travel by InstallSnapshot")]
    SnapshotOutsideStream { position: usize },
}

/// Wraps messages from `from` to `to` for the wire.
pub fn seal_envelope(cluster_id: &str, from: NodeId, to: NodeId, messages: &[Message]) -> pb::Envelope {
    pb::Envelope {
        cluster_id: cluster_id.to_string(),
        from,
        to,
        messages: messages.iter().map(message_to_pb).collect(),
    }
}

/// Checks an incoming envelope against this node and its cluster (and, when
/// the connection that carried it had a member's certificate, against that
/// member), and turns it into core messages.
pub fn open_envelope(
    envelope: pb::Envelope,
    cluster_id: &str,
    me: NodeId,
    certified: Option<NodeId>,
    is_member: impl Fn(NodeId) -> bool,
) -> Result<Vec<Message>, EnvelopeError> {
    if envelope.cluster_id != cluster_id {
        return Err(EnvelopeError::WrongCluster { found: envelope.cluster_id, expected: cluster_id.to_string() });
    }
    if let Some(certified) = certified
        && certified != envelope.from
    {
        return Err(EnvelopeError::NotTheCertificateHolder { claimed: envelope.from, certified });
    }
    if envelope.to != me {
        return Err(EnvelopeError::WrongReceiver { found: envelope.to, expected: me });
    }
    if envelope.from == me || !is_member(envelope.from) {
        return Err(EnvelopeError::UnknownSender(envelope.from));
    }
    if envelope.messages.len() > MESSAGES_PER_ENVELOPE_MAX {
        return Err(EnvelopeError::TooManyMessages(envelope.messages.len()));
    }
    let (from, to) = (envelope.from, envelope.to);
    envelope
        .messages
        .into_iter()
        .enumerate()
        .map(|(position, m)| {
            let message = message_from_pb(m, from, to).ok_or(EnvelopeError::EmptyMessage { position })?;
            // Only the snapshot stream may hand the core a snapshot: it
            // stages the data first.
            if let MessageBody::InstallSnapshot { .. } = message.body {
                return Err(EnvelopeError::SnapshotOutsideStream { position });
            }
            Ok(message)
        })
        .collect()
}

fn entry_to_pb(entry: &Entry) -> pb::Entry {
    pb::Entry {
        term: entry.term,
        index: entry.index,
        kind: match entry.kind {
            EntryKind::Normal => pb::EntryKind::Normal,
            EntryKind::ConfChange => pb::EntryKind::ConfChange,
        } as i32,
        data: entry.data.clone(),
    }
}

fn entry_from_pb(entry: pb::Entry) -> Entry {
    // Unknown kinds cannot come from a member of the same version; reading
    // them as data keeps them inert rather than trusted as membership.
    let kind = match pb::EntryKind::try_from(entry.kind) {
        Ok(pb::EntryKind::ConfChange) => EntryKind::ConfChange,
        _ => EntryKind::Normal,
    };
    Entry { term: entry.term, index: entry.index, kind, data: entry.data }
}

/// A core message as a protobuf message (sender and receiver go on the envelope).
pub fn message_to_pb(message: &Message) -> pb::Message {
    use pb::message::Body;
    let body = match &message.body {
        MessageBody::RequestVote { pre_vote, last_log_index, last_log_term, transfer } => {
            Body::RequestVote(pb::RequestVote {
                pre_vote: *pre_vote,
                last_log_index: *last_log_index,
                last_log_term: *last_log_term,
                transfer: *transfer,
            })
        }
        MessageBody::RequestVoteResponse { pre_vote, granted } => {
            Body::RequestVoteResponse(pb::RequestVoteResponse { pre_vote: *pre_vote, granted: *granted })
        }
        MessageBody::AppendEntries { prev_log_index, prev_log_term, entries, leader_commit } => {
            Body::AppendEntries(pb::AppendEntries {
                prev_log_index: *prev_log_index,
                prev_log_term: *prev_log_term,
                entries: entries.iter().map(entry_to_pb).collect(),
                leader_commit: *leader_commit,
            })
        }
        MessageBody::AppendEntriesResponse { success, index, hint_index, hint_term } => {
            Body::AppendEntriesResponse(pb::AppendEntriesResponse {
                success: *success,
                index: *index,
                hint_index: *hint_index,
                hint_term: *hint_term,
            })
        }
        MessageBody::Heartbeat { commit, read_seq } => {
            Body::Heartbeat(pb::Heartbeat { commit: *commit, read_seq: *read_seq })
        }
        MessageBody::HeartbeatResponse { read_seq } => {
            Body::HeartbeatResponse(pb::HeartbeatResponse { read_seq: *read_seq })
        }
        MessageBody::ReadIndex { ctx } => Body::ReadIndex(pb::ReadIndex { ctx: *ctx }),
        MessageBody::ReadIndexResponse { ctx, index } => {
            Body::ReadIndexResponse(pb::ReadIndexResponse { ctx: *ctx, index: *index })
        }
        MessageBody::InstallSnapshot { snapshot } => Body::InstallSnapshot(snapshot_meta_to_pb(snapshot)),
        MessageBody::TimeoutNow => Body::TimeoutNow(pb::TimeoutNow {}),
        MessageBody::CommitHint { commit, term } => Body::CommitHint(pb::CommitHint { commit: *commit, term: *term }),
    };
    pb::Message { term: message.term, body: Some(body) }
}

/// A protobuf message from the envelope's sender to its receiver as a core
/// message; `None` when it has no body. The core validates the rest (entry
/// contiguity, terms, sizes) before touching any state.
pub fn message_from_pb(message: pb::Message, from: NodeId, to: NodeId) -> Option<Message> {
    use pb::message::Body;
    let body = match message.body? {
        Body::RequestVote(v) => MessageBody::RequestVote {
            pre_vote: v.pre_vote,
            last_log_index: v.last_log_index,
            last_log_term: v.last_log_term,
            transfer: v.transfer,
        },
        Body::RequestVoteResponse(v) => MessageBody::RequestVoteResponse { pre_vote: v.pre_vote, granted: v.granted },
        Body::AppendEntries(a) => MessageBody::AppendEntries {
            prev_log_index: a.prev_log_index,
            prev_log_term: a.prev_log_term,
            entries: a.entries.into_iter().map(entry_from_pb).collect(),
            leader_commit: a.leader_commit,
        },
        Body::AppendEntriesResponse(a) => MessageBody::AppendEntriesResponse {
            success: a.success,
            index: a.index,
            hint_index: a.hint_index,
            hint_term: a.hint_term,
        },
        Body::Heartbeat(h) => MessageBody::Heartbeat { commit: h.commit, read_seq: h.read_seq },
        Body::HeartbeatResponse(h) => MessageBody::HeartbeatResponse { read_seq: h.read_seq },
        Body::ReadIndex(r) => MessageBody::ReadIndex { ctx: r.ctx },
        Body::ReadIndexResponse(r) => MessageBody::ReadIndexResponse { ctx: r.ctx, index: r.index },
        Body::InstallSnapshot(meta) => MessageBody::InstallSnapshot { snapshot: snapshot_meta_from_pb(meta) },
        Body::TimeoutNow(_) => MessageBody::TimeoutNow,
        Body::CommitHint(h) => MessageBody::CommitHint { commit: h.commit, term: h.term },
    };
    Some(Message { from, to, term: message.term, body })
}

/// A snapshot point as protobuf.
pub fn snapshot_meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta { index: meta.index, term: meta.term, conf_state: Some(conf_state_to_pb(&meta.conf_state)) }
}

/// A snapshot point from protobuf; a missing configuration reads as empty.
pub fn snapshot_meta_from_pb(meta: pb::SnapshotMeta) -> SnapshotMeta {
    SnapshotMeta {
        index: meta.index,
        term: meta.term,
        conf_state: meta.conf_state.map(conf_state_from_pb).unwrap_or_default(),
    }
}

/// A configuration as protobuf.
pub fn conf_state_to_pb(conf: &ConfState) -> pb::ConfState {
    pb::ConfState {
        voters: conf.voters.iter().copied().collect(),
        voters_outgoing: conf.voters_outgoing.iter().copied().collect(),
        learners: conf.learners.iter().copied().collect(),
    }
}

/// A configuration from protobuf.
pub fn conf_state_from_pb(conf: pb::ConfState) -> ConfState {
    ConfState {
        voters: conf.voters.into_iter().collect(),
        voters_outgoing: conf.voters_outgoing.into_iter().collect(),
        learners: conf.learners.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use prost::Message as _;
    use std::collections::BTreeSet;

    #[test]
    fn entries_share_their_data_with_the_wire_both_ways() {
        let data = Bytes::from(vec![7u8; 300]);
        let entry = Entry { term: 1, index: 1, kind: EntryKind::Normal, data: data.clone() };
        let sent = entry_to_pb(&entry);
        assert_eq!(sent.data.as_ptr(), data.as_ptr(), "each follower's message shares the leader's copy");
        let body =
            MessageBody::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![entry], leader_commit: 0 };
        let envelope = seal_envelope("c", 2, 1, &[Message { from: 2, to: 1, term: 1, body }]);
        let received = Bytes::from(envelope.encode_to_vec());
        let range = received.as_ptr_range();
        let messages = open_envelope(pb::Envelope::decode(received.clone()).expect("decodes"), "c", 1, None, |_| true)
            .expect("opens");
        let MessageBody::AppendEntries { entries, .. } = &messages[0].body else { panic!("{messages:?}") };
        assert_eq!(entries[0].data, data);
        assert!(range.contains(&entries[0].data.as_ptr()), "the follower's entry is a slice of what it received");
    }

    fn samples() -> Vec<Message> {
        let entry = |index, kind| Entry { term: 3, index, kind, data: Bytes::from_static(b"cmd") };
        let bodies = vec![
            MessageBody::RequestVote { pre_vote: true, last_log_index: 9, last_log_term: 2, transfer: true },
            MessageBody::RequestVoteResponse { pre_vote: false, granted: true },
            MessageBody::AppendEntries {
                prev_log_index: 4,
                prev_log_term: 2,
                entries: vec![entry(5, EntryKind::Normal), entry(6, EntryKind::ConfChange)],
                leader_commit: 4,
            },
            MessageBody::AppendEntriesResponse { success: false, index: 4, hint_index: 3, hint_term: 1 },
            MessageBody::Heartbeat { commit: 7, read_seq: 12 },
            MessageBody::HeartbeatResponse { read_seq: 12 },
            MessageBody::ReadIndex { ctx: 99 },
            MessageBody::ReadIndexResponse { ctx: 99, index: 41 },
            MessageBody::InstallSnapshot {
                snapshot: SnapshotMeta {
                    index: 40,
                    term: 2,
                    conf_state: ConfState {
                        voters: [1, 2, 3].into(),
                        voters_outgoing: BTreeSet::new(),
                        learners: [4].into(),
                    },
                },
            },
            MessageBody::TimeoutNow,
            MessageBody::CommitHint { commit: 37, term: 7 },
        ];
        bodies.into_iter().map(|body| Message { from: 2, to: 1, term: 3, body }).collect()
    }

    #[test]
    fn every_message_kind_survives_the_wire() {
        let messages = samples();
        for message in &messages {
            let back = message_from_pb(message_to_pb(message), message.from, message.to);
            assert_eq!(back.as_ref(), Some(message));
        }
        let in_envelopes: Vec<Message> =
            messages.into_iter().filter(|m| !matches!(m.body, MessageBody::InstallSnapshot { .. })).collect();
        let envelope = seal_envelope("c1", 2, 1, &in_envelopes);
        let bytes = envelope.encode_to_vec();
        let decoded = pb::Envelope::decode(bytes.as_slice()).expect("decodes");
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(open_envelope(decoded, "c1", 1, None, |id| members.contains(&id)), Ok(in_envelopes));
    }

    #[test]
    fn a_snapshot_message_outside_its_stream_is_refused() {
        let snapshot = samples().into_iter().find(|m| matches!(m.body, MessageBody::InstallSnapshot { .. }));
        let envelope = seal_envelope("c1", 2, 1, &[snapshot.expect("sample")]);
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(
            open_envelope(envelope, "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::SnapshotOutsideStream { position: 0 })
        );
    }

    #[test]
    fn envelopes_from_elsewhere_are_refused() {
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        let sealed = |cluster: &str, from, to| seal_envelope(cluster, from, to, &samples()[..1]);
        assert!(matches!(
            open_envelope(sealed("other", 2, 1), "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::WrongCluster { .. })
        ));
        assert_eq!(
            open_envelope(sealed("c1", 9, 1), "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::UnknownSender(9))
        );
        assert_eq!(
            open_envelope(sealed("c1", 1, 1), "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::UnknownSender(1))
        );
        assert_eq!(
            open_envelope(sealed("c1", 2, 3), "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::WrongReceiver { found: 3, expected: 1 })
        );
        assert_eq!(
            open_envelope(sealed("c1", 3, 1), "c1", 1, Some(2), |id| members.contains(&id)),
            Err(EnvelopeError::NotTheCertificateHolder { claimed: 3, certified: 2 }),
            "member 2's certificate cannot speak for member 3"
        );
        assert!(open_envelope(sealed("c1", 2, 1), "c1", 1, Some(2), |id| members.contains(&id)).is_ok());
        let mut empty = sealed("c1", 2, 1);
        empty.messages.push(pb::Message { term: 1, body: None });
        assert_eq!(
            open_envelope(empty, "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::EmptyMessage { position: 1 })
        );
        let mut flood = sealed("c1", 2, 1);
        flood.messages = vec![flood.messages[0].clone(); MESSAGES_PER_ENVELOPE_MAX + 1];
        assert!(matches!(
            open_envelope(flood, "c1", 1, None, |id| members.contains(&id)),
            Err(EnvelopeError::TooManyMessages(_))
        ));
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_not_a_panic() {
        for garbage in [&b"\xff\xff\xff\xff"[..], b"\x0a\x05ab", b"\x22\x02\x08"] {
            assert!(pb::Envelope::decode(garbage).is_err(), "{garbage:?}");
        }
    }
}
