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
    /// A membership change: `data` is a [`ConfChange`] in the core's own
    /// encoding. It takes effect on every member when it is applied.
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
/// the node (see [`crate::Ready`]).
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

    /// The configuration after `change`, or why it cannot be made. Every
    /// member runs this same function on the same entries, so a refused
    /// change is refused everywhere and leaves the configuration unchanged.
    pub fn apply_change(&self, change: &ConfChange) -> Result<ConfState, String> {
        let mut next = self.clone();
        let id = change.node;
        match change.kind {
            ConfChangeKind::AddLearner => {
                if self.members().contains(&id) {
                    return Err(format!("node {id} is already a member"));
                }
                next.learners.insert(id);
            }
            ConfChangeKind::Promote => {
                if self.voters.contains(&id) {
                    return Err(format!("node {id} is already a voter"));
                }
                if !next.learners.remove(&id) {
                    return Err(format!("node {id} is not a learner; add it as a learner first"));
                }
                next.voters.insert(id);
            }
            ConfChangeKind::Remove => {
                if !next.voters.remove(&id) && !next.learners.remove(&id) {
                    return Err(format!("node {id} is not a member"));
                }
                if next.voters.is_empty() {
                    return Err(format!("removing node {id} would leave no voters"));
                }
            }
        }
        Ok(next)
    }
}

/// What a membership change does to one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConfChangeKind {
    /// Adds a non-voting member that receives the log (and snapshots) and
    /// catches up before it is promoted.
    AddLearner,
    /// Makes a learner a voter.
    Promote,
    /// Removes a voter or a learner.
    Remove,
}

/// One membership change, as an operator asks for it.
///
/// Changes are one member at a time (thesis §4.1): any two majorities of
/// configurations that differ by one voter overlap, so no joint phase is
/// needed. A change takes effect when it is applied, and a leader proposes the
/// next one only after the previous one is applied and after it has committed
/// an entry of its own term (the fix to single-server changes from the
/// raft-dev list, 2015).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConfChange {
    pub kind: ConfChangeKind,
    pub node: NodeId,
    /// Opaque to the core: the driver puts what other members need to reach
    /// the node (its address) here.
    pub context: Bytes,
}

/// What an [`EntryKind::ConfChange`] entry carries: the change and the whole
/// configuration it results in. Applying the entry adopts that configuration
/// as is, so a member that replays the log from any starting point (a node
/// that joined with no configuration at all) ends with the same one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfChangeEntry {
    pub change: ConfChange,
    pub conf: ConfState,
}

impl ConfChangeEntry {
    /// The entry payload: kind (1 byte), node id (8 bytes BE), the three
    /// member lists (count u32 BE, then ids), then the context.
    pub fn encode(&self) -> Bytes {
        let ids = self.conf.voters.len() + self.conf.voters_outgoing.len() + self.conf.learners.len();
        let mut out = Vec::with_capacity(21 + 8 * ids + self.change.context.len());
        out.push(match self.change.kind {
            ConfChangeKind::AddLearner => 1,
            ConfChangeKind::Promote => 2,
            ConfChangeKind::Remove => 3,
        });
        out.extend_from_slice(&self.change.node.to_be_bytes());
        for set in [&self.conf.voters, &self.conf.voters_outgoing, &self.conf.learners] {
            out.extend_from_slice(&(set.len() as u32).to_be_bytes());
            for id in set {
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.change.context);
        Bytes::from(out)
    }

    /// Decodes a payload written by [`ConfChangeEntry::encode`].
    pub fn decode(data: &[u8]) -> Result<ConfChangeEntry, String> {
        let mut rest = data;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if rest.len() < n {
                return Err(format!("membership change of {} bytes is truncated", data.len()));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let kind = match take(1)?[0] {
            1 => ConfChangeKind::AddLearner,
            2 => ConfChangeKind::Promote,
            3 => ConfChangeKind::Remove,
            other => return Err(format!("unknown membership change kind {other}")),
        };
        let read_u64 = |bytes: &[u8]| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let node = read_u64(take(8)?);
        if node == 0 {
            return Err("membership change names node 0".to_string());
        }
        let mut sets = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
        for set in &mut sets {
            let count = read_u64(take(4)?) as usize;
            for _ in 0..count {
                set.insert(read_u64(take(8)?));
            }
        }
        let [voters, voters_outgoing, learners] = sets;
        let context = Bytes::copy_from_slice(rest);
        Ok(ConfChangeEntry {
            change: ConfChange { kind, node, context },
            conf: ConfState { voters, voters_outgoing, learners },
        })
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
    /// A vote or pre-vote request (Raft §5.2, thesis §9.6). `transfer` marks
    /// the election a leader asked for (TimeoutNow): voters grant it even
    /// while they still hear from that leader.
    RequestVote { pre_vote: bool, last_log_index: Index, last_log_term: Term, transfer: bool },
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
    /// The follower needs entries the leader has compacted: it installs a
    /// snapshot instead. The leader's core names the earliest point that
    /// will do (its compaction point); the driver ships its state at that
    /// point or any later applied point, and the receiving driver hands the
    /// core this message, with the shipped point, once the data is staged.
    InstallSnapshot { snapshot: SnapshotMeta },
    /// A leader hands over leadership: the receiver campaigns at once.
    TimeoutNow,
    /// "Entries up to `commit` are committed, and mine there has `term`",
    /// sent with a refused vote. Any member may say it: by log matching, a
    /// receiver whose entry at `commit` has `term` holds the same prefix,
    /// so it may commit it too. It matters when the only voters left lost
    /// (in a crash) what they had committed, including the membership
    /// change that made them the only voters, while a removed member, whose
    /// vote they would need in the older membership, still knows it.
    CommitHint { commit: Index, term: Term },
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
            MessageBody::InstallSnapshot { .. } => "InstallSnapshot",
            MessageBody::TimeoutNow => "TimeoutNow",
            MessageBody::CommitHint { .. } => "CommitHint",
        }
    }

    /// Whether this message is only ever sent by a leader of `term`; receiving
    /// one proves that the sender is (or was) the leader of that term.
    pub fn is_from_leader(&self) -> bool {
        matches!(
            self,
            MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::ReadIndexResponse { .. }
                | MessageBody::InstallSnapshot { .. }
                | MessageBody::TimeoutNow
        )
    }
}
