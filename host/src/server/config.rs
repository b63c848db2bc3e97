//! What a member's server needs beyond its node: where it listens, where it
//! serves metrics, and how many client requests it admits at once.

use crate::node::NodeConfig;
use crate::raft::NodeId;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything one member needs to run: its node and its server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub node: NodeConfig,
    /// Where peers and clients connect.
    pub listen: SocketAddr,
    /// Where to serve Prometheus metrics over HTTP (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Client writes and reads waiting for an answer at once; past it,
    /// requests are refused as busy.
    pub max_pending_requests: usize,
}

impl ServerConfig {
    /// Defaults for member `id` of `cluster_id`, listening on `listen` (and
    /// reached there: `node.advertise` says otherwise), with its data in
    /// `data_dir`.
    pub fn new(id: NodeId, cluster_id: impl Into<String>, listen: SocketAddr, data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            node: NodeConfig::new(id, cluster_id, listen.to_string(), data_dir),
            listen,
            metrics_listen: None,
            max_pending_requests: 65_536,
        }
    }

    /// Largest gRPC message of the client API: a command or query at its
    /// limit, plus room for the other fields.
    pub(super) fn client_message_bytes_max(&self) -> usize {
        // A Batch message carries many commands (a client fills it to
        // 256 KiB, plus one item of up to that); each command is still held
        // to --max-command-bytes on its own.
        self.node.max_command_bytes.max(1 << 20) + (64 << 10)
    }
}
