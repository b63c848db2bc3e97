//! Majority and joint-majority arithmetic, alone so it can be table-tested.
//!
//! A joint configuration (Raft §6) is two majority configurations; a decision
//! needs a majority of each. Outside a membership change the second one is
//! empty, and an empty configuration agrees with everything, so the same code
//! serves both cases.

use super::types::{Index, NodeId};
use std::collections::BTreeSet;

/// The outcome of a vote count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// Not decided yet: more votes could still make either outcome.
    Pending,
    /// A quorum rejected.
    Lost,
    /// A quorum granted.
    Won,
}

/// A set of voters deciding by simple majority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MajorityConfig {
    voters: BTreeSet<NodeId>,
}

impl MajorityConfig {
    pub fn new(voters: BTreeSet<NodeId>) -> MajorityConfig {
        MajorityConfig { voters }
    }

    pub fn voters(&self) -> &BTreeSet<NodeId> {
        &self.voters
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    /// The highest index that a majority has reached, given each voter's
    /// acknowledged index (missing voters count as 0). An empty configuration
    /// returns `Index::MAX`, so it never holds back a joint decision.
    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<Index>) -> Index {
        if self.voters.is_empty() {
            return Index::MAX;
        }
        let mut indexes: Vec<Index> = self.voters.iter().map(|&id| acked(id).unwrap_or(0)).collect();
        indexes.sort_unstable_by(|a, b| b.cmp(a));
        // With n voters sorted from highest, the (n/2)-th (0-based) index is
        // held by n/2 + 1 voters: a majority.
        indexes[self.voters.len() / 2]
    }

    /// Counts votes: `vote(id)` is `Some(true)` for granted, `Some(false)` for
    /// rejected and `None` for not yet answered.
    pub fn vote_result(&self, vote: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        if self.voters.is_empty() {
            return VoteResult::Won;
        }
        let (mut granted, mut missing) = (0, 0);
        for &id in &self.voters {
            match vote(id) {
                Some(true) => granted += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        let quorum = self.voters.len() / 2 + 1;
        if granted >= quorum {
            VoteResult::Won
        } else if granted + missing >= quorum {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

/// The voting configuration: `incoming` alone, or `incoming` and `outgoing`
/// jointly during a membership change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JointConfig {
    pub incoming: MajorityConfig,
    pub outgoing: MajorityConfig,
}

impl JointConfig {
    /// Every voter of either half.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.incoming.voters().union(self.outgoing.voters()).copied().collect()
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.incoming.contains(id) || self.outgoing.contains(id)
    }

    /// The highest index acknowledged by a quorum of both halves.
    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<Index> + Copy) -> Index {
        self.incoming.committed_index(acked).min(self.outgoing.committed_index(acked))
    }

    /// A vote needs both halves: lost if either lost, won if both won.
    pub fn vote_result(&self, vote: impl Fn(NodeId) -> Option<bool> + Copy) -> VoteResult {
        match (self.incoming.vote_result(vote), self.outgoing.vote_result(vote)) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn majority(ids: &[NodeId]) -> MajorityConfig {
        MajorityConfig::new(ids.iter().copied().collect())
    }

    #[test]
    fn committed_index_is_the_majority_median() {
        // (voters, acked indexes by voter position, expected)
        let cases: &[(&[NodeId], &[Index], Index)] = &[
            (&[1], &[5], 5),
            (&[1, 2], &[5, 3], 3),
            (&[1, 2, 3], &[5, 3, 1], 3),
            (&[1, 2, 3], &[5, 0, 0], 0),
            (&[1, 2, 3, 4], &[9, 8, 7, 6], 7),
            (&[1, 2, 3, 4, 5], &[1, 9, 2, 8, 3], 3),
        ];
        for (ids, acked, want) in cases {
            let got = majority(ids).committed_index(|id| ids.iter().position(|&x| x == id).map(|p| acked[p]));
            assert_eq!(got, *want, "voters {ids:?} acked {acked:?}");
        }
        assert_eq!(majority(&[]).committed_index(|_| None), Index::MAX);
    }

    #[test]
    fn vote_result_counts_granted_rejected_and_missing() {
        let three = majority(&[1, 2, 3]);
        let table: &[(&[Option<bool>], VoteResult)] = &[
            (&[None, None, None], VoteResult::Pending),
            (&[Some(true), None, None], VoteResult::Pending),
            (&[Some(true), Some(true), None], VoteResult::Won),
            (&[Some(true), Some(false), None], VoteResult::Pending),
            (&[Some(true), Some(false), Some(false)], VoteResult::Lost),
            (&[Some(false), Some(false), None], VoteResult::Lost),
        ];
        for (votes, want) in table {
            assert_eq!(three.vote_result(|id| votes[(id - 1) as usize]), *want, "votes {votes:?}");
        }
        assert_eq!(majority(&[]).vote_result(|_| None), VoteResult::Won);
    }

    #[test]
    fn joint_config_needs_both_halves() {
        let joint = JointConfig { incoming: majority(&[1, 2, 3]), outgoing: majority(&[3, 4, 5]) };
        // 1, 2 grant: incoming won, outgoing pending.
        let votes = |id: NodeId| match id {
            1 | 2 => Some(true),
            _ => None,
        };
        assert_eq!(joint.vote_result(votes), VoteResult::Pending);
        let votes = |id: NodeId| Some(id <= 4);
        assert_eq!(joint.vote_result(votes), VoteResult::Won);
        let votes = |id: NodeId| Some(id <= 3);
        assert_eq!(joint.vote_result(votes), VoteResult::Lost);
        let acked = |id: NodeId| Some(10 * id);
        // incoming {10,20,30} -> 20; outgoing {30,40,50} -> 40; joint -> 20.
        assert_eq!(joint.committed_index(acked), 20);
    }
}
