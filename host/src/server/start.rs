//! Starting and stopping a whole member: bind its ports, start its node,
//! and serve the peer and client APIs on one port (and metrics on another,
//! when asked), until the member stops. Each step is a function below.
//!
//! Over TLS every connection is a TLS session with a certificate of the
//! cluster's CA on both sides; a plaintext client gets no further than the
//! handshake. Plaintext is served only when the configuration says so.

use super::client_service::{ClientGate, ClientService, ProcessFigures};
use super::config::ServerConfig;
use super::health;
use super::metrics::{self, PeerCounters};
use super::peer_service::{PeerGate, PeerLimits, PeerService};
use crate::node::{Digests, Node, NodeError, ShutdownSignal};
use crate::wire::client_pb::client_server::ClientServer;
use crate::wire::pb::raft_control_server::RaftControlServer;
use crate::wire::pb::raft_peer_server::RaftPeerServer;
use crate::wire::{CONTROL_MESSAGE_BYTES_MAX, PEER_MESSAGE_BYTES_MAX, Tls, TlsError, plaintext_incoming};
use crate::wire::{client_pb, pb};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

/// HTTP/2 streams one connection may have open at once: a connection
/// shared by a pool of clients needs hundreds.
const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Bytes a connection's peer may send ahead of what the member has read.
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Streams reset by the client before the member took them, per connection.
const PENDING_RESET_STREAMS_MAX: usize = 32_768;

/// Why a member could not start, or stopped with an error.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the gRPC server task stopped unexpectedly")]
    ServerTaskLost,
    #[error("server reflection: {0}")]
    Reflection(String),
}

