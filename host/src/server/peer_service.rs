//! The server side of the peer protocol: envelopes of consensus messages,
//! snapshot streams, and deploys asking whether a module is compiled here.
//!
//! Over TLS, [`PeerGate`] lets a call through only if the connection's
//! certificate names a member of this cluster, before any of its messages is
//! decoded; every message must then come from that very member. A member
//! whose removal is applied counts no more, whatever certificate it holds
//! (see `removal_allowance` for the one exception, a removed leader's
//! hand-over).

use super::metrics::PeerCounters;
use crate::node::{NodeHandles, ShutdownSignal};
use crate::raft::{Message, MessageBody, NodeId, Term};
use crate::storage::{Staging, StagingStart, StoreError};
use crate::wire::pb::raft_control_server::RaftControl;
use crate::wire::pb::raft_peer_server::RaftPeer;
use crate::wire::pb::{
    DeliverReply, Envelope, InstallSnapshotReply, ModuleStatusReply, ModuleStatusRequest, SnapshotChunk,
};
use crate::wire::{EnvelopeError, Principal, open_envelope, snapshot_meta_from_pb};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

/// The member a call's certificate names, put on the call by [`PeerGate`].
#[derive(Clone, Copy, Debug)]
struct CertifiedMember(NodeId);

/// Lets a peer call through only when the TLS connection it came on holds
/// the certificate of another member of this cluster, not removed.
#[derive(Clone)]
pub struct PeerGate {
    /// `None`: plaintext, chosen by the operator; every call passes.
    check: Option<GateCheck>,
}

#[derive(Clone)]
struct GateCheck {
    cluster_id: String,
    node: NodeHandles,
    counters: Arc<PeerCounters>,
}

impl PeerGate {
    /// A gate for the member behind `node`, of `cluster_id`, over TLS.
    pub(super) fn new(cluster_id: String, node: NodeHandles, counters: Arc<PeerCounters>) -> PeerGate {
        PeerGate { check: Some(GateCheck { cluster_id, node, counters }) }
    }

    /// No gate: a member serving plaintext has no certificates to check.
    pub(super) fn open() -> PeerGate {
        PeerGate { check: None }
    }

    fn admit(request: &Request<()>, check: &GateCheck) -> Result<NodeId, String> {
        let (cluster_id, me) = (&check.cluster_id, check.node.members.me());
        match Principal::of_request(request)? {
            Principal::Member { cluster, id } if cluster == *cluster_id && id != me => {
                removal_allowance(&check.node, id).map_err(|e| e.to_string())?;
                Ok(id)
            }
            other => Err(format!("the certificate names {other}, not another member of cluster {cluster_id:?}")),
        }
    }
}

impl tonic::service::Interceptor for PeerGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(check) = &self.check else { return Ok(request) };
        match PeerGate::admit(&request, check) {
            Ok(id) => {
                request.extensions_mut().insert(CertifiedMember(id));
                Ok(request)
            }
            Err(why) => {
                check.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(remote = ?request.remote_addr(), why, "refused a peer call");
                Err(Status::permission_denied(format!("peer calls need a member's certificate: {why}")))
            }
        }
    }
}

/// Whether messages from `id` may count although it was removed: `Ok(None)`
/// when it was not removed; `Ok(Some(term))` when it is the leader this
/// member follows in `term`, finishing its hand-over (thesis §4.2.2: a
/// removed leader leads until its removal commits, and a follower that
/// applies the removal first still needs its last heartbeats and its
/// TimeoutNow); messages from it above that term do not count. Refused
/// otherwise, and for good once the term moves on.
fn removal_allowance(node: &NodeHandles, id: NodeId) -> Result<Option<Term>, EnvelopeError> {
    if !node.members.is_removed(id) {
        return Ok(None);
    }
    let leadership = node.core.current_leadership();
    match leadership.leader {
        Some(leader) if leader == id => Ok(Some(leadership.term)),
        _ => Err(EnvelopeError::RemovedSender(id)),
    }
}

/// The member the gate found on `request`, if it ran (over TLS).
fn certified<T>(request: &Request<T>) -> Option<NodeId> {
    request.extensions().get::<CertifiedMember>().map(|member| member.0)
}

