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
//!
//! Lanes start on first use, to whichever address the member book holds,
//! so members added later are reached without a restart. A snapshot the
//! core asks for goes on a stream of its own (at most one per peer), read
//! from a consistent view of the store while writes go on; the core hears
//! when it ends through [`SnapshotReports`].

use super::members::Members;
use crate::raft::{Message, MessageBody, NodeId, Term};
use crate::storage::Store;
use crate::wire::pb::raft_control_client::RaftControlClient;
use crate::wire::pb::raft_peer_client::RaftPeerClient;
use crate::wire::{MESSAGES_PER_ENVELOPE_MAX, control_client, pb, peer_client, seal_envelope, snapshot_meta_to_pb};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Messages queued per lane before new ones are dropped.
const LANE_CAPACITY: usize = 1024;
/// Entry bytes per envelope (one call); a single larger message still goes.
const ENVELOPE_BYTES_MAX: u64 = 16 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Record bytes per snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the network.
const SNAPSHOT_READ_AHEAD: usize = 4;
/// Envelopes buffered for a delivery stream before the lane waits for it.
const STREAM_BUFFER: usize = 8;
/// How long one snapshot stream may take before it is abandoned.
const SNAPSHOT_STREAM_TIMEOUT: Duration = Duration::from_secs(600);
/// The pause after a peer's first failed snapshot stream, doubled with each
/// failure in a row up to the longest: a member that refuses snapshots (its
/// disk low, say) is not sent a full read of the state every tick.
const SNAPSHOT_RETRY_MIN: Duration = Duration::from_millis(200);
const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(5);
/// Finished snapshot streams not yet heard by the core. At most one stream
/// runs per peer, so this only fills with a cluster of that many members;
/// past it a stream's end waits for room.
const SNAPSHOT_REPORTS_QUEUE: usize = 64;

/// Snapshot transfers, counted by the peer lanes (sending) and the server's
/// peer service (receiving); `receiving_bytes` is the progress of the stream
/// being received now (0 when none is).
#[derive(Default)]
pub struct SnapshotCounters {
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub send_failures: AtomicU64,
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    pub receive_failures: AtomicU64,
    pub receiving_bytes: AtomicU64,
}

/// The peers whose snapshot stream ended (delivered or not), for the core
/// to tell the consensus core, which then sends a fresh one if still needed.
pub(super) struct SnapshotReports {
    ended: mpsc::Receiver<NodeId>,
}

impl SnapshotReports {
    /// The next peer whose stream ended.
    pub(super) async fn next(&mut self) -> Option<NodeId> {
        self.ended.recv().await
    }
}

struct Lanes {
    address: String,
    control: mpsc::Sender<Message>,
    data: mpsc::Sender<Message>,
}

/// The sending side of every peer's lanes.
pub(super) struct Peers {
    cluster_id: Arc<str>,
    me: NodeId,
    members: Arc<Members>,
    lanes: BTreeMap<NodeId, Lanes>,
    store: Store,
    snapshot_ended: mpsc::Sender<NodeId>,
    /// Peers a snapshot is being streamed to.
    snapshots: Arc<Mutex<BTreeSet<NodeId>>>,
    /// Snapshot streams that failed in a row, per peer.
    snapshot_failures: Arc<Mutex<BTreeMap<NodeId, u32>>>,
    counters: Arc<SnapshotCounters>,
}

impl Peers {
    /// Lanes to the members in `members`' book, started on first use, and
    /// where the ends of snapshot streams are reported.
    pub(super) fn new(
        cluster_id: &str,
        members: Arc<Members>,
        store: Store,
        counters: Arc<SnapshotCounters>,
    ) -> (Peers, SnapshotReports) {
        let (snapshot_ended, ended) = mpsc::channel(SNAPSHOT_REPORTS_QUEUE);
        let peers = Peers {
            cluster_id: Arc::from(cluster_id),
            me: members.me(),
            members,
            lanes: BTreeMap::new(),
            store,
            snapshot_ended,
            snapshots: Arc::new(Mutex::new(BTreeSet::new())),
            snapshot_failures: Arc::new(Mutex::new(BTreeMap::new())),
            counters,
        };
        (peers, SnapshotReports { ended })
    }

