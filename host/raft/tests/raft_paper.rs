//! One test per rule of Figure 2 of the Raft paper ("In Search of an
//! Understandable Consensus Algorithm"), named after the rule, plus the
//! extensions the core implements (PreVote, CheckQuorum, ReadIndex, limits).
//! Each builds nodes by hand and checks the messages and state the rule
//! demands.

use bytes::Bytes;
use raft_core::{
    ConfChange, ConfChangeEntry, ConfChangeKind, ConfState, Config, Entry, EntryKind, HardState, Index, MemLogStore,
    Message, MessageBody, NodeId, ProposeError, Raft, RaftError, ReadIndexError, ReadState, Role, SnapshotMeta, Term,
};
use std::collections::BTreeMap;

// ---- Helpers ----------------------------------------------------------------

fn config(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.pre_vote = false;
    c.check_quorum = false;
    c
}

fn entry(index: Index, term: Term) -> Entry {
    Entry { term, index, kind: EntryKind::Normal, data: Bytes::from(format!("e{index}t{term}")) }
}

/// A store holding entries with the given terms at indexes 1, 2, ...
fn store_with(voters: &[NodeId], terms: &[Term], hard_state: HardState) -> MemLogStore {
    let mut store = MemLogStore::new_with_conf_state(ConfState::with_voters(voters.iter().copied()));
    let entries: Vec<Entry> = terms.iter().enumerate().map(|(i, &t)| entry(i as Index + 1, t)).collect();
    store.append(&entries);
    store.set_hard_state(hard_state);
    store
}

fn node_with(config: Config, voters: &[NodeId], terms: &[Term], term: Term) -> Raft<MemLogStore> {
    let store = store_with(voters, terms, HardState { term, vote: None, commit: 0 });
    Raft::new(config, store).expect("node starts")
}

fn node(id: NodeId, voters: &[NodeId]) -> Raft<MemLogStore> {
    node_with(config(id), voters, &[], 0)
}

/// What one Ready produced, after the driver persisted it.
#[derive(Default)]
struct Handled {
    messages: Vec<Message>,
    persisted_messages: Vec<Message>,
    committed: Vec<Entry>,
    read_states: Vec<ReadState>,
    hard_state: Option<HardState>,
}

impl Handled {
    fn all(&self) -> Vec<Message> {
        self.messages.iter().chain(&self.persisted_messages).cloned().collect()
    }
}

/// Drives the node's Ready loop to completion as a synchronous driver would.
fn handle(r: &mut Raft<MemLogStore>) -> Handled {
    let mut out = Handled::default();
    while r.has_ready() {
        let rd = r.ready().expect("ready");
        r.store_mut().append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            r.store_mut().set_hard_state(hs);
            out.hard_state = Some(hs);
        }
        out.messages.extend(rd.messages);
        out.persisted_messages.extend(rd.persisted_messages);
        out.committed.extend(rd.committed_entries);
        out.read_states.extend(rd.read_states);
        r.advance().expect("advance");
    }
    out
}

/// Makes `r` (a follower) the leader of the next term on its own vote and
/// `voter`'s, persisting its candidacy first as a driver would. The no-op of
/// the new term is left in the next Ready, unpersisted.
fn win_election(r: &mut Raft<MemLogStore>, voter: NodeId) {
    r.campaign().expect("campaign");
    handle(r);
    let term = r.term();
    r.step(msg(voter, r.id(), term, MessageBody::RequestVoteResponse { pre_vote: false, granted: true }))
        .expect("vote");
    assert_eq!(r.role(), Role::Leader, "node {} should have won term {term}", r.id());
}

fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message { from, to, term, body }
}

fn tick_n(r: &mut Raft<MemLogStore>, n: u32) {
    for _ in 0..n {
        r.tick().expect("tick");
    }
}

/// Ticks until the node campaigns (at most twice the election timeout).
fn tick_until_campaign(r: &mut Raft<MemLogStore>) {
    for _ in 0..20 {
        r.tick().expect("tick");
        if r.role() != Role::Follower {
            return;
        }
    }
    panic!("node {} never campaigned", r.id());
}

/// A fully connected in-memory cluster, delivering messages synchronously.
struct Cluster {
    nodes: BTreeMap<NodeId, Raft<MemLogStore>>,
    /// Nodes whose traffic is dropped both ways.
    isolated: Vec<NodeId>,
    committed: BTreeMap<NodeId, Vec<Entry>>,
    reads: BTreeMap<NodeId, Vec<ReadState>>,
}

impl Cluster {
    fn new(size: u64, pre_vote: bool, check_quorum: bool) -> Cluster {
        let voters: Vec<NodeId> = (1..=size).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let mut c = config(id);
                c.pre_vote = pre_vote;
                c.check_quorum = check_quorum;
                (id, node_with(c, &voters, &[], 0))
            })
            .collect();
        Cluster { nodes, isolated: Vec::new(), committed: BTreeMap::new(), reads: BTreeMap::new() }
    }

    fn node(&mut self, id: NodeId) -> &mut Raft<MemLogStore> {
        self.nodes.get_mut(&id).expect("known node")
    }

    /// Delivers messages until none are left.
    fn settle(&mut self) {
        let mut queue = Vec::new();
        for _ in 0..1000 {
            for (id, r) in self.nodes.iter_mut() {
                let out = handle(r);
                queue.extend(out.all());
                self.committed.entry(*id).or_default().extend(out.committed);
                self.reads.entry(*id).or_default().extend(out.read_states);
            }
            if queue.is_empty() {
                return;
            }
            for m in std::mem::take(&mut queue) {
                if self.isolated.contains(&m.from) || self.isolated.contains(&m.to) {
                    continue;
                }
                self.nodes.get_mut(&m.to).expect("known node").step(m).expect("step");
            }
        }
        panic!("cluster never settled");
    }

    fn elect(&mut self, id: NodeId) {
        self.node(id).campaign().expect("campaign");
        self.settle();
        assert_eq!(self.node(id).role(), Role::Leader, "node {id} should have won");
    }

    fn tick_all(&mut self, n: u32) {
        for _ in 0..n {
            for r in self.nodes.values_mut() {
                r.tick().expect("tick");
            }
            self.settle();
        }
    }
}

