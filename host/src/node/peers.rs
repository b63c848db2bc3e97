//! Outgoing consensus traffic: two lanes per peer.
//!
//! The control lane carries everything small (votes, heartbeats and their
//! answers, acknowledgements, read rounds); the data lane carries appends
//! with entries. Each lane is a task with a bounded queue that sends what
//! has gathered as one envelope per call, so it batches under load and
//! stays one call per message when idle. A full queue drops messages rather
//! than grow: Raft resends what matters (the leader probes, heartbeats
//! repeat, candidates ask again). A failing peer is retried with backoff on
//! a lazily reconnecting channel.

use crate::raft::{Message, MessageBody, NodeId};
use crate::rpc::pb::raft_peer_client::RaftPeerClient;
use crate::rpc::{MESSAGES_PER_ENVELOPE_MAX, seal_envelope};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// Messages queued per lane before new ones are dropped.
const LANE_CAPACITY: usize = 1024;
/// Entry bytes per envelope (one call); a single larger message still goes.
const ENVELOPE_BYTES_MAX: u64 = 16 << 20;
/// Largest envelope either side accepts.
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Lanes {
    control: mpsc::Sender<Message>,
    data: mpsc::Sender<Message>,
}

/// The sending side of every peer's lanes.
pub struct Peers {
    lanes: BTreeMap<NodeId, Lanes>,
}

impl Peers {
    /// Starts the lanes to every peer in `addresses` (id -> host:port).
    pub fn start(
        cluster_id: &str,
        me: NodeId,
        addresses: &BTreeMap<NodeId, String>,
        call_timeout: Duration,
    ) -> Result<Peers, String> {
        let cluster_id: Arc<str> = Arc::from(cluster_id);
        let mut lanes = BTreeMap::new();
        for (&id, address) in addresses {
            let channel = peer_channel(address)?;
            let mut peer_lanes = Vec::new();
            for lane in ["control", "data"] {
                let (tx, rx) = mpsc::channel(LANE_CAPACITY);
                let client = RaftPeerClient::new(channel.clone())
                    .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
                    .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX);
                let sender = LaneSender { cluster_id: cluster_id.clone(), me, peer: id, lane, client, call_timeout };
                tokio::spawn(sender.run(rx));
                peer_lanes.push(tx);
            }
            let data = peer_lanes.pop().expect("two lanes");
            let control = peer_lanes.pop().expect("two lanes");
            lanes.insert(id, Lanes { control, data });
        }
        Ok(Peers { lanes })
    }

    /// Queues messages for their peers; drops what does not fit.
    pub fn send(&self, messages: Vec<Message>) {
        for message in messages {
            let Some(lanes) = self.lanes.get(&message.to) else {
                tracing::debug!(to = message.to, "no lane to an unknown member; message dropped");
                continue;
            };
            let lane = match &message.body {
                MessageBody::AppendEntries { entries, .. } if !entries.is_empty() => &lanes.data,
                _ => &lanes.control,
            };
            if let Err(mpsc::error::TrySendError::Full(message)) = lane.try_send(message) {
                tracing::debug!(to = message.to, kind = message.body.name(), "peer lane full; message dropped");
            }
        }
    }
}

/// A lazily connecting channel to `address` (host:port).
pub fn peer_channel(address: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("invalid peer address {address:?}: {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(endpoint.connect_lazy())
}

struct LaneSender {
    cluster_id: Arc<str>,
    me: NodeId,
    peer: NodeId,
    lane: &'static str,
    client: RaftPeerClient<Channel>,
    call_timeout: Duration,
}

impl LaneSender {
    async fn run(mut self, mut queue: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        while let Some(first) = queue.recv().await {
            let mut bytes = message_bytes(&first);
            let mut batch = vec![first];
            while batch.len() < MESSAGES_PER_ENVELOPE_MAX && bytes < ENVELOPE_BYTES_MAX {
                match queue.try_recv() {
                    Ok(message) => {
                        bytes += message_bytes(&message);
                        batch.push(message);
                    }
                    Err(_) => break,
                }
            }
            let envelope = seal_envelope(&self.cluster_id, self.me, self.peer, &batch);
            let outcome = tokio::time::timeout(self.call_timeout, self.client.deliver(envelope)).await;
            let error = match outcome {
                Ok(Ok(_)) => None,
                Ok(Err(status)) => Some(status.message().to_string()),
                Err(_) => Some(format!("no answer within {:?}", self.call_timeout)),
            };
            match error {
                None => {
                    if failing {
                        tracing::info!(peer = self.peer, lane = self.lane, "peer reachable again");
                    }
                    failing = false;
                    backoff = BACKOFF_MIN;
                }
                Some(error) => {
                    if !failing {
                        tracing::warn!(peer = self.peer, lane = self.lane, %error, "cannot reach peer; retrying with backoff");
                    }
                    failing = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

fn message_bytes(message: &Message) -> u64 {
    match &message.body {
        MessageBody::AppendEntries { entries, .. } => entries.iter().map(|e| e.size_bytes()).sum::<u64>() + 64,
        _ => 64,
    }
}