/// Checks every envelope against this member and its cluster, then hands
/// the messages to the core task.
pub struct PeerService {
    cluster_id: String,
    me: NodeId,
    node: NodeHandles,
    counters: Arc<PeerCounters>,
    /// One snapshot is received at a time.
    receiving: tokio::sync::Mutex<()>,
    /// Turns when the member stops: delivery streams end then, so a
    /// graceful shutdown does not wait for peers to hang up.
    stopping: ShutdownSignal,
}

impl PeerService {
    /// The peer side of the node behind `node`, in cluster `cluster_id`.
    pub fn new(
        cluster_id: String,
        node: NodeHandles,
        counters: Arc<PeerCounters>,
        stopping: ShutdownSignal,
    ) -> PeerService {
        let me = node.members.me();
        PeerService { cluster_id, me, node, counters, receiving: tokio::sync::Mutex::new(()), stopping }
    }

    /// Checks who is asking, as an envelope with no messages would be, for
    /// a request of `term` (0: outside any term).
    fn check_sender(
        &self,
        (cluster_id, from, to): (String, NodeId, NodeId),
        term: Term,
        certified: Option<NodeId>,
    ) -> Result<(), Status> {
        let envelope = Envelope { cluster_id, from, to, messages: Vec::new() };
        self.open(envelope, certified)?;
        match removal_allowance(&self.node, from) {
            Ok(Some(allowed)) if term == 0 || term > allowed => Err(self.refused(EnvelopeError::RemovedSender(from))),
            _ => Ok(()),
        }
    }

    /// An envelope's messages, if it passes every check; a refusal is counted.
    fn open(&self, envelope: Envelope, certified: Option<NodeId>) -> Result<Vec<Message>, Status> {
        let from = envelope.from;
        let allowed_term = removal_allowance(&self.node, from).map_err(|e| self.refused(e))?;
        let knows = |id| self.node.members.knows(id) || (id == from && allowed_term.is_some());
        let messages =
            open_envelope(envelope, &self.cluster_id, self.me, certified, knows).map_err(|e| self.refused(e))?;
        if let Some(allowed) = allowed_term
            && messages.iter().any(|message| message.term > allowed)
        {
            return Err(self.refused(EnvelopeError::RemovedSender(from)));
        }
        Ok(messages)
    }

    fn refused(&self, error: EnvelopeError) -> Status {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        refusal(error)
    }

    /// Checks one envelope and hands its messages to the core.
    async fn deliver_envelope(
        &self,
        envelope: Envelope,
        certified: Option<NodeId>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        let messages = self.open(envelope, certified).inspect_err(|status| {
            tracing::warn!(remote = ?peer, error = %status.message(), "refused a peer envelope");
        })?;
        self.node.core.deliver(messages).await.map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Receives, verifies and stages a snapshot stream; returns the message
    /// that hands it to the core.
    async fn receive_snapshot(
        &self,
        mut stream: Streaming<SnapshotChunk>,
        certified: Option<NodeId>,
    ) -> Result<Message, Status> {
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_sender((first.cluster_id.clone(), first.from, first.to), first.term, certified)?;
        let (from, term) = (first.from, first.term);
        let meta = first.meta.clone().map(snapshot_meta_from_pb).ok_or_else(|| {
            Status::invalid_argument("the first snapshot chunk must carry the snapshot's index, term and membership")
        })?;
        let started = Instant::now();
        let store = self.node.store.clone();
        let header = meta.clone();
        let mut staging = match blocking(move || store.begin_staging(header)).await? {
            StagingStart::Fresh(staging) => staging,
            StagingStart::AlreadyStaged(meta) => {
                // A retry of a snapshot waiting for its install: hand it over
                // again without receiving (and so without disturbing) it.
                return Ok(Message { from, to: self.me, term, body: MessageBody::InstallSnapshot { snapshot: meta } });
            }
        };
        let mut digest = Sha256::new();
        let mut expected_offset = 0u64;
        let mut chunk = first;
        loop {
            if chunk.from != from || chunk.term != term {
                return Err(Status::invalid_argument("a snapshot stream changed sender or term midway"));
            }
            if chunk.offset != expected_offset {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk at offset {} where {expected_offset} was expected",
                    chunk.offset
                )));
            }
            if crc32fast::hash(&chunk.data) != chunk.checksum {
                return Err(Status::data_loss(format!("snapshot chunk at offset {} fails its checksum", chunk.offset)));
            }
            digest.update(&chunk.data);
            expected_offset += chunk.data.len() as u64;
            self.node.snapshots.receiving_bytes.store(expected_offset, Ordering::Relaxed);
            let last = chunk.last;
            let (data, received_digest) = (chunk.data, chunk.digest);
            staging = blocking(move || staging.write_chunk(&data).map(|()| staging)).await?;
            if last {
                if digest.finalize().as_slice() != received_digest.as_slice() {
                    return Err(Status::data_loss("the snapshot's SHA-256 does not match its data"));
                }
                break;
            }
            chunk = stream
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("the snapshot stream ended before its last chunk"))?;
        }
        let meta = blocking(move || Staging::finish(staging)).await?;
        self.node.snapshots.received.fetch_add(1, Ordering::Relaxed);
        self.node.snapshots.received_bytes.fetch_add(expected_offset, Ordering::Relaxed);
        tracing::info!(
            from,
            index = meta.index,
            term = meta.term,
            bytes = expected_offset,
            seconds = started.elapsed().as_secs_f64(),
            "snapshot received and staged"
        );
        Ok(Message { from, to: self.me, term, body: MessageBody::InstallSnapshot { snapshot: meta } })
    }
}