fn payloads(items: &[&str]) -> Vec<Bytes> {
    items.iter().map(|s| Bytes::from(s.to_string())).collect()
}

// ---- Rules for all servers ----------------------------------------------------

#[test]
fn all_servers_apply_committed_entries_in_log_order() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.node(1).propose(payloads(&["a", "b"])).expect("leader accepts");
    c.node(1).propose(payloads(&["c"])).expect("leader accepts");
    c.tick_all(2);
    for id in 1..=3 {
        let applied: Vec<&[u8]> = c.committed[&id].iter().filter(|e| !e.is_noop()).map(|e| &e.data[..]).collect();
        assert_eq!(applied, vec![&b"a"[..], b"b", b"c"], "node {id}");
        let indexes: Vec<Index> = c.committed[&id].iter().map(|e| e.index).collect();
        assert_eq!(indexes, vec![1, 2, 3, 4], "node {id} applies each index once, in order");
    }
}

#[test]
fn all_servers_convert_to_follower_on_higher_term() {
    let bodies = [
        MessageBody::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0 },
        MessageBody::Heartbeat { commit: 0, read_seq: 0 },
        MessageBody::AppendEntriesResponse { success: false, index: 0, hint_index: 0, hint_term: 0 },
        MessageBody::RequestVoteResponse { pre_vote: false, granted: false },
    ];
    for role in [Role::Follower, Role::Candidate, Role::Leader] {
        for body in &bodies {
            let mut r = node(1, &[1, 2, 3]);
            match role {
                Role::Candidate => r.campaign().expect("campaign"),
                Role::Leader => {
                    r.campaign().expect("campaign");
                    handle(&mut r);
                    r.step(msg(2, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: true }))
                        .expect("vote");
                }
                _ => {}
            }
            assert_eq!(r.role(), role);
            r.step(msg(2, 1, 5, body.clone())).expect("step");
            assert_eq!(r.term(), 5, "{role:?} seeing {}", body.name());
            assert_eq!(r.role(), Role::Follower, "{role:?} seeing {}", body.name());
            let expected_leader = body.is_from_leader().then_some(2);
            assert_eq!(r.leader(), expected_leader);
        }
    }
}

#[test]
fn all_servers_ignore_messages_from_older_terms() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1, 1], 3);
    let before = r.hard_state();
    r.step(msg(
        2,
        1,
        2,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 9, last_log_term: 2, transfer: false },
    ))
    .expect("step");
    r.step(msg(2, 1, 2, MessageBody::RequestVoteResponse { pre_vote: false, granted: true })).expect("step");
    let out = handle(&mut r);
    let replies: Vec<(u64, MessageBody)> = out.all().into_iter().map(|m| (m.term, m.body)).collect();
    assert_eq!(
        replies,
        vec![(3, MessageBody::RequestVoteResponse { pre_vote: false, granted: false })],
        "a stale request is refused with our term; a stale answer is dropped"
    );
    assert_eq!(r.hard_state(), before);
}

// ---- Followers ------------------------------------------------------------------

#[test]
fn followers_respond_to_rpcs_from_candidates_and_leaders() {
    let mut r = node(2, &[1, 2, 3]);
    r.step(msg(
        1,
        2,
        1,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 0, last_log_term: 0, transfer: false },
    ))
    .expect("step");
    r.step(msg(
        1,
        2,
        1,
        MessageBody::AppendEntries {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![entry(1, 1)],
            leader_commit: 0,
        },
    ))
    .expect("step");
    let out = handle(&mut r);
    let bodies: Vec<&MessageBody> = out.persisted_messages.iter().map(|m| &m.body).collect();
    assert!(matches!(bodies[0], MessageBody::RequestVoteResponse { granted: true, .. }));
    assert!(matches!(bodies[1], MessageBody::AppendEntriesResponse { success: true, index: 1, .. }));
}

#[test]
fn follower_converts_to_candidate_when_election_timeout_elapses() {
    let mut r = node(1, &[1, 2, 3]);
    tick_n(&mut r, 9);
    assert_eq!(r.role(), Role::Follower, "the timeout is at least election_tick");
    tick_until_campaign(&mut r);
    assert_eq!(r.role(), Role::Candidate);
}

#[test]
fn follower_hearing_from_leader_does_not_time_out() {
    let mut r = node(2, &[1, 2, 3]);
    for _ in 0..100 {
        r.tick().expect("tick");
        r.step(msg(1, 2, 1, MessageBody::Heartbeat { commit: 0, read_seq: 0 })).expect("heartbeat");
    }
    assert_eq!(r.role(), Role::Follower);
    assert_eq!(r.term(), 1);
}

#[test]
fn election_timeouts_are_randomized_between_one_and_two_election_ticks() {
    let mut timeouts = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let mut c = config(1);
        c.seed = seed;
        let mut r = node_with(c, &[1, 2, 3], &[], 0);
        let mut ticks = 0;
        while r.role() == Role::Follower {
            r.tick().expect("tick");
            ticks += 1;
        }
        assert!((10..20).contains(&ticks), "timeout {ticks} outside [10, 20)");
        timeouts.insert(ticks);
    }
    assert!(timeouts.len() > 3, "timeouts should spread, got {timeouts:?}");
}

// ---- Candidates ------------------------------------------------------------------

#[test]
fn candidate_increments_term_votes_for_itself_and_requests_votes() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1, 2], 2);
    r.campaign().expect("campaign");
    assert_eq!(r.role(), Role::Candidate);
    assert_eq!(r.term(), 3);
    assert_eq!(r.hard_state().vote, Some(1));
    let out = handle(&mut r);
    assert_eq!(out.hard_state, Some(HardState { term: 3, vote: Some(1), commit: 0 }));
    let mut targets: Vec<NodeId> = out.persisted_messages.iter().map(|m| m.to).collect();
    targets.sort();
    assert_eq!(targets, vec![2, 3]);
    for m in &out.persisted_messages {
        assert_eq!(m.term, 3);
        assert_eq!(
            m.body,
            MessageBody::RequestVote { pre_vote: false, last_log_index: 2, last_log_term: 2, transfer: false }
        );
    }
    assert!(out.messages.is_empty(), "vote requests wait until the self-vote is durable");
}

