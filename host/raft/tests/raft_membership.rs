//! The core's snapshot, membership, leader transfer and maintenance rules,
//! each checked on a small in-memory cluster driven by hand. (The simulator
//! runs the same operations under faults; these pin down each rule.)

use bytes::Bytes;
use raft_core::{
    ConfChange, ConfChangeEntry, ConfChangeKind, ConfState, Config, Entry, EntryKind, Index, LogStore, MemLogStore,
    Message, MessageBody, NodeId, ProposeError, Raft, Role,
};
use std::collections::{BTreeMap, BTreeSet};

/// Nodes 1..=voters start as the configuration; the others start empty,
/// waiting to be added.
struct Cluster {
    nodes: BTreeMap<NodeId, Raft<MemLogStore>>,
    isolated: BTreeSet<NodeId>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    snapshots_installed: BTreeMap<NodeId, u64>,
    sent: Vec<Message>,
    /// Snapshot streams fail (the rest of the traffic flows).
    drop_snapshots: bool,
    /// Their acknowledgements of appends are lost, rejections and heartbeat
    /// replies are not:
    /// the shape of a follower still installing a delivered snapshot, whose
    /// acknowledgement waits for the install while it answers heartbeats.
    acks_lost_from: BTreeSet<NodeId>,
}

impl Cluster {
    fn new(voters: u64, total: u64) -> Cluster {
        let conf = ConfState::with_voters(1..=voters);
        let nodes = (1..=total)
            .map(|id| {
                let mut config = Config::new(id);
                config.pre_vote = true;
                config.check_quorum = true;
                let store =
                    MemLogStore::new_with_conf_state(if id <= voters { conf.clone() } else { ConfState::default() });
                (id, Raft::new(config, store).expect("starts"))
            })
            .collect();
        Cluster {
            nodes,
            isolated: BTreeSet::new(),
            applied: BTreeMap::new(),
            snapshots_installed: BTreeMap::new(),
            sent: Vec::new(),
            drop_snapshots: false,
            acks_lost_from: BTreeSet::new(),
        }
    }

    fn node(&mut self, id: NodeId) -> &mut Raft<MemLogStore> {
        self.nodes.get_mut(&id).expect("known node")
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes.values().filter(|r| r.role() == Role::Leader).max_by_key(|r| r.term()).map(|r| r.id())
    }

    /// Persists, applies and advances one Ready of node `id`, as a driver
    /// would; the messages it sends.
    fn handle_ready(&mut self, id: NodeId) -> Vec<Message> {
        let raft = self.nodes.get_mut(&id).expect("known node");
        let ready = raft.ready().expect("ready");
        if let Some(snapshot) = ready.snapshot {
            raft.store_mut().install_snapshot(snapshot);
            *self.snapshots_installed.entry(id).or_default() += 1;
        }
        raft.store_mut().append(&ready.entries);
        if let Some(hs) = ready.hard_state {
            raft.store_mut().set_hard_state(hs);
        }
        for entry in &ready.committed_entries {
            if entry.kind == EntryKind::ConfChange {
                let change = ConfChangeEntry::decode(&entry.data).expect("decodes");
                raft.store_mut().set_conf_state(change.conf);
            }
        }
        self.applied.entry(id).or_default().extend(ready.committed_entries);
        raft.advance().expect("advance");
        ready.messages.into_iter().chain(ready.persisted_messages).collect()
    }

