//! How members reach each other, and the names both sides of the client API
//! agree on: the channel settings every connection between members uses, the
//! largest message either side accepts, and the gRPC metadata keys.

use super::pb::raft_control_client::RaftControlClient;
use super::pb::raft_peer_client::RaftPeerClient;
use super::tls::Tls;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Largest peer message (an envelope, a snapshot chunk) either side accepts.
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Largest envelope of the control lane (`RaftControl`): thousands of votes,
/// heartbeats and acknowledgements fit in a fraction of it.
pub const CONTROL_MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Metadata key naming the leader's id on a "not the leader" error.
pub const LEADER_ID_KEY: &str = "raft-leader-id";
/// Metadata key naming the leader's address on a "not the leader" error, and
/// on an answer a follower forwarded, so the client goes straight there next.
pub const LEADER_ADDR_KEY: &str = "raft-leader-addr";
/// The id a request is logged under on every member it crosses.
pub const REQUEST_ID_KEY: &str = "raft-request-id";
/// Set on a refusal that retrying as is cannot change (a quota), where its
/// code alone (RESOURCE_EXHAUSTED) would read as "busy, retry".
pub const NO_RETRY_KEY: &str = "raft-no-retry";
/// On a watch refused as compacted: the member's change history holds
/// changes only at indexes above this one.
pub const HISTORY_FLOOR_KEY: &str = "raft-history-floor";
/// Largest message of a change stream: a page of changes plus one change
/// of a maximal value and previous value.
pub const WATCH_MESSAGE_BYTES_MAX: usize = 12 << 20;
/// Set on a request a member forwarded to the leader; such a request is never
/// forwarded again, so a stale view of leadership cannot loop.
pub const FORWARDED_KEY: &str = "raft-forwarded";

/// How this party reaches members: over TLS with its certificate, or in
/// plaintext, which only an operator's explicit choice allows.
#[derive(Clone, Debug)]
pub enum Transport {
    Plaintext,
    Tls(Arc<Tls>),
}

impl Transport {
    /// A lazily connecting channel to the member at `address` (host:port),
    /// with the settings every connection between members uses.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("invalid peer address {address:?}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(self.connect(endpoint))
    }

    /// A lazily connecting channel on `endpoint` (an `http://host:port` one),
    /// over TLS when this transport is.
    pub fn connect(&self, endpoint: Endpoint) -> Channel {
        match self {
            Transport::Plaintext => endpoint.connect_lazy(),
            Transport::Tls(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
        }
    }

    /// The TLS material, if this transport uses TLS.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        match self {
            Transport::Plaintext => None,
            Transport::Tls(tls) => Some(tls),
        }
    }
}

/// A peer protocol client on `channel`, with the peer message limits.
pub fn peer_client(channel: Channel) -> RaftPeerClient<Channel> {
    RaftPeerClient::new(channel)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
}

/// A control lane client on `channel`, with the control lane's limits.
pub fn control_client(channel: Channel) -> RaftControlClient<Channel> {
    RaftControlClient::new(channel)
        .max_encoding_message_size(CONTROL_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(CONTROL_MESSAGE_BYTES_MAX)
}