#[test]
fn candidate_becomes_leader_on_votes_from_majority() {
    let mut r = node(1, &[1, 2, 3, 4, 5]);
    r.campaign().expect("campaign");
    handle(&mut r);
    r.step(msg(2, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: true })).expect("step");
    assert_eq!(r.role(), Role::Candidate, "2 of 5 is not a majority");
    r.step(msg(3, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: false })).expect("step");
    r.step(msg(4, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: true })).expect("step");
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.leader(), Some(1));
}

#[test]
fn candidate_leads_only_once_its_own_vote_is_durable() {
    // A sole voter wins on its own vote, but a leader's appends leave before
    // its log is durable: leading on a vote a crash could erase would let
    // it lead a term that it then helps another node lead too.
    let mut sole = node(1, &[1]);
    sole.campaign().expect("campaign");
    assert_eq!(sole.role(), Role::Candidate, "the vote is not durable yet");
    let rd = sole.ready().expect("ready");
    assert_eq!(rd.hard_state.map(|hs| (hs.term, hs.vote)), Some((1, Some(1))));
    assert!(rd.messages.is_empty() && rd.entries.is_empty(), "nothing of a leader before the vote is durable");
    sole.store_mut().set_hard_state(rd.hard_state.expect("hard state"));
    sole.advance().expect("advance");
    assert_eq!(sole.role(), Role::Leader, "once durable, the win completes");

    // Votes that arrive before the driver has made the candidate's own vote
    // durable (a driver sends its requests only after) do not make it lead.
    let mut r = node(1, &[1, 2, 3]);
    r.campaign().expect("campaign");
    r.step(msg(2, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: true })).expect("vote");
    assert_eq!(r.role(), Role::Candidate);
    handle(&mut r);
    assert_eq!(r.role(), Role::Leader);
}

#[test]
fn candidate_becomes_follower_when_majority_rejects() {
    let mut r = node(1, &[1, 2, 3]);
    r.campaign().expect("campaign");
    r.step(msg(2, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: false })).expect("step");
    r.step(msg(3, 1, 1, MessageBody::RequestVoteResponse { pre_vote: false, granted: false })).expect("step");
    assert_eq!(r.role(), Role::Follower);
    assert_eq!(r.term(), 1, "losing does not change the term");
}

#[test]
fn candidate_converts_to_follower_on_append_entries_from_new_leader() {
    let mut r = node(1, &[1, 2, 3]);
    r.campaign().expect("campaign");
    r.step(msg(
        2,
        1,
        1,
        MessageBody::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![], leader_commit: 0 },
    ))
    .expect("step");
    assert_eq!(r.role(), Role::Follower);
    assert_eq!(r.leader(), Some(2));
    assert_eq!(r.term(), 1);
}

#[test]
fn candidate_starts_new_election_when_election_timeout_elapses() {
    let mut r = node(1, &[1, 2, 3]);
    r.campaign().expect("campaign");
    assert_eq!(r.term(), 1);
    tick_n(&mut r, 20);
    assert_eq!(r.role(), Role::Candidate);
    assert!(r.term() >= 2, "a split vote leads to a new election in a new term");
}

// ---- Leaders -----------------------------------------------------------------------

#[test]
fn leader_appends_noop_and_sends_it_upon_election() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1], 1);
    r.campaign().expect("campaign");
    handle(&mut r);
    r.step(msg(2, 1, 2, MessageBody::RequestVoteResponse { pre_vote: false, granted: true })).expect("step");
    assert_eq!(r.role(), Role::Leader);
    let out = handle(&mut r);
    assert_eq!(out.messages.len(), 2, "one AppendEntries per follower");
    for m in &out.messages {
        let MessageBody::AppendEntries { prev_log_index, prev_log_term, entries, .. } = &m.body else {
            panic!("expected AppendEntries, got {:?}", m.body);
        };
        assert_eq!((*prev_log_index, *prev_log_term), (1, 1));
        assert_eq!(entries.len(), 1);
        assert!(entries[0].is_noop());
        assert_eq!((entries[0].index, entries[0].term), (2, 2));
    }
}

#[test]
fn leader_sends_heartbeats_during_idle_periods() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    let r = c.node(1);
    r.tick().expect("tick");
    let out = handle(r);
    let beats: Vec<&Message> =
        out.messages.iter().filter(|m| matches!(m.body, MessageBody::Heartbeat { .. })).collect();
    assert_eq!(beats.len(), 2);
    assert_eq!(beats[0].body, beats[1].body, "one broadcast");
    assert!(
        matches!(beats[0].body, MessageBody::Heartbeat { commit: 1, read_seq } if read_seq > 0),
        "heartbeats carry the commit index and their broadcast's number: {:?}",
        beats[0].body
    );
}

#[test]
fn leader_appends_client_command_to_its_log_and_replicates_it() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    let proposed = c.node(1).propose(payloads(&["x"])).expect("accepted");
    assert_eq!((proposed.first_index, proposed.term), (2, 1));
    let out = handle(c.node(1));
    for m in &out.messages {
        let MessageBody::AppendEntries { entries, .. } = &m.body else { panic!("expected AppendEntries") };
        assert_eq!(&entries[0].data[..], b"x");
    }
}

#[test]
fn leader_responds_after_entry_is_applied_to_state_machine() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.node(1).propose(payloads(&["x"])).expect("accepted");
    c.settle();
    assert_eq!(c.node(1).log().committed(), 2);
    assert!(c.committed[&1].iter().any(|e| &e.data[..] == b"x"), "the leader hands the entry out for applying");
}

#[test]
fn leader_sends_entries_starting_at_next_index_to_lagging_follower() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.isolated = vec![3];
    for i in 0..5 {
        c.node(1).propose(payloads(&[&format!("w{i}")])).expect("accepted");
    }
    c.settle();
    assert_eq!(c.node(3).log().last_index().expect("last"), 1);
    c.isolated.clear();
    c.tick_all(3);
    assert_eq!(c.node(3).log().last_index().expect("last"), 6, "the follower catches up");
    assert_eq!(c.node(3).log().committed(), 6);
}