    /// Handles every Ready and delivers every message until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut queue = Vec::new();
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                while self.node(id).has_ready() {
                    queue.extend(self.handle_ready(id));
                }
            }
            if queue.is_empty() {
                return;
            }
            for m in queue {
                self.sent.push(m.clone());
                let lost = self.isolated.contains(&m.from)
                    || self.isolated.contains(&m.to)
                    || (self.acks_lost_from.contains(&m.from)
                        && matches!(m.body, MessageBody::AppendEntriesResponse { success: true, .. }));
                if let MessageBody::InstallSnapshot { .. } = m.body {
                    // The driver streams the data, then reports the outcome.
                    let (from, to) = (m.from, m.to);
                    let dropped = lost || self.drop_snapshots;
                    if !dropped {
                        self.node(to).step(m).expect("step");
                    }
                    self.node(from).report_snapshot(to).expect("report");
                    continue;
                }
                if !lost {
                    self.node(m.to).step(m).expect("step");
                }
            }
        }
        panic!("cluster never settled");
    }

    fn elect(&mut self, id: NodeId) {
        self.node(id).campaign().expect("campaign");
        self.settle();
        assert_eq!(self.leader(), Some(id));
    }

    fn tick_all(&mut self, n: u32) {
        for _ in 0..n {
            for raft in self.nodes.values_mut() {
                raft.tick().expect("tick");
            }
            self.settle();
        }
    }

    fn write(&mut self, text: &str) -> Result<u64, ProposeError> {
        let leader = self.leader().expect("a leader");
        let proposed = self.node(leader).propose(vec![Bytes::from(text.to_string())])?;
        self.settle();
        Ok(proposed.last_index)
    }

    fn change(&mut self, kind: ConfChangeKind, node: NodeId) -> Result<u64, ProposeError> {
        let leader = self.leader().expect("a leader");
        let proposed = self.node(leader).propose_conf_change(ConfChange { kind, node, context: Bytes::new() })?;
        self.settle();
        Ok(proposed.last_index)
    }

    /// A three-member cluster led by 1 whose member 3 missed `writes` while
    /// cut off, and whose leader compacted them away: 3 can catch up only
    /// by snapshot. Returns the leader's compacted (applied) index.
    fn with_member_3_behind_a_compacted_log(writes: &[&str]) -> (Cluster, Index) {
        let mut c = Cluster::new(3, 3);
        c.elect(1);
        c.isolated.insert(3);
        for write in writes {
            c.write(write).expect("written");
        }
        let applied = c.node(1).log().applied();
        let conf = c.node(1).conf_state();
        c.node(1).store_mut().compact(applied, conf);
        c.isolated.clear();
        (c, applied)
    }

    /// InstallSnapshot messages sent so far.
    fn snapshots_sent(&self) -> usize {
        self.sent.iter().filter(|m| matches!(m.body, MessageBody::InstallSnapshot { .. })).count()
    }

    fn payloads(&self, id: NodeId) -> Vec<Bytes> {
        self.applied
            .get(&id)
            .map(|entries| {
                entries.iter().filter(|e| e.kind == EntryKind::Normal && !e.is_noop()).map(|e| e.data.clone()).collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn a_lagging_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let (mut c, applied) = Cluster::with_member_3_behind_a_compacted_log(&["w0", "w1", "w2", "w3", "w4"]);
    assert_eq!(c.node(1).log().first_index().expect("first"), applied + 1);
    c.write("after").expect("written");
    c.tick_all(2);
    assert_eq!(c.snapshots_installed.get(&3), Some(&1), "node 3 installed exactly one snapshot");
    let leader_commit = c.node(1).log().committed();
    assert_eq!(c.node(3).log().committed(), leader_commit);
    assert_eq!(c.node(3).log().store().snapshot_meta().expect("meta").index, applied);
    // Node 3 applied only what came after the snapshot.
    assert_eq!(c.payloads(3), vec![Bytes::from("after")]);
}

#[test]
fn a_failed_snapshot_is_sent_again() {
    let (mut c, _) = Cluster::with_member_3_behind_a_compacted_log(&["w"]);
    c.drop_snapshots = true;
    c.tick_all(3);
    let attempts = c.snapshots_sent();
    // One attempt per heartbeat reply at most: a failing stream is retried,
    // not hammered.
    assert!((1..=4).contains(&attempts), "{attempts} attempts in 3 ticks");
    assert_eq!(c.snapshots_installed.get(&3), None);
    c.drop_snapshots = false;
    c.tick_all(2);
    assert_eq!(c.snapshots_installed.get(&3), Some(&1));
    assert_eq!(c.node(3).log().committed(), c.node(1).log().committed());
}

#[test]
fn a_delivered_snapshot_is_not_followed_by_another_while_it_is_installed() {
    let (mut c, applied) = Cluster::with_member_3_behind_a_compacted_log(&["w"]);
    c.acks_lost_from.insert(3);
    c.tick_all(6);
    // Heartbeat replies come and go meanwhile; each one lets the leader
    // probe again, from past the snapshot (not from where the follower was
    // before it, which is compacted and would mean another snapshot).
    assert_eq!(c.snapshots_sent(), 1, "one snapshot while the first is being installed");
    let probe_after_snapshot = c.sent.iter().any(|m| {
        m.to == 3 && matches!(m.body, MessageBody::AppendEntries { prev_log_index, .. } if prev_log_index == applied)
    });
    assert!(probe_after_snapshot, "probed from the snapshot's index");
    c.acks_lost_from.clear();
    c.write("after").expect("written");
    c.tick_all(2);
    assert_eq!(c.snapshots_sent(), 1);
    assert_eq!(c.snapshots_installed.get(&3), Some(&1));
    assert_eq!(c.node(3).log().committed(), c.node(1).log().committed());
}

#[test]
fn a_learner_catches_up_without_voting_then_is_promoted() {
    let mut c = Cluster::new(3, 4);
    c.elect(1);
    c.write("before").expect("written");
    c.change(ConfChangeKind::AddLearner, 4).expect("learner added");
    assert_eq!(c.node(1).conf_state().learners, [4].into());
    // The learner replays the whole log, so it holds what came before it.
    assert_eq!(c.payloads(4), vec![Bytes::from("before")]);
    assert_eq!(c.node(4).conf_state().learners, [4].into(), "the learner learned the configuration from the log");
    // A learner never campaigns.
    for _ in 0..40 {
        c.node(4).tick().expect("tick");
    }
    assert_eq!(c.node(4).role(), Role::Follower);
    // Commits need no learner: with 2 and 3 down, nothing commits even though
    // the learner acknowledges.
    c.isolated.extend([2, 3]);
    let last = c.node(1).log().committed();
    c.node(1).propose(vec![Bytes::from("stuck")]).expect("proposed");
    c.settle();
    assert_eq!(c.node(1).log().committed(), last, "a learner does not count towards a quorum");
    c.isolated.clear();
    c.tick_all(1);
    c.change(ConfChangeKind::Promote, 4).expect("promoted");
    assert_eq!(c.node(4).voters(), [1, 2, 3, 4].into());
    // Now 4 counts: with 2 down, 1, 3 and 4 are a quorum of four.
    c.isolated.insert(2);
    let index = c.write("with four").expect("written");
    assert!(c.node(4).log().committed() >= index);
}

#[test]
fn one_membership_change_at_a_time_and_only_valid_ones() {
    // A new leader proposes no change before it commits an entry of its term.
    let mut single = Cluster::new(1, 2);
    single.node(1).campaign().expect("campaign");
    single.handle_ready(1);
    assert_eq!(single.node(1).role(), Role::Leader);
    let early = single.node(1).propose_conf_change(ConfChange {
        kind: ConfChangeKind::AddLearner,
        node: 2,
        context: Bytes::new(),
    });
    assert!(matches!(early, Err(ProposeError::ConfChangePending(_))), "{early:?}");
    single.settle();
    single.change(ConfChangeKind::AddLearner, 2).expect("allowed after the no-op commits");

    let mut c = Cluster::new(3, 5);
    c.elect(1);
    let invalid = |r: Result<u64, ProposeError>| matches!(r, Err(ProposeError::InvalidConfChange(_)));
    assert!(invalid(c.change(ConfChangeKind::Promote, 4)), "4 is not a learner");
    assert!(invalid(c.change(ConfChangeKind::Remove, 5)), "5 is not a member");
    assert!(invalid(c.change(ConfChangeKind::AddLearner, 2)), "2 is already a member");
    // With the learner unreachable nothing stops the change committing, but
    // a second change before the first is applied is refused.
    c.isolated.extend([2, 3]);
    let leader = c.node(1);
    leader
        .propose_conf_change(ConfChange { kind: ConfChangeKind::AddLearner, node: 4, context: Bytes::new() })
        .expect("first change proposed");
    let second =
        leader.propose_conf_change(ConfChange { kind: ConfChangeKind::AddLearner, node: 5, context: Bytes::new() });
    assert!(matches!(second, Err(ProposeError::ConfChangePending(_))), "{second:?}");
    c.isolated.clear();
    c.tick_all(1);
    c.change(ConfChangeKind::AddLearner, 5).expect("allowed once the first is applied");
    assert_eq!(c.node(1).conf_state().learners, [4, 5].into());
    // The context travels with the change, for the driver's address book.
    let entry = c.applied[&2].iter().rev().find(|e| e.kind == EntryKind::ConfChange).expect("a change").clone();
    let decoded = ConfChangeEntry::decode(&entry.data).expect("decodes");
    assert_eq!(decoded.change.node, 5);
    assert_eq!(decoded.conf.learners, [4, 5].into());
    assert!(ConfChangeEntry::decode(&entry.data[..5]).is_err(), "a truncated change is an error, not a panic");
}

#[test]
fn a_removed_leader_steps_down_once_the_others_hold_its_log() {
    let mut c = Cluster::new(3, 3);
    c.elect(1);
    c.write("w").expect("written");
    c.change(ConfChangeKind::Remove, 1).expect("removal proposed");
    assert_ne!(c.node(1).role(), Role::Leader, "the removed leader stepped down");
    assert_eq!(c.node(2).voters(), [2, 3].into());
    // It handed over with TimeoutNow: a new leader without waiting a timeout.
    let new_leader = c.leader().expect("a new leader at once");
    assert!(new_leader == 2 || new_leader == 3);
    c.write("after").expect("the remaining pair commits");
    // The removed node never campaigns again.
    for _ in 0..40 {
        c.node(1).tick().expect("tick");
    }
    assert_ne!(c.node(1).role(), Role::Candidate);
}

#[test]
fn leadership_moves_to_a_caught_up_target_and_proposals_wait_meanwhile() {
    let mut c = Cluster::new(3, 3);
    c.elect(1);
    c.isolated.insert(3);
    c.write("w1").expect("written");
    c.write("w2").expect("written");
    c.node(1).transfer_leader(3).expect("transfer starts");
    assert!(matches!(c.node(1).propose(vec![Bytes::from("x")]), Err(ProposeError::Transferring { to: 3 })));
    c.isolated.clear();
    c.settle();
    // 3 catches up first, then gets TimeoutNow and wins at once.
    assert_eq!(c.leader(), Some(3));
    assert!(c.sent.iter().any(|m| m.to == 3 && m.body == MessageBody::TimeoutNow));
    c.write("w3").expect("the new leader takes writes");
    assert_eq!(c.payloads(1), c.payloads(3));
}

#[test]
fn a_transfer_to_an_unreachable_member_is_abandoned_after_an_election_timeout() {
    let mut c = Cluster::new(3, 3);
    c.elect(1);
    c.isolated.insert(3);
    c.write("w").expect("written");
    c.node(1).transfer_leader(3).expect("transfer starts");
    assert!(matches!(c.node(1).transfer_leader(9), Err(ProposeError::InvalidTransfer(_))));
    c.tick_all(10);
    assert_eq!(c.leader(), Some(1));
    assert_eq!(c.node(1).lead_transferee(), None);
    c.write("again").expect("proposals are accepted again");
}

#[test]
fn an_offline_member_neither_votes_nor_campaigns_and_a_leader_hands_over_first() {
    let mut c = Cluster::new(3, 3);
    c.elect(1);
    c.write("w").expect("written");
    c.node(1).set_offline(true).expect("offline");
    c.settle();
    assert!(c.node(1).is_offline());
    let leader = c.leader().expect("leadership was handed over");
    assert_ne!(leader, 1);
    // Offline, node 1 still follows the log...
    let index = c.write("while offline").expect("written");
    assert!(c.node(1).log().committed() >= index);
    // ...but never campaigns, and refuses its vote.
    for _ in 0..40 {
        c.node(1).tick().expect("tick");
    }
    assert_eq!(c.node(1).role(), Role::Follower);
    let other = if leader == 2 { 3 } else { 2 };
    c.isolated.insert(leader);
    c.node(other).campaign().expect("campaign");
    c.settle();
    assert_ne!(c.node(other).role(), Role::Leader, "without node 1's vote there is no majority of three");
    c.isolated.clear();
    c.node(1).set_offline(false).expect("online");
    c.tick_all(30);
    assert!(c.leader().is_some());
}

#[test]
fn a_commit_hint_commits_only_a_matching_prefix_and_comes_with_a_refused_vote() {
    let mut store = MemLogStore::new_with_conf_state(ConfState::with_voters([1, 2]));
    let entries: Vec<Entry> = (1..=5)
        .map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: Bytes::from_static(b"x") })
        .collect();
    store.append(&entries);
    let mut node = Raft::new(Config::new(1), store).expect("starts");
    let hint = |commit, term| Message { from: 2, to: 1, term: 0, body: MessageBody::CommitHint { commit, term } };
    node.step(hint(4, 2)).expect("step");
    assert_eq!(node.log().committed(), 0, "another term at that index: another prefix");
    node.step(hint(9, 1)).expect("step");
    assert_eq!(node.log().committed(), 0, "beyond our log");
    node.step(hint(4, 1)).expect("step");
    assert_eq!(node.log().committed(), 4, "the same entry there means the same prefix");
    node.step(hint(2, 1)).expect("step");
    assert_eq!(node.log().committed(), 4, "the commit index never moves back");
    // A refused vote carries the refuser's commit index.
    let request = Message {
        from: 2,
        to: 1,
        term: 1,
        body: MessageBody::RequestVote { pre_vote: false, last_log_index: 1, last_log_term: 1, transfer: false },
    };
    node.step(request).expect("step");
    let ready = node.ready().expect("ready");
    let sent: Vec<&MessageBody> = ready.persisted_messages.iter().chain(&ready.messages).map(|m| &m.body).collect();
    assert!(sent.contains(&&MessageBody::RequestVoteResponse { pre_vote: false, granted: false }), "{sent:?}");
    assert!(sent.contains(&&MessageBody::CommitHint { commit: 4, term: 1 }), "{sent:?}");
}

