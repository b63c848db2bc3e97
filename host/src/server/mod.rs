//! The server: a member on the network. It binds the member's port, starts
//! its node and serves two gRPC APIs on that one port: the peer protocol
//! (`proto/raft.proto`, [`PeerService`]) and the public client API
//! (`proto/client.proto`, [`ClientService`]); and, when asked, Prometheus
//! metrics over HTTP on a port of their own.
//!
//! It is the top layer of the library: it reaches the node only through the
//! node's handles (`crate::node::NodeHandles`), and nothing below imports
//! it.

mod client_service;
mod config;
pub mod health;
mod metrics;
mod peer_service;
mod start;

pub use self::client_service::{CLIENT_ID_MAX_BYTES, ClientGate, ClientService};
pub use self::config::ServerConfig;
pub use self::peer_service::{PeerGate, PeerLimits, PeerService};
pub use self::start::{Server, ServerError};
