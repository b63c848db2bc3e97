//! Who the members are and where to reach them.
//!
//! Two views. The membership as of the applied index (voters, learners and
//! their addresses) is replicated: the apply task publishes it after every
//! membership change and snapshot install, and status, `members list` and
//! deploys follow it. The address book is local and only grows: every
//! address this member ever learned (from its command line, its store, a
//! join, or any applied change). Peer lanes and sender checks use the book,
//! so a member replaying old membership changes (a node that just joined)
//! keeps answering the current leader even before it reaches the change
//! that added that leader. Sender checks leave out every id whose removal is
//! applied: removed ids never come back (see [`Membership`]).

use crate::raft::NodeId;
pub use crate::storage::{MemberRole, Membership};
use crate::wire::Transport;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;
use tonic::transport::Channel;

/// The shared membership and address book of one member.
pub struct Members {
    me: NodeId,
    advertise: String,
    book: RwLock<BTreeMap<NodeId, String>>,
    /// Where this member dials others instead of the book's address (a
    /// local setting, never replicated: `--route`).
    routes: BTreeMap<NodeId, String>,
    current: watch::Sender<Membership>,
    channels: Mutex<BTreeMap<NodeId, (String, Channel)>>,
    transport: Transport,
}

impl Members {
    /// Starts from what the store says (`current`) plus addresses known
    /// from elsewhere (the command line); members are reached over
    /// `transport`, at `routes` where one is given instead of their address.
    pub fn new(
        me: NodeId,
        advertise: String,
        current: Membership,
        known: &BTreeMap<NodeId, String>,
        routes: BTreeMap<NodeId, String>,
        transport: Transport,
    ) -> Arc<Members> {
        let mut book = known.clone();
        book.extend(current.addresses.iter().map(|(id, a)| (*id, a.clone())));
        let (current, _) = watch::channel(current);
        let channels = Mutex::new(BTreeMap::new());
        Arc::new(Members { me, advertise, book: RwLock::new(book), routes, current, channels, transport })
    }

    /// Where this member dials member `id`: its route if it has one, else
    /// its address.
    pub fn dial_address(&self, id: NodeId) -> Option<String> {
        self.routes.get(&id).cloned().or_else(|| self.address_of(id))
    }

    /// How members are reached (and, with TLS, who this one is to them).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// This member's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Where member `id` is reached (this one included), if known.
    pub fn address_of(&self, id: NodeId) -> Option<String> {
        if id == self.me {
            return Some(self.advertise.clone());
        }
        self.book.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Whether this member would accept messages from `id`: one it has an
    /// address for, and not removed.
    pub fn knows(&self, id: NodeId) -> bool {
        !self.is_removed(id) && self.book.read().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }

    /// Whether `id` was removed from the cluster (as of the applied index):
    /// it never counts as a member again.
    pub fn is_removed(&self, id: NodeId) -> bool {
        self.current.borrow().removed.contains(&id)
    }

    /// Adds (or updates) addresses; never forgets one.
    pub(super) fn learn(&self, addresses: &BTreeMap<NodeId, String>) {
        let mut book = self.book.write().unwrap_or_else(|p| p.into_inner());
        for (&id, address) in addresses {
            if id != self.me && !address.is_empty() {
                book.insert(id, address.clone());
            }
        }
    }

    /// The membership as of the applied index.
    pub fn current(&self) -> Membership {
        self.current.borrow().clone()
    }

    /// Follows membership changes.
    pub fn subscribe(&self) -> watch::Receiver<Membership> {
        self.current.subscribe()
    }

    /// Called by the apply task once a change or a snapshot is durable.
    pub(super) fn publish(&self, membership: Membership) {
        self.learn(&membership.addresses);
        self.current.send_replace(membership);
    }

    /// A (lazily connecting) channel to member `id`, reused while its
    /// address stays the same.
    pub fn channel(&self, id: NodeId) -> Result<Channel, String> {
        let address = self.dial_address(id).ok_or_else(|| format!("no address is known for member {id}"))?;
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, channel)) = channels.get(&id)
            && *known == address
        {
            return Ok(channel.clone());
        }
        let channel = self.transport.channel(&address)?;
        channels.insert(id, (address, channel.clone()));
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_book_only_grows() {
        let addresses: BTreeMap<NodeId, String> =
            [(1, "127.0.0.1:7001".to_string()), (2, "[::1]:7002".to_string())].into();
        let routes = [(2, "proxy:2".to_string())].into();
        let members = Members::new(9, "me:9".into(), Membership::default(), &addresses, routes, Transport::Plaintext);
        let conf = crate::raft::ConfState::with_voters([2, 9]);
        members.publish(Membership { conf, addresses: [(2, "b:2".into())].into(), ..Membership::default() });
        assert_eq!(members.address_of(1).as_deref(), Some("127.0.0.1:7001"), "an older address is kept");
        assert_eq!(members.address_of(2).as_deref(), Some("b:2"), "a newer address wins");
        assert_eq!(members.address_of(9).as_deref(), Some("me:9"));
        assert_eq!(members.dial_address(2).as_deref(), Some("proxy:2"), "a route is where it is dialed");
        assert_eq!(members.dial_address(1).as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(
            members.current().list(),
            vec![(2, MemberRole::Voter, "b:2".to_string()), (9, MemberRole::Voter, String::new())]
        );
    }
}