#[test]
fn a_node_does_not_campaign_while_a_committed_change_waits_to_be_applied() {
    // Voters {1, 2, 3}; entry 2 removes 3 and is committed, but node 1 has
    // applied only entry 1 (it was behind, or a crash took it back there).
    // Counting votes in {1, 2, 3}, it and a lagging 3 could elect it while
    // {1, 2} commits without them; so it waits until it has applied entry 2.
    let change = ConfChangeEntry {
        change: ConfChange { kind: ConfChangeKind::Remove, node: 3, context: Bytes::new() },
        conf: ConfState::with_voters([1, 2]),
    };
    let mut store = MemLogStore::new_with_conf_state(ConfState::with_voters([1, 2, 3]));
    store.append(&[
        Entry { term: 1, index: 1, kind: EntryKind::Normal, data: Bytes::new() },
        Entry { term: 1, index: 2, kind: EntryKind::ConfChange, data: change.encode() },
    ]);
    store.set_hard_state(raft_core::HardState { term: 1, vote: None, commit: 2 });
    let mut config = Config::new(1);
    config.pre_vote = false;
    config.applied = 1;
    let mut raft = Raft::new(config, store).expect("starts");
    raft.campaign().expect("campaign");
    assert_eq!(raft.role(), Role::Follower, "entry 2 is committed but not applied");
    let ready = raft.ready().expect("ready");
    assert!(ready.messages.is_empty() && ready.persisted_messages.is_empty(), "no vote requests");
    assert_eq!(ready.committed_entries.last().map(|e| e.index), Some(2));
    raft.advance().expect("advance");
    assert_eq!(raft.voters(), [1, 2].into());
    raft.campaign().expect("campaign");
    assert_eq!(raft.role(), Role::Candidate, "applied: it may campaign in {{1, 2}}");
}