    /// The lanes to `id`, started (or restarted on a new address) as needed.
    fn lanes_to(&mut self, id: NodeId) -> Option<&Lanes> {
        let address = self.members.dial_address(id)?;
        if self.lanes.get(&id).is_none_or(|lanes| lanes.address != address) {
            // A connection of the lanes' own, not `Members::channel`'s: a
            // snapshot or a module stream on that one must not queue
            // heartbeats and votes behind megabytes of data.
            let channel = match self.members.transport().channel(&address) {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::warn!(peer = id, %error, "cannot reach a member at its address");
                    return None;
                }
            };
            let start = |lane: &'static str| {
                let (tx, rx) = mpsc::channel(LANE_CAPACITY);
                let client = match lane {
                    "control" => LaneClient::Control(control_client(channel.clone())),
                    _ => LaneClient::Data(peer_client(channel.clone())),
                };
                let sender = LaneSender { cluster_id: self.cluster_id.clone(), me: self.me, peer: id, lane, client };
                tokio::spawn(sender.run(rx));
                tx
            };
            let (control, data) = (start("control"), start("data"));
            self.lanes.insert(id, Lanes { address, control, data });
        }
        self.lanes.get(&id)
    }

    /// Queues messages for their peers; drops what does not fit.
    pub(super) fn send(&mut self, messages: Vec<Message>) {
        for message in messages {
            if let MessageBody::InstallSnapshot { .. } = message.body {
                self.send_snapshot(message.to, message.term);
                continue;
            }
            let Some(lanes) = self.lanes_to(message.to) else {
                tracing::debug!(to = message.to, "no address for this member; message dropped");
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

    /// Streams this member's state to `to`, unless a stream to it is
    /// already running; the core hears when it ends either way.
    fn send_snapshot(&mut self, to: NodeId, term: Term) {
        if !self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).insert(to) {
            return;
        }
        let channel = self.members.channel(to);
        let (store, ended, running) = (self.store.clone(), self.snapshot_ended.clone(), self.snapshots.clone());
        let (counters, failures) = (self.counters.clone(), self.snapshot_failures.clone());
        let (cluster_id, me) = (self.cluster_id.to_string(), self.me);
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match channel {
                Ok(channel) => stream_snapshot(store, peer_client(channel), cluster_id, me, to, term).await,
                Err(error) => Err(error),
            };
            match outcome {
                Ok((index, bytes)) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    counters.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(peer = to, index, bytes, seconds, "snapshot sent");
                    failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&to);
                }
                Err(error) => {
                    counters.send_failures.fetch_add(1, Ordering::Relaxed);
                    let in_a_row = {
                        let mut failures = failures.lock().unwrap_or_else(|p| p.into_inner());
                        let count = failures.entry(to).or_insert(0);
                        *count = count.saturating_add(1);
                        *count
                    };
                    let pause = snapshot_retry_pause(in_a_row);
                    tracing::warn!(peer = to, %error, in_a_row, ?pause, "snapshot not delivered; the leader retries");
                    // Still counted as running meanwhile: the core's next
                    // request for this peer waits for the pause to end.
                    tokio::time::sleep(pause).await;
                }
            }
            running.lock().unwrap_or_else(|p| p.into_inner()).remove(&to);
            let _ = ended.send(to).await;
        });
    }
}

/// How long to wait after the `in_a_row`-th failed snapshot stream to a peer.
fn snapshot_retry_pause(in_a_row: u32) -> Duration {
    let doublings = in_a_row.saturating_sub(1).min(16);
    (SNAPSHOT_RETRY_MIN * 2u32.pow(doublings)).min(SNAPSHOT_RETRY_MAX)
}

