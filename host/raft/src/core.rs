//! The consensus state machine of one node.
//!
//! Each role has its own step function; changing role is one call to a
//! `become_*` function, which resets all per-role state. Messages that need
//! durable state to be correct (votes, AppendEntries acknowledgements) are
//! queued apart from messages a leader may send before its own log is durable
//! (thesis §10.2.1); [`Ready`] hands both out.

use super::config::Config;
use super::log::RaftLog;
use super::log_store::{LogStore, StorageError};
use super::progress::{Progress, ProgressState};
use super::quorum::{JointConfig, MajorityConfig, VoteResult};
use super::types::{
    ConfChange, ConfChangeEntry, ConfState, Entry, EntryKind, HardState, Index, Message, MessageBody, NodeId,
    ReadState, Role, SnapshotMeta, SoftState, Term,
};
use super::{ProposeError, RaftError, ReadIndexError};
use bytes::Bytes;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Everything the driver must do after a batch of inputs, in this order:
///
/// 0. Install `snapshot`, when present: replace the state machine with the
///    snapshot's data (staged by the driver when it arrived), drop the whole
///    log, and record the snapshot point as applied, durably. The entries
///    that follow continue the log after it.
/// 1. Persist `entries` (appending, after dropping any existing entries at or
///    past the first one's index) and `hard_state`, durably (fsync).
///    `messages` may be sent before or while this happens; so may those
///    that [`Raft::take_messages`] gives before the next `Ready`.
/// 2. Send `persisted_messages`: only now, because they promise that the
///    durable state of step 1 exists (a granted vote, an acknowledged append).
/// 3. Apply `committed_entries` in order. They may include entries from step 1,
///    so never before it completes.
/// 4. Serve `read_states` once the state machine has applied their index.
/// 5. Call [`Raft::advance`].
///
/// `soft_state`, when present, tells the driver that the role or the known
/// leader changed; a driver fails its pending reads and proposals on a change
/// of leadership, since the core drops the ones it was tracking.
#[derive(Debug, Default)]
pub struct Ready {
    pub soft_state: Option<SoftState>,
    pub snapshot: Option<SnapshotMeta>,
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    pub messages: Vec<Message>,
    pub persisted_messages: Vec<Message>,
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
}

/// What a `Ready` handed out, so `advance()` knows what became durable and
/// what is being applied.
#[derive(Debug)]
struct ReadyMark {
    last_entry: Option<(Index, Term)>,
    last_committed: Option<Index>,
    snapshot: Option<Index>,
    /// The term and vote this Ready made durable, if it carried a hard state.
    term_vote: Option<(Term, Option<NodeId>)>,
    /// Membership changes among the committed entries, by index, applied in
    /// `advance`.
    conf_changes: Vec<(Index, Bytes)>,
}

/// A ReadIndex round: a read at `index` for `requester`, safe once a quorum
/// has acknowledged a heartbeat carrying `seq` or a later one.
#[derive(Debug)]
struct ReadRound {
    seq: u64,
    index: Index,
    requester: NodeId,
    ctx: u64,
}

/// Where a new proposal landed in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposed {
    pub term: Term,
    pub first_index: Index,
    pub last_index: Index,
}

/// One node's consensus core. See the module documentation of
/// [`crate`] for the contract with the driver.
pub struct Raft<S: LogStore> {
    id: NodeId,
    config: Config,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog<S>,
    voters: JointConfig,
    learners: BTreeSet<NodeId>,
    /// Per-member replication progress; meaningful only on a leader.
    progress: BTreeMap<NodeId, Progress>,
    /// Votes received in the current (pre-)election.
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    rng: ChaCha8Rng,
    messages: Vec<Message>,
    persisted_messages: Vec<Message>,
    read_states: Vec<ReadState>,
    /// Confirmation rounds in flight, oldest first (leader only).
    read_rounds: VecDeque<ReadRound>,
    /// Highest read round each member has acknowledged this term.
    read_acks: BTreeMap<NodeId, u64>,
    /// Numbers every heartbeat broadcast; never reset, so a response from an
    /// earlier term can never confirm a round of a later one.
    last_read_seq: u64,
    /// When this leader's heartbeats left: (first `read_seq` sent at a tick,
    /// that tick), oldest first, for no longer than a lease lasts. A lease
    /// counts from when an acknowledged heartbeat left, not from when its
    /// answer arrived, which the network may have delayed by any amount.
    heartbeats_sent: VecDeque<(u64, u64)>,
    /// Reads waiting for the leader's first commit of its term.
    reads_awaiting_commit: Vec<(NodeId, u64)>,
    /// Sizes of this leader's uncommitted proposals, by last index.
    uncommitted: VecDeque<(Index, u64)>,
    uncommitted_bytes: u64,
    last_soft_state: SoftState,
    last_hard_state: HardState,
    pending_ready: Option<ReadyMark>,
    /// Ticks since this node started; never reset (lease reads compare it).
    ticks: u64,
    /// The node had been in a term before this start, so it may have
    /// acknowledged a leader's lease just before it stopped: for an election
    /// timeout after the start it votes as if it still heard that leader.
    started_in_a_term: bool,
    /// The driver's apply queue is full: hand out no committed entries.
    apply_paused: bool,
    /// The index of the last snapshot restored, whose configuration no
    /// membership change at or before it may replace.
    conf_restored_at: Index,
    /// Index of the last membership change in the log (leader only): the
    /// next one waits until it is applied.
    pending_conf_index: Index,
    /// The member leadership is being handed to, and ticks since it started.
    lead_transferee: Option<NodeId>,
    /// When this node last told a voter to campaign at once (`ticks`): a
    /// vote for a transfer ignores the followers' lease, so this node holds
    /// none for an election timeout after.
    timeout_now_sent_at: Option<u64>,
    transfer_elapsed: u32,
    /// Taken offline for maintenance: neither votes nor campaigns.
    offline: bool,
    /// This leader applied its own removal: it accepts nothing new and
    /// steps down once every voter holds its whole log.
    removed: bool,
    /// A change removing this leader is in its log: it takes no new writes,
    /// so that its log never ends up longer than every remaining voter's
    /// (they could not then win without its vote, which it would refuse).
    removal_pending: bool,
    /// The term and vote known to be durable. A candidate leads only once
    /// its own vote is among them (see `maybe_become_leader`).
    durable_term_vote: (Term, Option<NodeId>),
    /// A leader asked us to take over while a committed membership change
    /// waited to be applied; `advance` campaigns once it is.
    transfer_after_apply: bool,
}

