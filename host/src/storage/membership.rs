//! The replicated membership as the store keeps it: the configuration, the
//! members' addresses, and every id ever removed.
//!
//! Removed ids are kept for the cluster's whole life and never count as
//! members again: once its removal is applied, a member's certificate (which
//! names its id) speaks for nobody, and a member that comes back from a
//! wiped disk joins under a new id. Keeping them forever is what makes that
//! safe for a member replaying an old stretch of the log: an id it sees
//! removed there is removed in every later state too.

use crate::raft::{ConfState, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// The membership as of the applied index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub conf: ConfState,
    pub addresses: BTreeMap<NodeId, String>,
    /// Every id removed from the cluster so far.
    pub removed: BTreeSet<NodeId>,
}

/// A member's role in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    Voter,
    Learner,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        }
    }
}

impl Membership {
    /// Every member with its role and address, in id order.
    pub fn list(&self) -> Vec<(NodeId, MemberRole, String)> {
        let role = |id: &NodeId| if self.conf.learners.contains(id) { MemberRole::Learner } else { MemberRole::Voter };
        self.conf
            .members()
            .into_iter()
            .map(|id| (id, role(&id), self.addresses.get(&id).cloned().unwrap_or_default()))
            .collect()
    }

    /// The membership after a change to `conf` that carries `addresses`:
    /// the change's book wins, members it does not name keep the address
    /// known here, and whoever leaves the configuration is removed for good.
    pub fn changed(&self, conf: ConfState, addresses: BTreeMap<NodeId, String>) -> Membership {
        let members = conf.members();
        let mut book = self.addresses.clone();
        book.extend(addresses);
        book.retain(|id, _| members.contains(id));
        let mut removed = self.removed.clone();
        removed.extend(self.conf.members().into_iter().filter(|id| !members.contains(id)));
        // Deterministic on every replica even if a change re-adds an id
        // (the API refuses that; an entry from elsewhere must not diverge).
        removed.retain(|id| !members.contains(id));
        Membership { conf, addresses: book, removed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whoever_leaves_the_configuration_is_removed_for_good() {
        let start = Membership {
            conf: ConfState::with_voters([1, 2, 3]),
            addresses: [(1, "a".into()), (2, "b".into()), (3, "c".into())].into(),
            removed: BTreeSet::new(),
        };
        let mut grown = ConfState::with_voters([1, 2, 3]);
        grown.learners.insert(4);
        let grown = start.changed(grown, [(4, "d".into()), (1, "a2".into())].into());
        assert!(grown.removed.is_empty());
        assert_eq!(grown.addresses.get(&1).map(String::as_str), Some("a2"), "the change's book wins");
        assert_eq!(grown.addresses.get(&2).map(String::as_str), Some("b"), "others keep the known address");
        let mut shrunk_conf = ConfState::with_voters([1, 3]);
        shrunk_conf.learners.insert(4);
        let shrunk = grown.changed(shrunk_conf, BTreeMap::new());
        assert_eq!(shrunk.removed, [2].into());
        assert!(!shrunk.addresses.contains_key(&2));
        let shrunk = shrunk.changed(ConfState::with_voters([1, 3]), BTreeMap::new());
        assert_eq!(shrunk.removed, [2, 4].into(), "removals accumulate");
    }
}