/// Reads a consistent view of the store on a blocking thread and streams it
/// to `to` in checksummed chunks. Returns the snapshot's index and size.
async fn stream_snapshot(
    store: Store,
    mut client: RaftPeerClient<Channel>,
    cluster_id: String,
    me: NodeId,
    to: NodeId,
    term: Term,
) -> Result<(u64, u64), String> {
    let (tx, rx) = mpsc::channel::<pb::SnapshotChunk>(SNAPSHOT_READ_AHEAD);
    let reader = tokio::task::spawn_blocking(move || -> Result<(u64, u64), String> {
        let reader = store.snapshot_reader().map_err(|e| e.to_string())?;
        let meta = snapshot_meta_to_pb(reader.meta());
        // The receiver holds the stream to this (one more read of the view).
        let total_bytes = reader.total_bytes().map_err(|e| e.to_string())?;
        let index = meta.index;
        let mut digest = Sha256::new();
        let mut offset = 0u64;
        let mut delivered = true;
        let chunk = |data: Vec<u8>, offset: u64, meta: Option<pb::SnapshotMeta>| pb::SnapshotChunk {
            cluster_id: cluster_id.clone(),
            from: me,
            to,
            term,
            meta,
            total_bytes,
            offset,
            checksum: crc32fast::hash(&data),
            data,
            last: false,
            digest: Vec::new(),
        };
        reader
            .for_each_chunk(SNAPSHOT_CHUNK_BYTES, |data| {
                digest.update(&data);
                let len = data.len() as u64;
                let first = (offset == 0).then(|| meta.clone());
                delivered = tx.blocking_send(chunk(data, offset, first)).is_ok();
                offset += len;
                delivered
            })
            .map_err(|e| e.to_string())?;
        if !delivered {
            return Err("the stream closed early".to_string());
        }
        let mut last = chunk(Vec::new(), offset, (offset == 0).then(|| meta.clone()));
        last.last = true;
        last.digest = digest.finalize().to_vec();
        tx.blocking_send(last).map_err(|_| "the stream closed early".to_string())?;
        Ok((index, offset))
    });
    let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
    let reply = tokio::time::timeout(SNAPSHOT_STREAM_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer within {SNAPSHOT_STREAM_TIMEOUT:?}"))?
        .map_err(|status| status.message().to_string());
    let read = reader.await.map_err(|_| "the snapshot reader was lost".to_string())?;
    let accepted = reply?.into_inner().accepted;
    let (index, bytes) = read?;
    if !accepted {
        return Err("the member declined the snapshot".to_string());
    }
    Ok((index, bytes))
}

/// The service a lane delivers through: the control lane's takes only
/// small envelopes, so a member never buffers more than that for it.
#[derive(Clone)]
enum LaneClient {
    Control(RaftControlClient<Channel>),
    Data(RaftPeerClient<Channel>),
}

impl LaneClient {
    async fn deliver_stream(
        &mut self,
        envelopes: tokio_stream::wrappers::ReceiverStream<pb::Envelope>,
    ) -> Result<tonic::Response<pb::DeliverReply>, tonic::Status> {
        match self {
            LaneClient::Control(client) => client.deliver_stream(envelopes).await,
            LaneClient::Data(client) => client.deliver_stream(envelopes).await,
        }
    }
}

struct LaneSender {
    cluster_id: Arc<str>,
    me: NodeId,
    peer: NodeId,
    lane: &'static str,
    client: LaneClient,
}

impl LaneSender {
    /// Sends what the queue gathers over one long-lived `DeliverStream`
    /// call, one envelope per batch; when the stream ends (the peer is down,
    /// restarted, or refused an envelope) it opens another after a backoff.
    /// Messages in flight on a broken stream are lost, which Raft recovers
    /// from like any other loss.
    async fn run(self, mut queue: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        loop {
            let (tx, rx) = mpsc::channel::<pb::Envelope>(STREAM_BUFFER);
            let mut client = self.client.clone();
            let mut call =
                tokio::spawn(
                    async move { client.deliver_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
                );
            let opened = Instant::now();
            let error = loop {
                tokio::select! {
                    biased;
                    ended = &mut call => break describe_end(ended),
                    first = queue.recv() => {
                        let Some(first) = first else {
                            call.abort();
                            return;
                        };
                        let envelope = self.envelope(first, &mut queue);
                        if tx.send(envelope).await.is_err() {
                            break describe_end((&mut call).await);
                        }
                    }
                }
            };
            if opened.elapsed() >= BACKOFF_MAX {
                // The stream worked for a while: this is a new failure.
                backoff = BACKOFF_MIN;
                if failing {
                    tracing::info!(peer = self.peer, lane = self.lane, "peer was reachable again");
                }
                failing = false;
            }
            if !failing {
                tracing::warn!(peer = self.peer, lane = self.lane, %error, "cannot reach peer; retrying with backoff");
            }
            failing = true;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// `first` and whatever else is queued, up to the envelope limits.
    fn envelope(&self, first: Message, queue: &mut mpsc::Receiver<Message>) -> pb::Envelope {
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
        seal_envelope(&self.cluster_id, self.me, self.peer, &batch)
    }
}

/// Why a delivery stream ended, for the log.
fn describe_end(
    ended: Result<Result<tonic::Response<pb::DeliverReply>, tonic::Status>, tokio::task::JoinError>,
) -> String {
    match ended {
        Ok(Ok(_)) => "the peer closed the stream".to_string(),
        Ok(Err(status)) => status.message().to_string(),
        Err(_) => "the stream task was lost".to_string(),
    }
}

fn message_bytes(message: &Message) -> u64 {
    match &message.body {
        MessageBody::AppendEntries { entries, .. } => entries.iter().map(|e| e.size_bytes()).sum::<u64>() + 64,
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_snapshot_streams_back_off_doubling_to_a_ceiling() {
        let pauses: Vec<Duration> = [1, 2, 3, 5, 6, 100, u32::MAX].into_iter().map(snapshot_retry_pause).collect();
        let ms = |millis| Duration::from_millis(millis);
        assert_eq!(pauses, [ms(200), ms(400), ms(800), ms(3200), ms(5000), ms(5000), ms(5000)]);
        assert_eq!(snapshot_retry_pause(0), SNAPSHOT_RETRY_MIN, "no failure counted yet: the shortest");
    }
}