impl<S: LogStore> Raft<S> {
    /// Starts (or restarts) a node from what `store` holds. A new cluster is
    /// bootstrapped by a store whose configuration lists the initial voters.
    pub fn new(config: Config, store: S) -> Result<Raft<S>, RaftError> {
        config.validate()?;
        // A node with no configuration yet (one that is joining) follows
        // whoever leads and never campaigns until it is made a voter.
        let (hard_state, conf) = store.initial_state()?;
        let log = RaftLog::new(store, hard_state.commit, config.applied)?;
        let mut raft = Raft {
            id: config.id,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            voters: JointConfig::default(),
            learners: BTreeSet::new(),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: config.election_tick,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            messages: Vec::new(),
            persisted_messages: Vec::new(),
            read_states: Vec::new(),
            read_rounds: VecDeque::new(),
            read_acks: BTreeMap::new(),
            last_read_seq: 0,
            heartbeats_sent: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
            uncommitted: VecDeque::new(),
            uncommitted_bytes: 0,
            last_soft_state: SoftState { leader: None, role: Role::Follower },
            last_hard_state: HardState { term: hard_state.term, vote: hard_state.vote, commit: 0 },
            pending_ready: None,
            ticks: 0,
            started_in_a_term: hard_state.term > 0,
            apply_paused: false,
            conf_restored_at: 0,
            pending_conf_index: 0,
            lead_transferee: None,
            timeout_now_sent_at: None,
            transfer_elapsed: 0,
            offline: false,
            removed: false,
            removal_pending: false,
            durable_term_vote: (hard_state.term, hard_state.vote),
            transfer_after_apply: false,
            config,
        };
        raft.apply_conf_state(&conf);
        raft.last_hard_state.commit = raft.log.committed();
        raft.become_follower(raft.term, None);
        Ok(raft)
    }