#[test]
fn leader_decrements_next_index_on_rejection_and_retries() {
    // Follower 2 holds a stale suffix from term 2; leader 1 (term 3) probes
    // back to the divergence point and overwrites it.
    let voters = [1, 2, 3];
    let mut leader = node_with(config(1), &voters, &[1, 1, 3, 3, 3], 3);
    let mut follower = node_with(config(2), &voters, &[1, 1, 2, 2, 2, 2], 3);
    win_election(&mut leader, 3);
    let mut rounds = 0;
    let mut to_follower: Vec<Message> = handle(&mut leader).all().into_iter().filter(|m| m.to == 2).collect();
    while !to_follower.is_empty() {
        rounds += 1;
        assert!(rounds < 10, "backtracking must converge quickly");
        for m in to_follower.drain(..) {
            follower.step(m).expect("follower step");
        }
        for m in handle(&mut follower).all() {
            leader.step(m).expect("leader step");
        }
        to_follower = handle(&mut leader).all().into_iter().filter(|m| m.to == 2).collect();
    }
    let terms: Vec<Term> = (1..=6).map(|i| follower.log().term(i).expect("term")).collect();
    assert_eq!(terms, vec![1, 1, 3, 3, 3, 4], "follower's log now equals the leader's");
    assert!(rounds <= 3, "the conflict hint skips the whole stale term (took {rounds} rounds)");
}

#[test]
fn leader_commits_entry_once_replicated_on_majority() {
    let mut r = node(1, &[1, 2, 3]);
    win_election(&mut r, 2);
    handle(&mut r);
    r.propose(payloads(&["x"])).expect("accepted");
    handle(&mut r);
    assert_eq!(r.log().committed(), 0, "one durable copy of three commits nothing");
    r.step(msg(2, 1, 1, MessageBody::AppendEntriesResponse { success: true, index: 2, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    let out = handle(&mut r);
    assert_eq!(r.log().committed(), 2);
    assert_eq!(out.committed.len(), 2);
}

#[test]
fn leader_tells_caught_up_followers_the_commit_with_a_hint_that_needs_no_answer() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.node(1).propose(payloads(&["x"])).expect("accepted");
    let appends = handle(c.node(1)).all();
    assert_eq!(appends.len(), 2, "one AppendEntries per follower");
    for m in appends {
        let to = m.to;
        c.node(to).step(m).expect("follower takes the entry");
        for ack in handle(c.node(to)).all() {
            c.node(1).step(ack).expect("leader takes the ack");
        }
    }
    let out = handle(c.node(1));
    assert_eq!(c.node(1).log().committed(), 2);
    assert_eq!(out.all().len(), 2, "one message per follower: {:?}", out.all());
    for m in out.all() {
        assert_eq!(m.body, MessageBody::CommitHint { commit: 2, term: 1 }, "to {}", m.to);
        let to = m.to;
        c.node(to).step(m).expect("follower takes the hint");
        let follower = handle(c.node(to));
        assert_eq!(c.node(to).log().committed(), 2, "follower {to} commits");
        assert!(follower.committed.iter().any(|e| &e.data[..] == b"x"), "follower {to} applies the entry");
        assert!(follower.all().is_empty(), "a hint asks for no answer, got {:?}", follower.all());
    }
}

#[test]
fn leader_does_not_commit_entries_from_previous_terms_by_counting_replicas() {
    // Figure 8: leader of term 4 holds an entry of term 2 at index 2, and
    // learns that a majority has it. It must not commit it until an entry of
    // its own term is replicated on a majority.
    let voters = [1, 2, 3];
    let mut r = node_with(config(1), &voters, &[1, 2], 3);
    win_election(&mut r, 2);
    handle(&mut r);
    assert_eq!(r.role(), Role::Leader);
    r.step(msg(2, 1, 4, MessageBody::AppendEntriesResponse { success: true, index: 2, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    handle(&mut r);
    assert_eq!(r.log().committed(), 0, "index 2 (term 2) is on a majority but from an older term");
    r.step(msg(2, 1, 4, MessageBody::AppendEntriesResponse { success: true, index: 3, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    handle(&mut r);
    assert_eq!(r.log().committed(), 3, "committing the term-4 no-op commits everything before it");
}

#[test]
fn leader_counts_its_own_entry_only_once_durable() {
    let mut r = node(1, &[1, 2, 3]);
    win_election(&mut r, 2);
    // Take the Ready holding the no-op but do not persist it yet.
    let rd = r.ready().expect("ready");
    assert_eq!(rd.entries.len(), 1);
    r.step(msg(2, 1, 1, MessageBody::AppendEntriesResponse { success: true, index: 1, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    assert_eq!(r.log().committed(), 0, "one follower's copy and the leader's unwritten one are not a durable majority");
    r.store_mut().append(&rd.entries);
    if let Some(hs) = rd.hard_state {
        r.store_mut().set_hard_state(hs);
    }
    r.advance().expect("advance");
    assert_eq!(r.log().committed(), 1, "once the leader's copy is durable, two of three hold it");
}

// ---- RequestVote receiver ---------------------------------------------------------

#[test]
fn request_vote_reply_false_if_term_less_than_current_term() {
    let mut r = node_with(config(1), &[1, 2, 3], &[], 5);
    r.step(msg(
        2,
        1,
        4,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 10, last_log_term: 4, transfer: false },
    ))
    .expect("step");
    assert_eq!(r.hard_state().vote, None);
    // The refusal carries our term, so a candidate stuck on an old term
    // catches up instead of asking again and again.
    let replies = handle(&mut r).all();
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!((replies[0].to, replies[0].term), (2, 5));
    assert_eq!(replies[0].body, MessageBody::RequestVoteResponse { pre_vote: false, granted: false });
}

#[test]
fn request_vote_granted_to_at_most_one_candidate_per_term() {
    let mut r = node(1, &[1, 2, 3]);
    r.step(msg(
        2,
        1,
        1,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 0, last_log_term: 0, transfer: false },
    ))
    .expect("step");
    r.step(msg(
        3,
        1,
        1,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 0, last_log_term: 0, transfer: false },
    ))
    .expect("step");
    r.step(msg(
        2,
        1,
        1,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 0, last_log_term: 0, transfer: false },
    ))
    .expect("step");
    let out = handle(&mut r);
    let answers: Vec<(NodeId, bool)> = out
        .persisted_messages
        .iter()
        .map(|m| match m.body {
            MessageBody::RequestVoteResponse { granted, .. } => (m.to, granted),
            ref other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        answers,
        vec![(2, true), (3, false), (2, true)],
        "a repeated request from the same candidate is granted again"
    );
    assert_eq!(out.hard_state.expect("vote persisted").vote, Some(2));
}

#[test]
fn request_vote_granted_only_if_candidate_log_is_at_least_as_up_to_date() {
    // Voter's log: terms [1, 2, 2] (last index 3, last term 2).
    let cases: &[(Index, Term, bool)] = &[
        (3, 2, true),  // same
        (4, 2, true),  // longer, same term
        (2, 2, false), // shorter, same term
        (1, 3, true),  // higher last term wins even if shorter
        (9, 1, false), // lower last term loses even if longer
    ];
    for &(last_log_index, last_log_term, want) in cases {
        let mut r = node_with(config(1), &[1, 2, 3], &[1, 2, 2], 2);
        r.step(msg(
            2,
            1,
            3,
            MessageBody::RequestVote { pre_vote: false, last_log_index, last_log_term, transfer: false },
        ))
        .expect("step");
        let out = handle(&mut r);
        let granted = matches!(out.persisted_messages[0].body, MessageBody::RequestVoteResponse { granted: true, .. });
        assert_eq!(granted, want, "candidate log ({last_log_index}, {last_log_term})");
    }
}

#[test]
fn vote_is_persisted_before_the_response_may_be_sent() {
    let mut r = node(1, &[1, 2, 3]);
    r.step(msg(
        2,
        1,
        7,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 0, last_log_term: 0, transfer: false },
    ))
    .expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(rd.hard_state, Some(HardState { term: 7, vote: Some(2), commit: 0 }));
    assert!(rd.messages.is_empty());
    assert!(matches!(rd.persisted_messages[0].body, MessageBody::RequestVoteResponse { granted: true, .. }));
}

// ---- AppendEntries receiver ----------------------------------------------------------

fn append(prev: (Index, Term), entries: Vec<Entry>, leader_commit: Index, term: Term) -> Message {
    msg(
        2,
        1,
        term,
        MessageBody::AppendEntries { prev_log_index: prev.0, prev_log_term: prev.1, entries, leader_commit },
    )
}

fn response(out: &Handled) -> (bool, Index) {
    match out.persisted_messages.last().map(|m| &m.body) {
        Some(MessageBody::AppendEntriesResponse { success, index, .. }) => (*success, *index),
        other => panic!("expected an AppendEntriesResponse, got {other:?}"),
    }
}

#[test]
fn append_entries_reply_false_if_term_less_than_current_term() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1], 3);
    r.step(append((1, 1), vec![entry(2, 2)], 2, 2)).expect("step");
    let out = handle(&mut r);
    assert_eq!(out.all()[0].term, 3, "the answer tells the stale leader our term");
    assert!(!response(&out).0);
    assert_eq!(r.log().last_index().expect("last"), 1);
}

#[test]
fn append_entries_reply_false_if_log_lacks_entry_at_prev_log_index_with_prev_log_term() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1, 1], 2);
    r.step(append((2, 2), vec![entry(3, 2)], 0, 2)).expect("term mismatch at prev");
    assert_eq!(response(&handle(&mut r)), (false, 2));
    r.step(append((5, 2), vec![entry(6, 2)], 0, 2)).expect("prev past our log");
    assert_eq!(response(&handle(&mut r)), (false, 5));
    assert_eq!(r.log().last_index().expect("last"), 2);
}

#[test]
fn append_entries_deletes_conflicting_entry_and_all_that_follow() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1, 1, 1, 1], 2);
    r.step(append((1, 1), vec![entry(2, 1), entry(3, 2)], 0, 2)).expect("step");
    let out = handle(&mut r);
    assert_eq!(response(&out), (true, 3));
    assert_eq!(r.log().last_index().expect("last"), 3, "index 4 followed the conflict and is gone");
    assert_eq!(r.log().term(3).expect("term"), 2);
    assert_eq!(r.store_mut().all_entries().len(), 3, "the durable log was truncated too");
}

