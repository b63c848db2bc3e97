//! Plain data shared by the core and its driver: ids, entries, persistent state,
//! configurations and messages. These are the core's own types; protobuf
//! conversions live in `rpc`, so the wire format can change without touching
//! the algorithm.

use bytes::Bytes;
use std::collections::BTreeSet;

/// A member's id. `0` is never a valid id (it reads as "none" in logs and on the
/// wire), which the configuration constructors enforce.
pub type NodeId = u64;
/// A Raft term. Terms only grow on every node.
pub type Term = u64;
/// A log index. The first real entry has index 1; index 0 with term 0 is the
/// empty prefix every log shares.
pub type Index = u64;

/// What an entry carries. The driver decides what `Normal` bytes mean (the node
/// encodes client commands and module deployments there); the core only needs
/// to know which entries change the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Application data; an empty payload is a leader's no-op.
    Normal,
    /// A membership change (encoded by the driver; applied through the core once
    /// membership changes land).
    ConfChange,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub kind: EntryKind,
    pub data: Bytes,
}

impl Entry {
    /// A leader's no-op, appended once at the start of every term so that the
    /// leader can commit (and learn the commit index of) earlier entries.
    pub fn noop(term: Term, index: Index) -> Entry {
        Entry { term, index, kind: EntryKind::Normal, data: Bytes::new() }
    }

    /// Whether this is a leader's no-op rather than application data.
    pub fn is_noop(&self) -> bool {
        self.kind == EntryKind::Normal && self.data.is_empty()
    }

    /// Bytes this entry counts for in message and batch limits: the payload
    /// plus a fixed allowance for the header, so that empty entries still cost
    /// something and a batch of them is bounded too.
    pub fn size_bytes(&self) -> u64 {
        self.data.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// Per-entry allowance for index, term and framing when sizing batches.
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

/// The state that must be durable before the core's dependent messages leave
/// the node (see [`crate::raft::Ready`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub vote: Option<NodeId>,
    /// The highest index known to be committed. Persisting it is an
    /// optimisation (a restarted node can apply up to it at once); losing it is
    /// safe.
    pub commit: Index,
}

/// The membership of the cluster as stored in the log and in snapshots.
///
/// `voters_outgoing` is non-empty only during a joint-consensus transition;
/// until membership changes land it is always empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    pub voters: BTreeSet<NodeId>,
    pub voters_outgoing: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

impl ConfState {
    /// A configuration of plain voters, as used to bootstrap a new cluster.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> ConfState {
        ConfState { voters: voters.into_iter().collect(), ..ConfState::default() }
    }

    /// Every member that receives replication: voters (old and new) and learners.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.voters.iter().chain(&self.voters_outgoing).chain(&self.learners).copied().collect()
    }
}

/// Where a snapshot cuts the log: everything up to and including `index` is in
/// the snapshot, and `term` is the term of that last entry. Index 0 means "no
/// snapshot".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
    pub conf_state: ConfState,
}

/// A node's role, as reported to the driver in [`SoftState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    /// Lower-case name for logs, status output and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

/// Volatile state the driver may want to show or act on (for example, failing
/// pending client requests when leadership is lost). It need not be persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub leader: Option<NodeId>,
    pub role: Role,
}

/// A linearizable read is safe once this node has applied `index`.
/// `ctx` is the driver's id for the request, returned unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub index: Index,
    pub ctx: u64,
}

/// A message between two members. `term` is the sender's current term, except
/// for a pre-vote request (the term the sender would campaign in) and a granted
/// pre-vote response (that same future term).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: MessageBody,
}

/// The message kinds of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// A vote or pre-vote request (Raft §5.2, thesis §9.6).
    RequestVote { pre_vote: bool, last_log_index: Index, last_log_term: Term },
    /// The answer to a vote or pre-vote request.
    RequestVoteResponse { pre_vote: bool, granted: bool },
    /// Log replication (Raft §5.3). `entries` continue the log right after
    /// `prev_log_index`.
    AppendEntries { prev_log_index: Index, prev_log_term: Term, entries: Vec<Entry>, leader_commit: Index },
    /// The answer to `AppendEntries`. On success `index` is the highest index
    /// now known to match the leader. On rejection `index` echoes the rejected
    /// `prev_log_index`, and the hint lets the leader skip a whole term of
    /// conflicting entries at once (thesis §5.3, "fast backtracking").
    AppendEntriesResponse { success: bool, index: Index, hint_index: Index, hint_term: Term },
    /// Keeps followers from campaigning and tells them the commit index (bounded
    /// by what the follower is known to have). `read_seq` carries the leader's
    /// latest ReadIndex round, if any.
    Heartbeat { commit: Index, read_seq: u64 },
    /// The answer to a heartbeat, echoing `read_seq`.
    HeartbeatResponse { read_seq: u64 },
    /// A follower asks the leader for a read index on behalf of its client.
    ReadIndex { ctx: u64 },
    /// The leader's answer to a forwarded ReadIndex; `index` 0 means refused
    /// (for example, the leader lost leadership), and the follower reports
    /// nothing, so the driver retries or times the read out.
    ReadIndexResponse { ctx: u64, index: Index },
}

impl MessageBody {
    /// Short name for logs and traces.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::RequestVote { pre_vote: true, .. } => "PreVote",
            MessageBody::RequestVote { pre_vote: false, .. } => "RequestVote",
            MessageBody::RequestVoteResponse { pre_vote: true, .. } => "PreVoteResponse",
            MessageBody::RequestVoteResponse { pre_vote: false, .. } => "RequestVoteResponse",
            MessageBody::AppendEntries { .. } => "AppendEntries",
            MessageBody::AppendEntriesResponse { .. } => "AppendEntriesResponse",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageBody::ReadIndex { .. } => "ReadIndex",
            MessageBody::ReadIndexResponse { .. } => "ReadIndexResponse",
        }
    }

    /// Whether this message is only ever sent by a leader of `term`; receiving
    /// one proves that the sender is (or was) the leader of that term.
    pub fn is_from_leader(&self) -> bool {
        matches!(
            self,
            MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. } | MessageBody::ReadIndexResponse { .. }
        )
    }
}