/// A running member: its node, served on its port. Dropping it does not
/// stop it; call [`Server::shutdown`] and then [`Server::wait`].
pub struct Server {
    node: Node,
    /// This member's certificates, when it serves TLS.
    tls: Option<Arc<Tls>>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    /// Binds the member's ports (so a port in use is refused before any
    /// data is touched), starts its node, and serves it. Must run inside a
    /// tokio runtime.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let config = Arc::new(config);
        let (listener, local_addr) = bind(config.listen).await?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let node = Node::start(config.node.clone()).await?;
        let refusals = Arc::new(PeerCounters::default());
        let clients =
            ClientService::new(config.clone(), node.handles().clone(), refusals.clone(), node.shutdown_signal());
        let cluster = config.node.cluster_id.clone();
        let limits = PeerLimits {
            snapshot_bytes_max: config.node.max_snapshot_bytes,
            stream_idle_timeout: config.node.stream_idle_timeout,
        };
        let peers = Arc::new(PeerService::new(
            cluster.clone(),
            node.handles().clone(),
            refusals.clone(),
            limits,
            node.shutdown_signal(),
        ));
        let (peer_gate, client_gate) = match config.node.transport.tls() {
            Some(_) => (PeerGate::new(cluster.clone(), node.handles().clone(), refusals), ClientGate::new(cluster)),
            None => (PeerGate::open(), ClientGate::open()),
        };
        let control = InterceptedService::new(control_server(peers.clone()), peer_gate.clone());
        let peers = InterceptedService::new(peer_server(peers), peer_gate);
        let client_api = InterceptedService::new(client_server(&config, clients.clone()), client_gate);
        let metrics_addr = metrics_listener.map(|(listener, bound)| {
            tokio::spawn(metrics::serve(listener, clients.clone(), health::STATUS_WAIT_MAX, node.shutdown_signal()));
            tracing::info!(address = %bound, "serving metrics at /metrics");
            bound
        });
        let (reporter, health) = tonic_health::server::health_reporter();
        let source = clients.clone();
        let status = move || {
            let source = source.clone();
            async move { source.status_now(Digests::Skipped, ProcessFigures::Skipped).await.ok() }
        };
        let reports = health::report(reporter, status, health::STATUS_WAIT_MAX, node.shutdown_signal());
        // Its log lines say whose health changed (`dev` runs three members).
        tokio::spawn(tracing::Instrument::instrument(reports, tracing::info_span!("health", node = node.id())));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(client_pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX)
            // While a member is paused or busy, clients whose deadlines pass
            // reset their streams, and on resuming the member reads all of it
            // before taking any stream. h2 counts such streams (20 by default)
            // and their small DATA frames (a budget of half the connection
            // window, 512 KiB by default: ~2,000 requests), and past either it
            // answers GOAWAY, failing every request on a healthy connection.
            // These settings absorb a burst of ~30,000 cancelled requests per
            // connection, with what they buffer still bounded by the window.
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_max_pending_accept_reset_streams(Some(PENDING_RESET_STREAMS_MAX))
            .add_service(peers)
            .add_service(control)
            .add_service(client_api)
            .add_service(health)
            .add_service(reflection);
        let grpc = serve_grpc(listener, &config, router, node.shutdown_signal());
        tracing::info!(node = node.id(), address = %local_addr, "serving peers and clients");
        let tls = config.node.transport.tls().cloned();
        Ok(Server { node, tls, local_addr, metrics_addr, grpc })
    }

    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until this member knows a leader (at most `limit`); whether it does.
    pub async fn wait_for_leader(&self, limit: std::time::Duration) -> bool {
        let mut leadership = self.node.handles().core.leadership();
        tokio::time::timeout(limit, leadership.wait_for(|view| view.leader.is_some())).await.is_ok_and(|r| r.is_ok())
    }

    /// Reads this member's certificate, key and CA bundle again (SIGHUP):
    /// connections made from now on, both ways, use them; open ones go on.
    /// The certificate must still name this member. `Ok(false)`: the member
    /// serves plaintext, so there is nothing to read.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|_| true),
            None => Ok(false),
        }
    }

    /// See [`Node::hand_over_leadership`].
    pub async fn hand_over_leadership(&self) {
        self.node.hand_over_leadership().await
    }

    /// Asks every task to stop: the server stops accepting, the core
    /// finishes its in-flight write, the apply task applies what it was
    /// handed.
    pub fn shutdown(&self) {
        self.node.shutdown();
    }

    /// A future that resolves when the member starts stopping, from a
    /// shutdown request or a fatal error.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        self.node.stopping()
    }

    /// Waits until the server and every task of the node have stopped; the
    /// first failure, if any (the node's before the server's).
    pub async fn wait(self) -> Result<(), ServerError> {
        let served = self.grpc.await.map_err(|_| ServerError::ServerTaskLost)?;
        self.node.wait().await?;
        served?;
        Ok(())
    }
}

/// A listener on `addr`, and the address it is bound to (the port chosen,
/// when `addr` asks for port 0).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listen_error = |source| ServerError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    Ok((listener, bound))
}

fn client_server(config: &ServerConfig, clients: Arc<ClientService>) -> ClientServer<ClientService> {
    let limit = config.client_message_bytes_max();
    // Answers may be larger than requests: a change stream's message holds
    // a page plus one change of a maximal value and previous value.
    ClientServer::from_arc(clients)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit.max(crate::wire::WATCH_MESSAGE_BYTES_MAX))
}

fn peer_server(peers: Arc<PeerService>) -> RaftPeerServer<PeerService> {
    RaftPeerServer::from_arc(peers)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
}

fn control_server(peers: Arc<PeerService>) -> RaftControlServer<PeerService> {
    RaftControlServer::from_arc(peers)
        .max_decoding_message_size(CONTROL_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(CONTROL_MESSAGE_BYTES_MAX)
}

/// Serves the peer and client APIs (and health and reflection) on one port
/// until the member stops: over TLS when the member has a certificate, else
/// in plaintext.
fn serve_grpc(
    listener: TcpListener,
    config: &ServerConfig,
    router: tonic::transport::server::Router,
    mut stop: ShutdownSignal,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    let stopped = async move { stop.wait().await };
    match config.node.transport.tls() {
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped)),
        None => tokio::spawn(router.serve_with_incoming_shutdown(plaintext_incoming(listener), stopped)),
    }
}