#[test]
fn append_entries_appends_new_entries_not_already_in_the_log() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1, 1], 1);
    // A duplicate of what we have changes nothing.
    r.step(append((0, 0), vec![entry(1, 1), entry(2, 1)], 0, 1)).expect("step");
    let out = handle(&mut r);
    assert_eq!(response(&out), (true, 2));
    r.step(append((2, 1), vec![entry(3, 1), entry(4, 1)], 0, 1)).expect("step");
    assert_eq!(response(&handle(&mut r)), (true, 4));
    assert_eq!(r.log().last_index().expect("last"), 4);
}

#[test]
fn append_entries_sets_commit_to_min_of_leader_commit_and_index_of_last_new_entry() {
    // Our log: [1, 1, 2, 2] where indexes 3 and 4 are a stale tail (term 2)
    // the leader of term 3 does not have. The leader commits up to 5 but
    // sends only up to 2: we may commit 2, never our stale 3 and 4.
    let mut r = node_with(config(1), &[1, 2, 3], &[1, 1, 2, 2], 3);
    r.step(append((1, 1), vec![entry(2, 1)], 5, 3)).expect("step");
    let out = handle(&mut r);
    assert_eq!(response(&out), (true, 2));
    assert_eq!(r.log().committed(), 2, "commit stops at the last new entry, not at our last index");
    assert_eq!(out.committed.len(), 2);
    r.step(append((2, 1), vec![], 1, 3)).expect("step");
    assert_eq!(r.log().committed(), 2, "the commit index never moves back");
}

#[test]
fn append_response_waits_until_entries_are_durable() {
    let mut r = node(1, &[1, 2, 3]);
    r.step(append((0, 0), vec![entry(1, 1)], 0, 1)).expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.messages.is_empty());
    assert!(matches!(
        rd.persisted_messages[0].body,
        MessageBody::AppendEntriesResponse { success: true, index: 1, .. }
    ));
}

// ---- PreVote and CheckQuorum -----------------------------------------------------------