impl PeerService {
    /// Delivers each envelope of a lane's stream, in order, until the stream
    /// ends, an envelope is refused, or the member stops.
    async fn deliver_each(&self, request: Request<Streaming<Envelope>>) -> Result<Response<DeliverReply>, Status> {
        let (peer, certified) = (request.remote_addr(), certified(&request));
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let envelope = tokio::select! {
                _ = stopping.wait() => break,
                envelope = stream.message() => envelope?,
            };
            let Some(envelope) = envelope else { break };
            self.deliver_envelope(envelope, certified, peer).await?;
        }
        Ok(Response::new(DeliverReply {}))
    }
}

#[tonic::async_trait]
impl RaftControl for PeerService {
    async fn deliver_stream(&self, request: Request<Streaming<Envelope>>) -> Result<Response<DeliverReply>, Status> {
        self.deliver_each(request).await
    }
}

/// Runs a store call on a blocking thread; its failure is this member's.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Status::internal(error.to_string())),
        Err(_) => Err(Status::internal("a storage thread was lost")),
    }
}

fn refusal(error: EnvelopeError) -> Status {
    match error {
        EnvelopeError::WrongCluster { .. }
        | EnvelopeError::UnknownSender(_)
        | EnvelopeError::RemovedSender(_)
        | EnvelopeError::NotTheCertificateHolder { .. } => Status::permission_denied(error.to_string()),
        _ => Status::invalid_argument(error.to_string()),
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn deliver(&self, request: Request<Envelope>) -> Result<Response<DeliverReply>, Status> {
        let (peer, certified) = (request.remote_addr(), certified(&request));
        self.deliver_envelope(request.into_inner(), certified, peer).await?;
        Ok(Response::new(DeliverReply {}))
    }

    async fn deliver_stream(&self, request: Request<Streaming<Envelope>>) -> Result<Response<DeliverReply>, Status> {
        self.deliver_each(request).await
    }

    async fn module_status(
        &self,
        request: Request<ModuleStatusRequest>,
    ) -> Result<Response<ModuleStatusReply>, Status> {
        let certified = certified(&request);
        let request = request.into_inner();
        self.check_sender((request.cluster_id, request.from, request.to), 0, certified)?;
        let hash: [u8; 32] =
            request.hash.as_slice().try_into().map_err(|_| Status::invalid_argument("a module hash is 32 bytes"))?;
        let (state, error) = self.node.modules.status(&hash).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ModuleStatusReply { state: state as i32, error }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<InstallSnapshotReply>, Status> {
        let Ok(_receiving) = self.receiving.try_lock() else {
            return Err(Status::unavailable("another snapshot is being received; retry"));
        };
        let (remote, certified) = (request.remote_addr(), certified(&request));
        let received = self.receive_snapshot(request.into_inner(), certified).await;
        self.node.snapshots.receiving_bytes.store(0, Ordering::Relaxed);
        let message = received.inspect_err(|status| {
            self.node.snapshots.receive_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(remote = ?remote, error = %status.message(), "refused a snapshot stream");
        })?;
        self.node.core.deliver(vec![message]).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(InstallSnapshotReply { accepted: true }))
    }
}