    // ---- Inspection -------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn term(&self) -> Term {
        self.term
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    pub fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed() }
    }

    pub fn soft_state(&self) -> SoftState {
        SoftState { leader: self.leader, role: self.role }
    }

    /// The log, for status reporting and for checkers.
    pub fn log(&self) -> &RaftLog<S> {
        &self.log
    }

    /// The log's durable store, for drivers that keep it inside the core.
    pub fn store_mut(&mut self) -> &mut S {
        self.log.store_mut()
    }

    /// The current voting configuration.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.voters.voters()
    }

    /// The current configuration: voters and learners, as of the last
    /// applied membership change.
    pub fn conf_state(&self) -> ConfState {
        ConfState {
            voters: self.voters.incoming.voters().clone(),
            voters_outgoing: self.voters.outgoing.voters().clone(),
            learners: self.learners.clone(),
        }
    }

    /// Whether this node is offline for maintenance.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The member leadership is being handed to, if a transfer is under way.
    pub fn lead_transferee(&self) -> Option<NodeId> {
        self.lead_transferee
    }

    /// Replication progress of `id`, when this node is the leader.
    pub fn progress(&self, id: NodeId) -> Option<&Progress> {
        if self.role == Role::Leader { self.progress.get(&id) } else { None }
    }

    // ---- Inputs -----------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) -> Result<(), RaftError> {
        self.ticks += 1;
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => self.tick_election(),
        }
    }

    /// Proposes entries (client commands) to be appended to the log. Only the
    /// leader accepts proposals; the entries are consecutive from the returned
    /// `first_index`, in the returned term. Being proposed is not being
    /// committed: the driver learns that from `committed_entries`, where an
    /// entry at the same index with another term means the proposal was lost.
    pub fn propose(&mut self, payloads: Vec<Bytes>) -> Result<Proposed, ProposeError> {
        if self.role != Role::Leader || self.removed || self.removal_pending {
            let leaving = self.removed || self.removal_pending;
            return Err(ProposeError::NotLeader { leader: self.leader.filter(|_| !leaving) });
        }
        if payloads.is_empty() {
            return Err(ProposeError::Empty);
        }
        if let Some(to) = self.lead_transferee {
            return Err(ProposeError::Transferring { to });
        }
        let mut bytes = 0u64;
        for payload in &payloads {
            let len = payload.len() as u64;
            if len > self.config.max_entry_bytes {
                return Err(ProposeError::TooLarge { bytes: len, max: self.config.max_entry_bytes });
            }
            bytes += len;
        }
        // An idle leader accepts one batch of any admissible size, so that a
        // limit below one batch cannot wedge the cluster.
        if self.uncommitted_bytes > 0 && self.uncommitted_bytes + bytes > self.config.max_uncommitted_bytes {
            return Err(ProposeError::Busy {
                uncommitted_bytes: self.uncommitted_bytes,
                max: self.config.max_uncommitted_bytes,
            });
        }
        let first_index = self.log.last_index()? + 1;
        let entries: Vec<Entry> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, data)| Entry { term: self.term, index: first_index + i as u64, kind: EntryKind::Normal, data })
            .collect();
        self.append_proposed(entries, bytes)
    }

    fn append_proposed(&mut self, entries: Vec<Entry>, bytes: u64) -> Result<Proposed, ProposeError> {
        let first_index = entries.first().map_or(0, |e| e.index);
        let last_index = self.log.append(&entries)?;
        self.uncommitted.push_back((last_index, bytes));
        self.uncommitted_bytes += bytes;
        self.broadcast_append()?;
        Ok(Proposed { term: self.term, first_index, last_index })
    }

    /// Proposes one membership change (see [`ConfChange`] for the rules).
    /// Refused, with nothing appended, when this node does not lead, when it
    /// has not yet committed an entry of its term, while an earlier change is
    /// not applied, during a leader transfer, or when the change does not fit
    /// the current configuration.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Proposed, ProposeError> {
        if self.role != Role::Leader || self.removed {
            return Err(ProposeError::NotLeader { leader: self.leader.filter(|_| !self.removed) });
        }
        if let Some(to) = self.lead_transferee {
            return Err(ProposeError::Transferring { to });
        }
        if self.log.term(self.log.committed())? != self.term {
            return Err(ProposeError::ConfChangePending(
                "this leader has not yet committed an entry of its term".to_string(),
            ));
        }
        if self.pending_conf_index > self.log.applied() {
            return Err(ProposeError::ConfChangePending(format!(
                "the membership change at index {} is not applied yet",
                self.pending_conf_index
            )));
        }
        let conf = self.conf_state().apply_change(&change).map_err(ProposeError::InvalidConfChange)?;
        let removes_self = !conf.voters.contains(&self.id);
        let data = ConfChangeEntry { change, conf }.encode();
        let bytes = data.len() as u64;
        if bytes > self.config.max_entry_bytes {
            return Err(ProposeError::TooLarge { bytes, max: self.config.max_entry_bytes });
        }
        let index = self.log.last_index()? + 1;
        let entry = Entry { term: self.term, index, kind: EntryKind::ConfChange, data };
        let proposed = self.append_proposed(vec![entry], bytes)?;
        self.pending_conf_index = proposed.last_index;
        self.removal_pending = removes_self;
        Ok(proposed)
    }

    /// Hands leadership to voter `to`: proposals are refused meanwhile, the
    /// leader brings `to` up to date, then tells it to campaign at once
    /// (TimeoutNow, thesis §3.10). A transfer that has not completed within
    /// an election timeout is abandoned and the leader carries on.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if to == self.id {
            return Ok(());
        }
        if !self.voters.contains(to) {
            return Err(ProposeError::InvalidTransfer(format!("node {to} is not a voter and cannot lead")));
        }
        self.lead_transferee = Some(to);
        self.transfer_elapsed = 0;
        // Stop counting the lease from the old election: the transfer has its
        // own timeout.
        if self.progress.get(&to).is_some_and(|pr| Some(pr.matched) == self.log.last_index().ok()) {
            self.send_timeout_now(to);
        } else {
            self.maybe_send_append(to, true)?;
        }
        Ok(())
    }

    /// Tells voter `to` to campaign at once, and remembers when (see
    /// [`Self::lease_read_index`]).
    fn send_timeout_now(&mut self, to: NodeId) {
        self.timeout_now_sent_at = Some(self.ticks);
        self.send(to, MessageBody::TimeoutNow);
    }

    /// Takes this node offline for maintenance (or brings it back): offline
    /// it keeps following the log but neither votes nor campaigns. A leader
    /// taken offline hands leadership to its most up-to-date voter first.
    pub fn set_offline(&mut self, offline: bool) -> Result<(), RaftError> {
        self.offline = offline;
        if offline && self.role != Role::Follower {
            if self.role == Role::Leader {
                self.hand_over()?;
            }
            self.become_follower(self.term, None);
        }
        Ok(())
    }

    /// The driver finished (or failed) sending the snapshot it was asked to
    /// send to `to`.
    /// Either way the leader goes back to probing once it hears from the
    /// follower (its acknowledgement of the snapshot, or its next heartbeat
    /// reply), and sends another snapshot if the follower still needs one.
    pub fn report_snapshot(&mut self, to: NodeId) -> Result<(), RaftError> {
        let Some(pr) = self.progress.get_mut(&to) else { return Ok(()) };
        if !matches!(pr.state, ProgressState::Snapshot { .. }) {
            return Ok(());
        }
        pr.become_probe();
        // Wait for the follower's acknowledgement, or after a failure for
        // the next heartbeat reply, before probing again: a delivered
        // snapshot is not followed by a second one, and an unreachable
        // follower is not sent one snapshot after another.
        pr.probe_sent = true;
        Ok(())
    }

    /// Requests a linearizable read. A `ReadState` with the same `ctx` appears
    /// in a later `Ready` once it is safe to serve the read at its index; on a
    /// leadership change the request is dropped and the driver retries.
    /// `ctx` must be unique among this node's outstanding reads.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ReadIndexError> {
        match self.role {
            Role::Leader => self.handle_read_request(self.id, ctx),
            _ => match self.leader {
                Some(leader) => {
                    self.send(leader, MessageBody::ReadIndex { ctx });
                    Ok(())
                }
                None => Err(ReadIndexError::NoLeader),
            },
        }
    }

    /// The index a lease read may be served at without a ReadIndex round, or
    /// `None` when this node holds no lease: it must be the leader, have
    /// committed an entry of its term, run with CheckQuorum (so followers
    /// refuse to elect anyone else for an election timeout after they hear
    /// from it, and a restarted node for an election timeout after it starts),
    /// and a quorum must have acknowledged a heartbeat that left within half
    /// an election timeout. Message delay costs nothing (the lease counts
    /// from the heartbeat's departure); the other half of the timeout is the
    /// margin for the members' clocks running at different rates, which a
    /// lease read trusts to be smaller; a ReadIndex read trusts nothing. The
    /// driver must tick by its clock: a process paused for longer than the
    /// lease must catch up on its ticks before it answers from it.
    ///
    /// No lease either while leadership is being handed over, nor for an
    /// election timeout after a `TimeoutNow` went out: followers grant a
    /// transfer's vote despite hearing from this leader, so a new leader may
    /// commit while this one still counts its quorum as fresh.
    pub fn lease_read_index(&self) -> Option<Index> {
        if self.role != Role::Leader || !self.config.check_quorum {
            return None;
        }
        let election = u64::from(self.config.election_tick);
        if self.lead_transferee.is_some() || self.timeout_now_sent_at.is_some_and(|at| self.ticks - at < election) {
            return None;
        }
        let committed = self.log.committed();
        if self.log.term(committed).ok()? != self.term {
            return None;
        }
        let window = Self::lease_ticks(&self.config);
        let fresh = |id: NodeId| {
            Some(
                id == self.id
                    || self
                        .read_acks
                        .get(&id)
                        .and_then(|&seq| self.heartbeat_sent_tick(seq))
                        .is_some_and(|sent| self.ticks - sent < window),
            )
        };
        (self.voters.vote_result(fresh) == VoteResult::Won).then_some(committed)
    }

    /// How long a lease lasts, in ticks from when an acknowledged heartbeat
    /// left: half an election timeout. The member that acknowledged it
    /// refuses other candidates for a whole election timeout after it arrived;
    /// the other half is the margin for the members' clocks drifting apart.
    fn lease_ticks(config: &Config) -> u64 {
        u64::from(config.election_tick / 2).max(1)
    }

    /// The tick at which heartbeat `seq` left, if within a lease's length.
    fn heartbeat_sent_tick(&self, seq: u64) -> Option<u64> {
        let after = self.heartbeats_sent.partition_point(|&(first, _)| first <= seq);
        after.checked_sub(1).map(|at| self.heartbeats_sent[at].1)
    }

    /// Pauses (or resumes) handing out committed entries, for a driver whose
    /// apply queue is full. Everything else (persisting, messages, commit)
    /// continues, so the cluster stays healthy while this node's state
    /// machine catches up.
    pub fn set_apply_paused(&mut self, paused: bool) {
        self.apply_paused = paused;
    }

    /// Starts an election now, as if the election timeout had passed.
    pub fn campaign(&mut self) -> Result<(), RaftError> {
        if self.role == Role::Leader {
            return Ok(());
        }
        self.start_campaign(self.config.pre_vote)
    }

    /// Processes one message from a peer.
    pub fn step(&mut self, m: Message) -> Result<(), RaftError> {
        self.validate(&m)?;
        if let MessageBody::CommitHint { commit, term } = m.body {
            // A fact about the log, true whatever the sender's term.
            if commit > self.log.committed() && self.log.matches(commit, term)? {
                self.log.commit_to(commit);
            }
            return Ok(());
        }
        if m.term > self.term {
            if let MessageBody::RequestVote { transfer: false, .. } = m.body {
                // While a leader is known to be alive, a vote request must come
                // from a node that cannot hear it: ignore it rather than let it
                // depose a healthy leader. This is also what makes the leader's
                // lease safe, so a node that just restarted, and may have
                // acknowledged a leader before it stopped, ignores it too.
                let election = self.config.election_tick;
                let just_started = self.started_in_a_term && self.ticks < u64::from(election);
                let in_lease = self.config.check_quorum
                    && ((self.leader.is_some() && self.election_elapsed < election) || just_started);
                if in_lease {
                    return Ok(());
                }
            }
            match m.body {
                // A pre-vote asks about a future term without entering it.
                MessageBody::RequestVote { pre_vote: true, .. } => {}
                // A granted pre-vote carries the future term we asked about.
                MessageBody::RequestVoteResponse { pre_vote: true, granted: true } => {}
                _ => {
                    let leader = m.body.is_from_leader().then_some(m.from);
                    self.become_follower(m.term, leader);
                }
            }
        } else if m.term < self.term {
            match m.body {
                MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. } => {
                    // A stale leader: tell it our term so it steps down instead
                    // of holding on (it may be cut off from the new leader).
                    self.send(
                        m.from,
                        MessageBody::AppendEntriesResponse { success: false, index: 0, hint_index: 0, hint_term: 0 },
                    );
                }
                MessageBody::RequestVote { pre_vote, .. } => {
                    // Without an answer a candidate on an old term would keep
                    // asking forever; our term tells it to catch up (§5.1).
                    // A simulated run found two candidates that each needed
                    // the other's vote and never met in a term: each campaign
                    // raised both terms by one, and the one behind stayed
                    // behind.
                    self.send(m.from, MessageBody::RequestVoteResponse { pre_vote, granted: false });
                }
                _ => {}
            }
            return Ok(());
        }

        if let MessageBody::RequestVote { pre_vote, last_log_index, last_log_term, .. } = m.body {
            return self.handle_vote_request(m.from, m.term, pre_vote, last_log_index, last_log_term);
        }
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
    }

    // ---- Output -----------------------------------------------------------

    /// Whether `ready()` has anything for the driver.
    pub fn has_ready(&self) -> bool {
        if self.pending_ready.is_some() {
            return false;
        }
        self.soft_state() != self.last_soft_state
            || self.log.unstable_snapshot().is_some()
            || self.hard_state() != self.last_hard_state
            || !self.log.unstable_entries().is_empty()
            || !self.messages.is_empty()
            || !self.persisted_messages.is_empty()
            || (!self.apply_paused && self.log.has_next_committed())
            || !self.read_states.is_empty()
    }

    /// The messages the next `Ready` would carry in `messages`, to send now,
    /// while the driver still persists an earlier `Ready`. None of them
    /// promises anything about this node's disk (those wait in
    /// `persisted_messages`), so sending them early is what step 1 allows
    /// anyway; it lets a leader ship the entries proposed during its own
    /// fsync to the followers at once, so their writes overlap with it
    /// instead of queueing behind it (Raft thesis §10.2.1).
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.messages)
    }

    /// Collects what the driver must persist, send and apply. Must be followed
    /// by [`Raft::advance`] before the next call.
    pub fn ready(&mut self) -> Result<Ready, RaftError> {
        assert!(self.pending_ready.is_none(), "ready() called twice without advance()");
        let soft = self.soft_state();
        let hard = self.hard_state();
        let entries = self.log.unstable_entries().to_vec();
        let committed_entries =
            if self.apply_paused { Vec::new() } else { self.log.next_committed(self.config.max_apply_bytes)? };
        let ready = Ready {
            soft_state: (soft != self.last_soft_state).then_some(soft),
            snapshot: self.log.unstable_snapshot().cloned(),
            hard_state: (hard != self.last_hard_state).then_some(hard),
            messages: std::mem::take(&mut self.messages),
            persisted_messages: std::mem::take(&mut self.persisted_messages),
            read_states: std::mem::take(&mut self.read_states),
            entries,
            committed_entries,
        };
        self.last_soft_state = soft;
        self.last_hard_state = hard;
        self.pending_ready = Some(ReadyMark {
            last_entry: ready.entries.last().map(|e| (e.index, e.term)),
            last_committed: ready.committed_entries.last().map(|e| e.index),
            snapshot: ready.snapshot.as_ref().map(|s| s.index),
            term_vote: ready.hard_state.map(|hs| (hs.term, hs.vote)),
            conf_changes: ready
                .committed_entries
                .iter()
                .filter(|e| e.kind == EntryKind::ConfChange)
                .map(|e| (e.index, e.data.clone()))
                .collect(),
        });
        Ok(ready)
    }

    /// Tells the core that the last `Ready` was processed: its entries and hard
    /// state are durable and its committed entries are being applied.
    pub fn advance(&mut self) -> Result<(), RaftError> {
        let mark = self.pending_ready.take().expect("advance() called without ready()");
        if let Some(index) = mark.snapshot {
            self.log.stable_snapshot_to(index);
        }
        if let Some((index, term)) = mark.last_entry {
            self.log.stable_to(index, term);
        }
        if let Some(index) = mark.last_committed {
            self.log.applied_to(index);
        }
        for (index, data) in mark.conf_changes {
            // A snapshot restored while this Ready was out already holds a
            // later configuration: an older change must not replace it.
            if index > self.conf_restored_at {
                self.apply_conf_change(&data)?;
            }
        }
        if std::mem::take(&mut self.transfer_after_apply) && self.role != Role::Leader {
            self.campaign_with(false, true)?;
        }
        if let Some(term_vote) = mark.term_vote {
            self.durable_term_vote = term_vote;
            self.maybe_become_leader()?;
        }
        if self.role == Role::Leader {
            // The leader's own copy counts towards a quorum only once durable.
            let persisted = self.log.persisted_index();
            if let Some(pr) = self.progress.get_mut(&self.id) {
                pr.maybe_update(persisted);
            }
            if self.maybe_commit()? {
                self.broadcast_commit()?;
            }
        }
        Ok(())
    }

    // ---- Role changes -----------------------------------------------------

    fn reset(&mut self, term: Term) {
        if term != self.term {
            assert!(term > self.term, "term moved back from {} to {term}", self.term);
            // A hand-over from an older term's leader is void.
            self.transfer_after_apply = false;
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let spread = self.rng.next_u64() % u64::from(self.config.election_tick);
        self.randomized_election_timeout = self.config.election_tick + spread as u32;
        self.votes.clear();
        self.removed = false;
        self.removal_pending = false;
        self.lead_transferee = None;
        self.transfer_elapsed = 0;
        self.read_rounds.clear();
        self.read_acks.clear();
        self.heartbeats_sent.clear();
        self.reads_awaiting_commit.clear();
        self.uncommitted.clear();
        self.uncommitted_bytes = 0;
        let next = self.log.last_index().unwrap_or(0) + 1;
        let (max_messages, max_bytes) = (self.config.max_inflight_messages, self.config.max_inflight_bytes);
        self.progress =
            self.members().into_iter().map(|id| (id, Progress::new(next, max_messages, max_bytes))).collect();
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader cannot become a pre-candidate");
        // Term and vote stay: a pre-election changes no durable state.
        self.votes.clear();
        self.leader = None;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader cannot become a candidate");
        self.reset(self.term + 1);
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) -> Result<(), RaftError> {
        assert_eq!(self.role, Role::Candidate, "only a candidate becomes leader");
        self.reset(self.term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let persisted = self.log.persisted_index();
        if let Some(own) = self.progress.get_mut(&self.id) {
            own.maybe_update(persisted);
            own.become_replicate();
            own.recent_active = true;
        }
        // Any membership change still in the log must be applied before the
        // next one is proposed; the log's end is a safe upper bound for it.
        self.pending_conf_index = self.log.last_index()?;
        self.removal_pending = self.unapplied_change_removes_self()?;
        // A no-op of the new term lets the leader commit everything before it
        // (Raft §5.4.2, §8) and serve ReadIndex.
        let index = self.log.last_index()? + 1;
        self.log.append(&[Entry::noop(self.term, index)])?;
        Ok(())
    }

    /// Takes the lead of a won election once the candidate's own vote is
    /// durable. A leader's appends leave before its log is durable, so one
    /// that could forget its vote in a crash might lead a term, reach
    /// learners, restart, vote for another node in the same term, and let
    /// two leaders send different entries under one term. Votes from others
    /// arrive only after the request, which waits for the vote on disk, so
    /// this waits only for a sole voter.
    fn maybe_become_leader(&mut self) -> Result<(), RaftError> {
        if self.role == Role::Candidate
            && self.poll() == VoteResult::Won
            && self.durable_term_vote == (self.term, Some(self.id))
        {
            self.become_leader()?;
            self.broadcast_append()?;
        }
        Ok(())
    }

    fn start_campaign(&mut self, pre_vote: bool) -> Result<(), RaftError> {
        self.campaign_with(pre_vote, false)
    }

    fn campaign_with(&mut self, pre_vote: bool, transfer: bool) -> Result<(), RaftError> {
        if !self.is_promotable() || self.offline {
            return Ok(());
        }
        // Nor while a committed membership change waits to be applied (as
        // etcd): the configuration this node would count votes in is about
        // to change. A node behind on applying, with another as far behind,
        // could otherwise be elected by the older configuration's majority
        // while the newer one commits entries without them.
        if self.unapplied_conf_change(self.log.committed(), |_| true)? {
            // A leader handing over (often right after the change that
            // removes it) must not be lost to this: campaign once applied.
            self.transfer_after_apply |= transfer;
            return Ok(());
        }
        let vote_term = if pre_vote {
            self.become_pre_candidate();
            self.term + 1
        } else {
            self.become_candidate();
            self.term
        };
        self.votes.insert(self.id, true);
        match self.poll() {
            VoteResult::Won if pre_vote => return self.campaign_with(false, transfer),
            // A sole voter wins on its own vote, but leads only once that
            // vote is durable: `advance` completes the win.
            VoteResult::Won => return Ok(()),
            _ => {}
        }
        let (last_log_index, last_log_term) = (self.log.last_index()?, self.log.last_term()?);
        for id in self.voters.voters() {
            if id != self.id {
                self.send_with_term(
                    id,
                    vote_term,
                    MessageBody::RequestVote { pre_vote, last_log_index, last_log_term, transfer },
                );
            }
        }
        Ok(())
    }

    fn poll(&self) -> VoteResult {
        self.voters.vote_result(|id| self.votes.get(&id).copied())
    }

    // ---- Ticks ------------------------------------------------------------

    fn tick_election(&mut self) -> Result<(), RaftError> {
        self.election_elapsed += 1;
        if self.is_promotable() && !self.offline && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.start_campaign(self.config.pre_vote)?;
        }
        Ok(())
    }

    fn tick_leader(&mut self) -> Result<(), RaftError> {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.lead_transferee.is_some() {
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.config.election_tick {
                // The target did not take over in time: keep leading.
                self.lead_transferee = None;
                self.transfer_elapsed = 0;
            }
        }
        if self.election_elapsed >= self.config.election_tick {
            self.election_elapsed = 0;
            if self.config.check_quorum {
                if !self.quorum_recently_active() {
                    self.become_follower(self.term, None);
                    return Ok(());
                }
                let own = self.id;
                for (id, pr) in self.progress.iter_mut() {
                    pr.start_period();
                    pr.recent_active = *id == own;
                }
            }
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
        Ok(())
    }

    fn quorum_recently_active(&self) -> bool {
        let active = |id: NodeId| Some(id == self.id || self.progress.get(&id).is_some_and(|p| p.recent_active));
        self.voters.vote_result(active) == VoteResult::Won
    }

    // ---- Votes ------------------------------------------------------------

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        last_log_index: Index,
        last_log_term: Term,
    ) -> Result<(), RaftError> {
        let can_vote =
            self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none()) || (pre_vote && term > self.term);
        if can_vote && !self.offline && self.log.is_up_to_date(last_log_index, last_log_term)? {
            // A granted pre-vote answers in the future term it was asked about.
            self.send_with_term(from, term, MessageBody::RequestVoteResponse { pre_vote, granted: true });
            if !pre_vote {
                self.election_elapsed = 0;
                self.vote = Some(from);
            }
        } else {
            self.send(from, MessageBody::RequestVoteResponse { pre_vote, granted: false });
            let commit = self.log.committed();
            if commit > 0 {
                let term = self.log.term(commit)?;
                self.send(from, MessageBody::CommitHint { commit, term });
            }
        }
        Ok(())
    }

    // ---- Role step functions ---------------------------------------------

    fn step_candidate(&mut self, m: Message) -> Result<(), RaftError> {
        match m.body {
            MessageBody::RequestVoteResponse { pre_vote, granted } => {
                let ours = pre_vote == (self.role == Role::PreCandidate);
                let current = if pre_vote && granted { m.term == self.term + 1 } else { m.term == self.term };
                if !ours || !current {
                    return Ok(());
                }
                self.votes.insert(m.from, granted);
                match self.poll() {
                    VoteResult::Won if pre_vote => self.start_campaign(false)?,
                    VoteResult::Won => {
                        self.maybe_become_leader()?;
                    }
                    VoteResult::Lost => self.become_follower(self.term, None),
                    VoteResult::Pending => {}
                }
            }
            MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. } | MessageBody::InstallSnapshot { .. } => {
                // Someone won this term: follow it.
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn step_follower(&mut self, m: Message) -> Result<(), RaftError> {
        match m.body {
            MessageBody::AppendEntries { prev_log_index, prev_log_term, entries, leader_commit } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append_entries(m.from, prev_log_index, prev_log_term, &entries, leader_commit)?;
            }
            MessageBody::Heartbeat { commit, read_seq } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                // The leader sends at most what it knows we have; bound it by
                // our log anyway so a bad message cannot move the commit index
                // past entries we hold.
                let commit = commit.min(self.log.last_index()?);
                self.log.commit_to(commit);
                self.send(m.from, MessageBody::HeartbeatResponse { read_seq });
            }
            MessageBody::ReadIndexResponse { ctx, index } if index > 0 => {
                self.read_states.push(ReadState { index, ctx });
            }
            MessageBody::InstallSnapshot { snapshot } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_snapshot(m.from, snapshot)?;
            }
            MessageBody::TimeoutNow => {
                // The leader hands over: campaign now, without a pre-vote (the
                // leader vouches that we are up to date) and past the voters'
                // lease, which the leader's own request lifts.
                self.campaign_with(false, true)?;
            }
            // A ReadIndex sent to us as if we led is dropped; the requester
            // times out and retries with the real leader.
            _ => {}
        }
        Ok(())
    }

    fn step_leader(&mut self, m: Message) -> Result<(), RaftError> {
        match m.body {
            MessageBody::AppendEntriesResponse { success, index, hint_index, hint_term } => {
                self.handle_append_response(m.from, success, index, hint_index, hint_term)?;
            }
            MessageBody::HeartbeatResponse { read_seq } => {
                let last_index = self.log.last_index()?;
                let Some(pr) = self.progress.get_mut(&m.from) else { return Ok(()) };
                pr.recent_active = true;
                pr.probe_sent = false;
                if pr.state == ProgressState::Replicate && pr.inflights.full() {
                    pr.inflights.free_first();
                }
                if pr.matched < last_index {
                    // Even when `next` is already past our last index (the
                    // window looks busy with messages that may have been lost),
                    // send: an empty append at `next - 1` makes a follower that
                    // never got them reject, and the leader falls back to probing.
                    self.maybe_send_append(m.from, true)?;
                }
                if read_seq > 0 {
                    let acked = self.read_acks.entry(m.from).or_insert(0);
                    *acked = (*acked).max(read_seq);
                    self.resolve_read_rounds();
                }
            }
            MessageBody::ReadIndex { ctx } if self.progress.contains_key(&m.from) => {
                // A busy or not-yet-ready leader drops forwarded reads; the
                // follower's driver times them out and retries.
                let _ = self.handle_read_request(m.from, ctx);
            }
            MessageBody::AppendEntries { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. }
            | MessageBody::TimeoutNow => {
                return Err(RaftError::InvalidMessage {
                    from: m.from,
                    reason: format!("claims leadership of term {} which this node leads", m.term),
                });
            }
            _ => {}
        }
        Ok(())
    }

    // ---- Replication ------------------------------------------------------

    fn handle_append_entries(
        &mut self,
        leader: NodeId,
        prev_log_index: Index,
        prev_log_term: Term,
        entries: &[Entry],
        leader_commit: Index,
    ) -> Result<(), RaftError> {
        let committed = self.log.committed();
        if prev_log_index < committed {
            // Our committed prefix already covers prev; answer with it so the
            // leader skips ahead (this message is a duplicate or delayed).
            self.send(
                leader,
                MessageBody::AppendEntriesResponse { success: true, index: committed, hint_index: 0, hint_term: 0 },
            );
            return Ok(());
        }
        match self.log.maybe_append(prev_log_index, prev_log_term, leader_commit, entries)? {
            Some(last_new) => {
                self.send(
                    leader,
                    MessageBody::AppendEntriesResponse { success: true, index: last_new, hint_index: 0, hint_term: 0 },
                );
            }
            None => {
                // Skip back past every entry of ours that cannot match: those
                // with a term above the leader's prev_log_term.
                let from = prev_log_index.min(self.log.last_index()?);
                let (hint_index, hint_term) = self.log.find_conflict_by_term(from, prev_log_term)?;
                self.send(
                    leader,
                    MessageBody::AppendEntriesResponse { success: false, index: prev_log_index, hint_index, hint_term },
                );
            }
        }
        Ok(())
    }

    /// A leader's snapshot, staged by the driver. Installed only when it
    /// carries what this log lacks; either way the leader learns how far our
    /// log now reaches.
    fn handle_snapshot(&mut self, leader: NodeId, snapshot: SnapshotMeta) -> Result<(), RaftError> {
        let committed = self.log.committed();
        let index = snapshot.index;
        if index <= committed {
            // Stale or duplicate: what we have already covers it.
            self.send(
                leader,
                MessageBody::AppendEntriesResponse { success: true, index: committed, hint_index: 0, hint_term: 0 },
            );
            return Ok(());
        }
        if self.log.matches(index, snapshot.term)? {
            // Our log already holds the snapshot's last entry, so it holds
            // everything before it too (log matching): just commit.
            self.log.commit_to(index);
        } else {
            self.apply_conf_state(&snapshot.conf_state);
            self.conf_restored_at = index;
            self.log.restore(snapshot);
        }
        self.send(leader, MessageBody::AppendEntriesResponse { success: true, index, hint_index: 0, hint_term: 0 });
        Ok(())
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        success: bool,
        index: Index,
        hint_index: Index,
        hint_term: Term,
    ) -> Result<(), RaftError> {
        if !self.progress.contains_key(&from) {
            return Ok(());
        }
        if !success {
            // The follower's entries up to hint_index have terms at most
            // hint_term; find where our log can match that.
            let mut next_probe = hint_index;
            if hint_term > 0 {
                next_probe = self.log.find_conflict_by_term(hint_index, hint_term)?.0;
            }
            let pr = self.progress.get_mut(&from).expect("checked above");
            pr.recent_active = true;
            if pr.maybe_decrease_to(index, next_probe) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.maybe_send_append(from, true)?;
            }
            return Ok(());
        }
        let pr = self.progress.get_mut(&from).expect("checked above");
        pr.recent_active = true;
        let was_paused = pr.is_paused();
        let matched_before = pr.matched;
        if !pr.maybe_update(index) {
            return Ok(());
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Replicate => pr.inflights.free_to(index),
            ProgressState::Snapshot { pending } => {
                // Installed (this acknowledges the snapshot's index or later),
                // or caught up by other means: the log can take over.
                if index >= pending {
                    pr.become_replicate();
                }
            }
        }
        if self.lead_transferee == Some(from) && Some(index) == self.log.last_index().ok() {
            self.send_timeout_now(from);
        }
        let committed = self.log.committed();
        if self.maybe_commit()? {
            self.broadcast_commit()?;
        } else if matched_before < committed && index >= committed {
            // These entries were sent before they committed, so the
            // follower may not know they have.
            self.tell_commit(from)?;
        } else if was_paused {
            self.maybe_send_append(from, false)?;
        }
        // Pipelining: fill the window with whatever is left.
        while self.maybe_send_append(from, false)? {}
        self.maybe_step_down_removed()
    }

    /// Sends `to` the next AppendEntries if its progress allows. With
    /// `send_if_empty` an empty one is sent too (to carry the commit index or
    /// probe). Returns whether a message was sent.
    fn maybe_send_append(&mut self, to: NodeId, send_if_empty: bool) -> Result<bool, RaftError> {
        if to == self.id {
            return Ok(false);
        }
        let Some(pr) = self.progress.get(&to) else { return Ok(false) };
        if pr.is_paused() {
            return Ok(false);
        }
        let prev_log_index = pr.next - 1;
        let prev_log_term = match self.log.term(prev_log_index) {
            Ok(term) => term,
            Err(StorageError::Compacted(_)) => return self.send_snapshot(to),
            Err(e) => return Err(e.into()),
        };
        let last_index = self.log.last_index()?;
        let entries = match self.log.entries(pr.next, last_index + 1, self.config.max_message_bytes) {
            Ok(entries) => entries,
            Err(StorageError::Compacted(_)) => return self.send_snapshot(to),
            Err(e) => return Err(e.into()),
        };
        if entries.is_empty() && !send_if_empty {
            return Ok(false);
        }
        let pr = self.progress.get_mut(&to).expect("checked above");
        match entries.last() {
            Some(last) => pr.sent_entries(last.index, entries.iter().map(Entry::size_bytes).sum()),
            None if pr.state == ProgressState::Probe => pr.probe_sent = true,
            None => {}
        }
        let leader_commit = self.log.committed();
        self.send(to, MessageBody::AppendEntries { prev_log_index, prev_log_term, entries, leader_commit });
        Ok(true)
    }

    /// The follower needs entries that are compacted: ask the driver to send
    /// a snapshot, and send nothing else until it reports back.
    fn send_snapshot(&mut self, to: NodeId) -> Result<bool, RaftError> {
        let snapshot = self.log.snapshot_meta()?;
        let Some(pr) = self.progress.get_mut(&to) else { return Ok(false) };
        pr.become_snapshot(snapshot.index);
        self.send(to, MessageBody::InstallSnapshot { snapshot });
        Ok(true)
    }

    /// Every node this leader replicates to (voters and learners but itself).
    fn followers(&self) -> Vec<NodeId> {
        self.progress.keys().copied().filter(|&id| id != self.id).collect()
    }

    /// Tells every follower a new commit index (see `tell_commit`).
    fn broadcast_commit(&mut self) -> Result<(), RaftError> {
        for id in self.followers() {
            self.tell_commit(id)?;
        }
        Ok(())
    }

    /// Tells `to` the commit index. Entries still to send carry it. A
    /// follower known to hold every committed entry gets a `CommitHint`,
    /// which asks for no answer: an empty AppendEntries would cost it a
    /// reply, and the leader a wake-up to read it, on every commit of a
    /// lightly loaded cluster. One with entries in flight learns it when
    /// their acknowledgement comes back (`handle_append_response`).
    fn tell_commit(&mut self, to: NodeId) -> Result<(), RaftError> {
        if self.maybe_send_append(to, false)? {
            return Ok(());
        }
        let Some(pr) = self.progress.get(&to) else { return Ok(()) };
        if pr.state != ProgressState::Replicate {
            // A probe needs its answer to find where the logs meet.
            self.maybe_send_append(to, true)?;
            return Ok(());
        }
        let committed = self.log.committed();
        if pr.matched < committed {
            return Ok(());
        }
        match self.log.term(committed) {
            Ok(term) => self.send(to, MessageBody::CommitHint { commit: committed, term }),
            Err(StorageError::Compacted(_)) => {
                self.maybe_send_append(to, true)?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn broadcast_append(&mut self) -> Result<(), RaftError> {
        for id in self.followers() {
            self.maybe_send_append(id, true)?;
        }
        Ok(())
    }

    /// Sends a heartbeat to every member and returns its number, which the
    /// answers echo (for read rounds and the lease).
    fn broadcast_heartbeat(&mut self) -> u64 {
        self.last_read_seq += 1;
        let seq = self.last_read_seq;
        if self.heartbeats_sent.back().is_none_or(|&(_, tick)| tick != self.ticks) {
            self.heartbeats_sent.push_back((seq, self.ticks));
        }
        let lease = Self::lease_ticks(&self.config);
        while self.heartbeats_sent.front().is_some_and(|&(_, tick)| self.ticks - tick >= lease) {
            self.heartbeats_sent.pop_front();
        }
        let committed = self.log.committed();
        let targets: Vec<(NodeId, Index)> = self
            .progress
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, pr)| (*id, pr.matched.min(committed)))
            .collect();
        for (id, commit) in targets {
            self.send(id, MessageBody::Heartbeat { commit, read_seq: seq });
        }
        seq
    }

    /// Commits the highest index a quorum has, if it is from this term.
    fn maybe_commit(&mut self) -> Result<bool, RaftError> {
        let quorum_index = self.voters.committed_index(|id| self.progress.get(&id).map(|p| p.matched));
        if !self.log.maybe_commit(quorum_index, self.term)? {
            return Ok(false);
        }
        let committed = self.log.committed();
        while let Some(&(last, bytes)) = self.uncommitted.front() {
            if last > committed {
                break;
            }
            self.uncommitted.pop_front();
            self.uncommitted_bytes -= bytes;
        }
        for (requester, ctx) in std::mem::take(&mut self.reads_awaiting_commit) {
            let _ = self.handle_read_request(requester, ctx);
        }
        Ok(true)
    }

    // ---- ReadIndex (thesis §6.4) ----------------------------------------

    fn handle_read_request(&mut self, requester: NodeId, ctx: u64) -> Result<(), ReadIndexError> {
        debug_assert_eq!(self.role, Role::Leader);
        if self.read_rounds.len() + self.reads_awaiting_commit.len() >= self.config.max_pending_reads {
            return Err(ReadIndexError::Busy);
        }
        let committed = self.log.committed();
        // Until the leader commits an entry of its term it does not know the
        // latest commit index (thesis §6.4 step 1).
        if self.log.term(committed).map_err(RaftError::from)? != self.term {
            self.reads_awaiting_commit.push((requester, ctx));
            return Ok(());
        }
        let seq = self.broadcast_heartbeat();
        self.read_rounds.push_back(ReadRound { seq, index: committed, requester, ctx });
        self.resolve_read_rounds();
        Ok(())
    }

    /// Answers every round, oldest first, that a quorum has confirmed.
    fn resolve_read_rounds(&mut self) {
        while let Some(round) = self.read_rounds.front() {
            let seq = round.seq;
            let confirmed =
                |id: NodeId| Some(id == self.id || self.read_acks.get(&id).is_some_and(|&acked| acked >= seq));
            if self.voters.vote_result(confirmed) != VoteResult::Won {
                break;
            }
            let round = self.read_rounds.pop_front().expect("front exists");
            if round.requester == self.id {
                self.read_states.push(ReadState { index: round.index, ctx: round.ctx });
            } else {
                self.send(round.requester, MessageBody::ReadIndexResponse { ctx: round.ctx, index: round.index });
            }
        }
    }

    // ---- Helpers ----------------------------------------------------------

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.send_with_term(to, self.term, body);
    }

    fn send_with_term(&mut self, to: NodeId, term: Term, body: MessageBody) {
        // Leader traffic may leave before the leader's own log is durable;
        // everything else vouches for durable state (a vote, an acknowledged
        // append, a term) and waits for it.
        let immediate = body.is_from_leader() || matches!(body, MessageBody::ReadIndex { .. });
        let message = Message { from: self.id, to, term, body };
        if immediate { self.messages.push(message) } else { self.persisted_messages.push(message) }
    }

    /// Applies a committed membership change: adopts the configuration it
    /// carries. (An undecodable one cannot come from a leader of this
    /// version; it is skipped here exactly as every driver skips it.)
    fn apply_conf_change(&mut self, data: &[u8]) -> Result<(), RaftError> {
        let Ok(entry) = ConfChangeEntry::decode(data) else { return Ok(()) };
        self.apply_conf_state(&entry.conf);
        if self.lead_transferee.is_some_and(|to| !self.voters.contains(to)) {
            self.lead_transferee = None;
        }
        if self.role != Role::Leader {
            return Ok(());
        }
        let members = self.members();
        self.progress.retain(|id, _| members.contains(id));
        let next_index = self.log.last_index()? + 1;
        let (max_messages, max_bytes) = (self.config.max_inflight_messages, self.config.max_inflight_bytes);
        for id in members {
            self.progress.entry(id).or_insert_with(|| {
                let mut pr = Progress::new(next_index, max_messages, max_bytes);
                // Newcomers count as active until the next CheckQuorum round.
                pr.recent_active = true;
                pr
            });
        }
        if !self.voters.contains(self.id) {
            // Removed. The remaining voters may not know yet that the change
            // committed, and until they apply it they need our vote; so keep
            // leading (without counting ourselves) until every voter holds
            // our whole log, then hand over (thesis §4.2.2).
            self.removed = true;
            self.broadcast_append()?;
            return self.maybe_step_down_removed();
        }
        // A smaller quorum may commit more; a newcomer needs the log.
        self.maybe_commit()?;
        self.broadcast_append()?;
        Ok(())
    }

    /// Whether a membership change in the log past the applied index removes
    /// this node.
    fn unapplied_change_removes_self(&self) -> Result<bool, RaftError> {
        let id = self.id;
        self.unapplied_conf_change(self.log.last_index()?, |change| !change.conf.voters.contains(&id))
    }

    /// Whether a membership change in the log past the applied index, up
    /// to `upto`, satisfies `matches`.
    fn unapplied_conf_change(
        &self,
        upto: Index,
        matches: impl Fn(&ConfChangeEntry) -> bool,
    ) -> Result<bool, RaftError> {
        let mut index = self.log.applied() + 1;
        while index <= upto {
            let entries = self.log.entries(index, upto + 1, self.config.max_message_bytes)?;
            for entry in &entries {
                if entry.kind == EntryKind::ConfChange
                    && let Ok(change) = ConfChangeEntry::decode(&entry.data)
                    && matches(&change)
                {
                    return Ok(true);
                }
            }
            index += entries.len().max(1) as u64;
        }
        Ok(false)
    }

    /// A removed leader steps down once every voter holds its whole log:
    /// any of them can then win, with or without our vote.
    fn maybe_step_down_removed(&mut self) -> Result<(), RaftError> {
        if !self.removed || self.role != Role::Leader {
            return Ok(());
        }
        let last_index = self.log.last_index()?;
        let caught_up =
            self.voters.voters().iter().all(|id| self.progress.get(id).is_some_and(|pr| pr.matched == last_index));
        if caught_up && self.log.committed() == last_index {
            self.hand_over()?;
            self.become_follower(self.term, None);
        }
        Ok(())
    }

    /// Tells the voter whose log matches ours furthest to campaign now, if
    /// one holds our whole log (otherwise it could not win anyway).
    fn hand_over(&mut self) -> Result<(), RaftError> {
        // Followers may not know yet that the change removing us committed;
        // without that they would wait for our vote in the old configuration.
        self.broadcast_heartbeat();
        let last_index = self.log.last_index()?;
        let best = self
            .progress
            .iter()
            .filter(|(id, pr)| **id != self.id && self.voters.contains(**id) && pr.matched == last_index)
            .map(|(id, _)| *id)
            .next();
        if let Some(to) = best {
            self.send_timeout_now(to);
        }
        Ok(())
    }

    fn is_promotable(&self) -> bool {
        self.voters.contains(self.id)
    }

    fn members(&self) -> BTreeSet<NodeId> {
        let mut members = self.voters.voters();
        members.extend(&self.learners);
        members
    }

    fn apply_conf_state(&mut self, conf: &ConfState) {
        self.voters = JointConfig {
            incoming: MajorityConfig::new(conf.voters.clone()),
            outgoing: MajorityConfig::new(conf.voters_outgoing.clone()),
        };
        self.learners = conf.learners.clone();
    }

    /// Rejects messages that are malformed or not meant for us, before they
    /// can touch any state.
    fn validate(&self, m: &Message) -> Result<(), RaftError> {
        let invalid = |reason: String| Err(RaftError::InvalidMessage { from: m.from, reason });
        if m.to != self.id {
            return invalid(format!("addressed to node {}, this is node {}", m.to, self.id));
        }
        if m.from == 0 || m.from == self.id {
            return invalid(format!("bad sender id {}", m.from));
        }
        if let MessageBody::AppendEntries { prev_log_index, prev_log_term, entries, .. } = &m.body {
            let mut last_term = *prev_log_term;
            for (offset, entry) in entries.iter().enumerate() {
                if entry.index != prev_log_index + 1 + offset as u64 {
                    return invalid(format!(
                        "entry {offset} has index {}, expected {}",
                        entry.index,
                        prev_log_index + 1 + offset as u64
                    ));
                }
                if entry.term < last_term || entry.term > m.term {
                    return invalid(format!(
                        "entry {} has term {} out of order (message term {})",
                        entry.index, entry.term, m.term
                    ));
                }
                if entry.data.len() as u64 > self.config.max_entry_bytes {
                    return invalid(format!(
                        "entry {} has {} bytes, above the limit of {}",
                        entry.index,
                        entry.data.len(),
                        self.config.max_entry_bytes
                    ));
                }
                last_term = entry.term;
            }
            if *prev_log_term > m.term {
                return invalid(format!("prev_log_term {prev_log_term} is above the message term {}", m.term));
            }
        }
        Ok(())
    }
}