#[test]
fn pre_vote_does_not_change_term_or_vote() {
    let mut c = config(1);
    c.pre_vote = true;
    let mut r = node_with(c, &[1, 2, 3], &[1], 1);
    r.campaign().expect("campaign");
    assert_eq!(r.role(), Role::PreCandidate);
    assert_eq!(r.term(), 1);
    let out = handle(&mut r);
    assert!(out.hard_state.is_none(), "a pre-election writes nothing durable");
    for m in &out.all() {
        assert_eq!(m.term, 2, "pre-votes ask about the next term");
        assert!(matches!(m.body, MessageBody::RequestVote { pre_vote: true, .. }));
    }
    r.step(msg(2, 1, 2, MessageBody::RequestVoteResponse { pre_vote: true, granted: true })).expect("step");
    assert_eq!(r.role(), Role::Candidate, "a granted pre-vote majority starts the real election");
    assert_eq!(r.term(), 2);
}

#[test]
fn pre_vote_keeps_a_partitioned_node_from_disrupting_the_leader() {
    let mut c = Cluster::new(3, true, true);
    c.elect(1);
    c.isolated = vec![3];
    c.tick_all(100);
    assert_eq!(c.node(3).term(), 1, "the isolated node never won a pre-vote, so never bumped its term");
    c.isolated.clear();
    c.tick_all(5);
    assert_eq!(c.node(1).role(), Role::Leader, "the leader was not deposed when it returned");
    assert_eq!(c.node(1).term(), 1);
}

#[test]
fn check_quorum_leader_steps_down_without_hearing_from_a_quorum() {
    let mut c = Cluster::new(3, true, true);
    c.elect(1);
    c.isolated = vec![1];
    c.tick_all(25);
    assert_ne!(c.node(1).role(), Role::Leader, "an isolated leader steps down within two election timeouts");
}

#[test]
fn check_quorum_followers_ignore_vote_requests_while_the_leader_is_alive() {
    let mut c = config(2);
    c.check_quorum = true;
    let mut r = node_with(c, &[1, 2, 3], &[], 0);
    r.step(msg(1, 2, 1, MessageBody::Heartbeat { commit: 0, read_seq: 0 })).expect("heartbeat");
    r.step(msg(
        3,
        2,
        2,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 5, last_log_term: 1, transfer: false },
    ))
    .expect("step");
    assert_eq!(r.term(), 1, "the request did not bump our term");
    assert!(
        handle(&mut r).persisted_messages.iter().all(|m| !matches!(m.body, MessageBody::RequestVoteResponse { .. }))
    );
}

// ---- Lease reads ----------------------------------------------------------------------

#[test]
fn lease_read_needs_check_quorum_a_current_term_commit_and_a_fresh_quorum() {
    let mut without = Cluster::new(3, false, false);
    without.elect(1);
    assert_eq!(without.node(1).lease_read_index(), None, "no lease without CheckQuorum");

    let mut c = Cluster::new(3, false, true);
    c.elect(1);
    let committed = c.node(1).log().committed();
    assert_eq!(c.node(1).lease_read_index(), None, "no heartbeat of this leader was acknowledged yet");
    c.tick_all(1);
    assert_eq!(c.node(1).lease_read_index(), Some(committed), "a quorum acknowledged a heartbeat");
    assert_eq!(c.node(2).lease_read_index(), None, "followers hold no lease");

    // Cut the leader off: after half an election timeout without acks its
    // lease is gone, well before CheckQuorum would depose it.
    c.isolated = vec![2, 3];
    c.tick_all(5);
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(c.node(1).lease_read_index(), None, "a stale quorum gives no lease");
    c.isolated.clear();
    c.tick_all(1);
    assert_eq!(c.node(1).lease_read_index(), Some(committed), "acks renew the lease");
}

/// A transfer's vote ignores the followers' lease, so a leader that sent
/// TimeoutNow may already be replaced: it must not answer from its lease.
#[test]
fn a_leader_handing_over_holds_no_lease_until_an_election_timeout_after_timeout_now() {
    let mut c = Cluster::new(3, false, true);
    c.elect(1);
    c.tick_all(1);
    let committed = c.node(1).log().committed();
    assert_eq!(c.node(1).lease_read_index(), Some(committed));
    // Node 2 is caught up: TimeoutNow goes out at once, and is lost.
    c.isolated = vec![2];
    c.node(1).transfer_leader(2).expect("transfer");
    assert_eq!(c.node(1).lease_read_index(), None, "no lease while handing over");
    c.settle();
    c.isolated.clear();
    // The transfer is abandoned after an election timeout; node 3 keeps
    // acking, yet no lease until an election timeout after TimeoutNow.
    let mut ticks = 0;
    while c.node(1).lease_read_index().is_none() {
        c.tick_all(1);
        ticks += 1;
        assert_eq!(c.node(1).role(), Role::Leader);
        assert!(ticks <= 30, "the lease never came back");
    }
    assert!(ticks >= 10, "a lease {ticks} ticks after TimeoutNow, within the election timeout");
}

/// The highest index committed by any node of the cluster.
fn cluster_committed(c: &mut Cluster) -> Index {
    c.nodes.values().map(|r| r.log().committed()).max().unwrap_or(0)
}

/// A follower refuses other candidates for an election timeout after it last
/// heard from the leader, counted from when it heard. An answer the network
/// delayed proves only that the follower heard the heartbeat it answers, so
/// the lease counts from when that heartbeat left, never from when the answer
/// arrived: here a late answer arrives after the others elected a new leader.
#[test]
fn a_lease_counts_from_when_the_answered_heartbeat_left_not_from_when_the_answer_arrived() {
    let mut c = Cluster::new(3, false, true);
    c.elect(1);
    c.tick_all(3);
    // A read round sends a heartbeat at once; node 3's answer is held back.
    c.node(1).read_index(1).expect("leader accepts");
    let heartbeat = handle(c.node(1))
        .all()
        .into_iter()
        .find(|m| m.to == 3 && matches!(m.body, MessageBody::Heartbeat { .. }))
        .expect("a heartbeat to node 3");
    c.node(3).step(heartbeat).expect("heartbeat");
    let late_answer = handle(c.node(3)).all().into_iter().find(|m| m.to == 1).expect("node 3 answers");
    // The leader is cut off; once the others' election timeout has run out
    // they elect a new leader, which commits.
    c.isolated = vec![1];
    c.tick_all(10);
    if c.node(2).role() != Role::Leader && c.node(3).role() != Role::Leader {
        c.elect(2);
    }
    let committed = cluster_committed(&mut c);
    assert!(committed > c.node(1).log().committed(), "the new leader committed");
    c.node(1).step(late_answer).expect("late answer");
    assert_eq!(c.node(1).role(), Role::Leader, "the old leader has not noticed yet (CheckQuorum has not run)");
    let lease = c.node(1).lease_read_index();
    assert!(lease.is_none_or(|index| index >= committed), "stale lease read at {lease:?}, {committed} committed");
}

/// A node that restarts has forgotten which leader it heard and when, so for
/// an election timeout after it starts it votes for no one that the lease of
/// a leader it may have acknowledged just before stopping still covers.
#[test]
fn a_restarted_follower_grants_no_vote_for_an_election_timeout() {
    let mut c = Cluster::new(3, true, true);
    c.elect(1);
    c.tick_all(1);
    let before = c.node(1).log().committed();
    assert_eq!(c.node(1).lease_read_index(), Some(before), "node 2 and 3 acked: node 1 holds a lease");
    // Node 2 restarts from its store at once; node 1 is cut off, and node 3,
    // whose own timer ran out, campaigns.
    let store = c.node(2).store_mut().clone();
    let mut config = config(2);
    config.pre_vote = true;
    config.check_quorum = true;
    c.nodes.insert(2, Raft::new(config, store).expect("restart"));
    c.isolated = vec![1];
    c.node(3).campaign().expect("campaign");
    c.settle();
    assert_ne!(c.node(3).role(), Role::Leader, "the restarted node voted within the old leader's lease");
    let lease = c.node(1).lease_read_index();
    let committed = cluster_committed(&mut c);
    assert!(lease.is_none_or(|index| index >= committed), "stale lease read at {lease:?}, {committed} committed");
    // After an election timeout node 2 votes again, and node 3 can win.
    c.tick_all(10);
    c.node(3).campaign().expect("campaign");
    c.settle();
    assert_eq!(c.node(3).role(), Role::Leader, "node 2 votes once an election timeout has passed");
}

/// A follower hands out a committed membership change; before the driver
/// finishes that Ready, a snapshot of a later point (with a later
/// configuration) arrives and is restored. Finishing the older Ready must not
/// put the older configuration back: a node left with it may believe itself
/// no voter while it is the only one, and the cluster never elects again.
#[test]
fn a_membership_change_handed_out_before_a_snapshot_does_not_undo_the_snapshot_s_configuration() {
    let mut r = node(2, &[1, 2, 3]);
    let add_learner = ConfChangeEntry {
        change: ConfChange { kind: ConfChangeKind::AddLearner, node: 4, context: Bytes::new() },
        conf: ConfState { learners: [4].into(), ..ConfState::with_voters([1, 2, 3]) },
    };
    let change = Entry { term: 1, index: 1, kind: EntryKind::ConfChange, data: add_learner.encode() };
    r.step(msg(
        1,
        2,
        1,
        MessageBody::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![change], leader_commit: 1 },
    ))
    .expect("append");
    let first = r.ready().expect("ready");
    assert_eq!(first.committed_entries.len(), 1, "the change is handed out");
    r.store_mut().append(&first.entries);
    if let Some(hs) = first.hard_state {
        r.store_mut().set_hard_state(hs);
    }
    // Before the driver finishes the first Ready, a snapshot at 5 arrives
    // (node 3 was removed and node 4 promoted meanwhile).
    let later = ConfState::with_voters([1, 2, 4]);
    let snapshot = SnapshotMeta { index: 5, term: 1, conf_state: later.clone() };
    r.step(msg(1, 2, 1, MessageBody::InstallSnapshot { snapshot })).expect("snapshot");
    assert_eq!(r.conf_state(), later);
    r.advance().expect("advance");
    assert_eq!(r.conf_state(), later, "the older change replaced the snapshot's configuration");
}

#[test]
fn paused_apply_holds_back_committed_entries_but_not_replication() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.node(1).set_apply_paused(true);
    let proposed = c.node(1).propose(payloads(&["a", "b"])).expect("propose");
    c.settle();
    assert_eq!(c.node(1).log().committed(), proposed.last_index, "commit continues while apply is paused");
    assert!(c.committed[&1].iter().all(|e| e.index < proposed.first_index), "nothing new handed out");
    assert!(c.committed[&2].iter().any(|e| e.index == proposed.last_index), "followers apply as usual");
    c.node(1).set_apply_paused(false);
    c.settle();
    assert!(c.committed[&1].iter().any(|e| e.index == proposed.last_index), "resumed apply hands them out");
}

// ---- ReadIndex ------------------------------------------------------------------------

#[test]
fn read_index_is_served_only_after_a_quorum_confirms_leadership() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.isolated = vec![2, 3];
    c.node(1).read_index(42).expect("leader accepts");
    c.settle();
    assert!(c.reads[&1].is_empty(), "without a quorum's heartbeat acks the read is not safe");
    c.isolated.clear();
    c.tick_all(1);
    assert_eq!(c.reads[&1], vec![ReadState { index: 1, ctx: 42 }]);
}

#[test]
fn read_index_waits_for_the_leader_to_commit_in_its_term() {
    let mut r = node(1, &[1, 2, 3]);
    win_election(&mut r, 2);
    handle(&mut r);
    r.read_index(7).expect("queued");
    r.step(msg(2, 1, 1, MessageBody::HeartbeatResponse { read_seq: 0 })).expect("ack");
    assert!(handle(&mut r).read_states.is_empty(), "no read before the no-op commits");
    r.step(msg(2, 1, 1, MessageBody::AppendEntriesResponse { success: true, index: 1, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    let out = handle(&mut r);
    let round = out.messages.iter().find_map(|m| match m.body {
        MessageBody::Heartbeat { read_seq, .. } if read_seq > 0 => Some(read_seq),
        _ => None,
    });
    let read_seq = round.expect("the commit releases the read into a confirmation round");
    r.step(msg(2, 1, 1, MessageBody::HeartbeatResponse { read_seq })).expect("ack");
    assert_eq!(handle(&mut r).read_states, vec![ReadState { index: 1, ctx: 7 }]);
}

#[test]
fn read_index_on_a_follower_is_forwarded_to_the_leader() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    c.node(2).read_index(9).expect("forwarded");
    c.settle();
    assert_eq!(c.reads[&2], vec![ReadState { index: 1, ctx: 9 }]);
    let mut lonely = node(1, &[1, 2, 3]);
    assert!(matches!(lonely.read_index(1), Err(ReadIndexError::NoLeader)));
}

#[test]
fn read_index_on_a_single_node_cluster_needs_no_round_trip() {
    let mut r = node(1, &[1]);
    r.campaign().expect("campaign");
    handle(&mut r);
    assert_eq!(r.role(), Role::Leader);
    handle(&mut r);
    r.read_index(3).expect("accepted");
    assert_eq!(handle(&mut r).read_states, vec![ReadState { index: 1, ctx: 3 }]);
}

// ---- Limits and bad input -----------------------------------------------------------

#[test]
fn proposals_are_refused_by_followers_with_the_leader_hint() {
    let mut c = Cluster::new(3, false, false);
    c.elect(1);
    let err = c.node(2).propose(payloads(&["x"])).expect_err("followers refuse");
    assert!(matches!(err, ProposeError::NotLeader { leader: Some(1) }), "{err}");
}

#[test]
fn oversized_proposal_is_refused_and_nothing_is_appended() {
    let mut c = Cluster::new(1, false, false);
    c.elect(1);
    let big = Bytes::from(vec![0u8; (4 << 20) + 1]);
    let err = c.node(1).propose(vec![big]).expect_err("too large");
    assert!(matches!(err, ProposeError::TooLarge { .. }), "{err}");
    assert_eq!(c.node(1).log().last_index().expect("last"), 1);
    assert!(matches!(c.node(1).propose(vec![]), Err(ProposeError::Empty)));
}

#[test]
fn proposals_are_refused_as_busy_past_the_uncommitted_limit() {
    let mut cfg = config(1);
    cfg.max_uncommitted_bytes = 100;
    cfg.max_entry_bytes = 100;
    let mut r = node_with(cfg, &[1, 2, 3], &[], 0);
    win_election(&mut r, 2);
    handle(&mut r);
    r.propose(vec![Bytes::from(vec![1u8; 60])]).expect("first batch fits");
    let err = r.propose(vec![Bytes::from(vec![1u8; 60])]).expect_err("over the limit");
    assert!(matches!(err, ProposeError::Busy { uncommitted_bytes: 60, max: 100 }), "{err}");
    handle(&mut r);
    r.step(msg(2, 1, 1, MessageBody::AppendEntriesResponse { success: true, index: 2, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    handle(&mut r);
    r.propose(vec![Bytes::from(vec![1u8; 60])]).expect("committing frees the budget");
}

#[test]
fn append_entries_messages_respect_the_byte_limit_and_the_inflight_window() {
    let mut cfg = config(1);
    cfg.max_message_bytes = 100;
    cfg.max_inflight_messages = 2;
    let mut r = node_with(cfg, &[1, 2], &[], 0);
    win_election(&mut r, 2);
    handle(&mut r);
    r.step(msg(2, 1, 1, MessageBody::AppendEntriesResponse { success: true, index: 1, hint_index: 0, hint_term: 0 }))
        .expect("ack");
    handle(&mut r);
    // Follower 2 is now in Replicate: proposals stream until the window fills.
    for i in 0..10 {
        r.propose(vec![Bytes::from(format!("{i:040}"))]).expect("accepted");
    }
    let out = handle(&mut r);
    let appends: Vec<&Vec<Entry>> = out
        .messages
        .iter()
        .filter_map(|m| match &m.body {
            MessageBody::AppendEntries { entries, .. } if !entries.is_empty() => Some(entries),
            _ => None,
        })
        .collect();
    assert_eq!(appends.len(), 2, "the in-flight window holds two messages");
    for entries in appends {
        let bytes: u64 = entries.iter().map(Entry::size_bytes).sum();
        assert!(entries.len() == 1 || bytes <= 100, "{} entries, {bytes} bytes", entries.len());
    }
}

#[test]
fn malformed_messages_are_refused_without_changing_state() {
    let mut r = node_with(config(1), &[1, 2, 3], &[1], 1);
    let before = (r.hard_state(), r.log().last_index().expect("last"));
    let cases = vec![
        msg(2, 9, 1, MessageBody::Heartbeat { commit: 0, read_seq: 0 }),
        msg(0, 1, 1, MessageBody::Heartbeat { commit: 0, read_seq: 0 }),
        append((1, 1), vec![entry(3, 1)], 0, 2),
        append((1, 1), vec![entry(2, 2), entry(3, 1)], 0, 2),
        append((1, 1), vec![entry(2, 5)], 0, 2),
        append(
            (1, 1),
            vec![Entry { term: 2, index: 2, kind: EntryKind::Normal, data: Bytes::from(vec![0; (4 << 20) + 1]) }],
            0,
            2,
        ),
    ];
    for m in cases {
        let err = r.step(m.clone()).expect_err("refused");
        assert!(matches!(err, RaftError::InvalidMessage { .. }), "{err}");
        assert_eq!((r.hard_state(), r.log().last_index().expect("last")), before, "state unchanged by {m:?}");
    }
}

#[test]
fn restart_recovers_term_vote_and_log_from_the_store() {
    let mut r = node(1, &[1, 2, 3]);
    r.step(msg(
        2,
        1,
        4,
        MessageBody::RequestVote { pre_vote: false, last_log_index: 0, last_log_term: 0, transfer: false },
    ))
    .expect("vote");
    r.step(msg(
        2,
        1,
        4,
        MessageBody::AppendEntries {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![entry(1, 4)],
            leader_commit: 1,
        },
    ))
    .expect("append");
    handle(&mut r);
    let store = r.store_mut().clone();
    let mut again = Raft::new(config(1), store).expect("restart");
    assert_eq!(again.hard_state(), HardState { term: 4, vote: Some(2), commit: 1 });
    assert_eq!(again.log().last_index().expect("last"), 1);
    again
        .step(msg(
            3,
            1,
            4,
            MessageBody::RequestVote { pre_vote: false, last_log_index: 9, last_log_term: 4, transfer: false },
        ))
        .expect("step");
    let out = handle(&mut again);
    assert!(
        matches!(out.persisted_messages[0].body, MessageBody::RequestVoteResponse { granted: false, .. }),
        "the persisted vote for 2 still binds term 4"
    );
    assert_eq!(out.committed.len(), 1, "a restarted node applies up to the durable commit index");
}
