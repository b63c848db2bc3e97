//! Coalescing callers onto the `Batch` stream: every writer and reader that
//! shares a [`super::ClusterClient`]'s connection to a member hands its
//! request to one task, which sends whatever has queued up as one message
//! and hands each answer back to its caller as it arrives.
//!
//! There is no linger timer: a request waits only one turn of the
//! scheduler and while the previous message is being handed to the
//! connection, so a lone caller pays next to nothing and many callers fill
//! each message by themselves (up to
//! [`ITEMS_PER_MESSAGE_MAX`] items or [`BYTES_PER_MESSAGE_MAX`] bytes). Each
//! answer is what the unary call would have answered, errors included (as
//! a status with the same routing metadata), so the caller routes and
//! retries it as before. A broken stream fails what it carried as
//! UNAVAILABLE (a write is retried with its session's sequence number, so
//! it is applied once) and the next request opens a new one.

use crate::wire::client_pb::{
    BatchItem, BatchRequest, ReadRequest, ReadResponse, WriteRequest, WriteResponse, batch_answer, batch_item,
    client_client::ClientClient,
};
use crate::wire::{FORWARDED_KEY, LEADER_ADDR_KEY, status_of_batch_error};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// Items in one message at most.
pub const ITEMS_PER_MESSAGE_MAX: usize = 1024;

/// Bytes of commands and queries in one message, past which it is sent
/// (well inside a member's message limit: a command of up to its own limit
/// still travels alone).
pub const BYTES_PER_MESSAGE_MAX: usize = 256 << 10;

/// Requests waiting for the task; past it, callers wait to hand theirs over.
const QUEUE: usize = 65_536;

/// Messages handed to the connection and not yet taken by it.
const SEND_QUEUE: usize = 8;

/// What a caller waits for.
type Reply = oneshot::Sender<Result<Answered, Status>>;

/// One request handed to the task.
struct Queued {
    request: batch_item::Request,
    bytes: usize,
    request_id: String,
    reply: Reply,
}

/// A successful answer, and the leader that gave it if it was forwarded.
struct Answered {
    answer: batch_answer::Answer,
    leader_addr: String,
}

/// The batching side of one connection to one member: a client's, or a
/// follower's towards its leader.
pub struct Batcher {
    queue: mpsc::Sender<Queued>,
    /// The task's end of the queue, until the first request starts it
    /// (inside the caller's runtime).
    idle: Mutex<Option<Parked>>,
}

/// What the batching task starts with: its end of the queue, the
/// connection, and whether the requests are forwarded by a member.
type Parked = (mpsc::Receiver<Queued>, ClientClient<Channel>, bool);

impl Batcher {
    /// A client's batcher over `client`'s connection; its task starts with
    /// the first request.
    pub fn new(client: ClientClient<Channel>) -> Batcher {
        Batcher::with_mark(client, false)
    }

    /// A follower's batcher towards its leader: its streams are marked
    /// forwarded, so the leader never forwards their items again.
    pub fn forwarding(client: ClientClient<Channel>) -> Batcher {
        Batcher::with_mark(client, true)
    }

    fn with_mark(client: ClientClient<Channel>, forwarded: bool) -> Batcher {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Batcher { queue, idle: Mutex::new(Some((receiver, client, forwarded))) }
    }

    /// A write, answered as the unary `Write` would answer it.
    pub async fn write(&self, request: WriteRequest) -> Result<Response<WriteResponse>, Status> {
        self.write_as(request, String::new()).await
    }

    /// A write logged under `request_id` on the member (empty: it makes one).
    pub async fn write_as(&self, request: WriteRequest, request_id: String) -> Result<Response<WriteResponse>, Status> {
        let bytes = request.command.len() + request.client_id.len() + request.state_machine.len();
        let answered = self.call(batch_item::Request::Write(request), bytes, request_id).await?;
        match answered.answer {
            batch_answer::Answer::Write(response) => Ok(with_leader(response, &answered.leader_addr)),
            _ => Err(Status::internal("the member answered a write with something else")),
        }
    }

    /// A read, answered as the unary `Read` would answer it.
    pub async fn read(&self, request: ReadRequest) -> Result<Response<ReadResponse>, Status> {
        self.read_as(request, String::new()).await
    }

    /// A read logged under `request_id` on the member (empty: it makes one).
    pub async fn read_as(&self, request: ReadRequest, request_id: String) -> Result<Response<ReadResponse>, Status> {
        let bytes = request.query.len() + request.state_machine.len();
        let answered = self.call(batch_item::Request::Read(request), bytes, request_id).await?;
        match answered.answer {
            batch_answer::Answer::Read(response) => Ok(with_leader(response, &answered.leader_addr)),
            _ => Err(Status::internal("the member answered a read with something else")),
        }
    }

    async fn call(&self, request: batch_item::Request, bytes: usize, request_id: String) -> Result<Answered, Status> {
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some((receiver, client, forwarded)) = idle {
            tokio::spawn(run(client, receiver, forwarded));
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued { request, bytes, request_id, reply })
            .await
            .map_err(|_| Status::unavailable("the batching task stopped"))?;
        answer.await.map_err(|_| Status::unavailable("the batch stream ended before it answered"))?
    }
}

fn with_leader<T>(message: T, leader_addr: &str) -> Response<T> {
    let mut response = Response::new(message);
    if !leader_addr.is_empty()
        && let Ok(value) = leader_addr.parse()
    {
        response.metadata_mut().insert(LEADER_ADDR_KEY, value);
    }
    response
}

/// The task: one stream at a time to the member, opened when a request
/// comes and opened again after it breaks; ends when every caller is gone.
async fn run(client: ClientClient<Channel>, mut queue: mpsc::Receiver<Queued>, forwarded: bool) {
    let mut next_id = 0u64;
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let (sender, requests) = mpsc::channel::<BatchRequest>(SEND_QUEUE);
        let mut grpc = client.clone();
        let mut opening = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
        if forwarded {
            opening.metadata_mut().insert(FORWARDED_KEY, tonic::metadata::MetadataValue::from_static("1"));
        }
        let mut answers = match grpc.batch(opening).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let _ = first.reply.send(Err(status));
                continue;
            }
        };
        let mut stream = Stream { inflight: Default::default(), batch: Vec::new(), batch_bytes: 0 };
        stream.push(&mut next_id, first);
        let mut callers_left = true;
        let broke = loop {
            // A message just begun waits one turn of the scheduler (no
            // timer), so requests that tasks ready to run are about to hand
            // over join it: without it, a member forwarding the items of a
            // batch would send each alone, its task woken after every one.
            if stream.batch.len() == 1 {
                tokio::task::yield_now().await;
            }
            while callers_left && stream.has_room() {
                match queue.try_recv() {
                    Ok(queued) => stream.push(&mut next_id, queued),
                    Err(_) => break,
                }
            }
            if !callers_left && stream.inflight.is_empty() {
                return;
            }
            tokio::select! {
                biased;
                message = answers.message() => match message {
                    Ok(Some(response)) => stream.deliver(response.answers),
                    Ok(None) => break Status::unavailable("the member closed the batch stream"),
                    // A refusal keeps its code (the caller gives up); a
                    // broken connection is UNAVAILABLE (the caller retries
                    // elsewhere).
                    Err(status) => break match status.code() {
                        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => {
                            Status::unavailable(format!("the batch stream broke: {}", status.message()))
                        }
                        code => Status::new(code, status.message().to_string()),
                    },
                },
                permit = sender.reserve(), if !stream.batch.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(BatchRequest { items: std::mem::take(&mut stream.batch) });
                        stream.batch_bytes = 0;
                    }
                    Err(_) => break Status::unavailable("the batch stream's sending side closed"),
                },
                queued = queue.recv(), if callers_left && stream.batch.is_empty() => match queued {
                    Some(queued) => stream.push(&mut next_id, queued),
                    None => callers_left = false,
                },
            }
        };
        stream.fail(&broke);
        if !callers_left {
            return;
        }
    }
}

/// What one open stream carries.
struct Stream {
    /// Every item sent or about to be, by id (ids are this task's own
    /// counter: no hostile keys, so no keyed hash).
    inflight: rustc_hash::FxHashMap<u64, Reply>,
    /// Items gathered for the next message.
    batch: Vec<BatchItem>,
    batch_bytes: usize,
}

impl Stream {
    fn has_room(&self) -> bool {
        self.batch.len() < ITEMS_PER_MESSAGE_MAX && self.batch_bytes < BYTES_PER_MESSAGE_MAX
    }

    fn push(&mut self, next_id: &mut u64, queued: Queued) {
        *next_id += 1;
        self.inflight.insert(*next_id, queued.reply);
        self.batch.push(BatchItem { id: *next_id, request: Some(queued.request), request_id: queued.request_id });
        self.batch_bytes += queued.bytes;
    }

    fn deliver(&mut self, answers: Vec<crate::wire::client_pb::BatchAnswer>) {
        for answer in answers {
            let Some(reply) = self.inflight.remove(&answer.id) else { continue };
            let result = match answer.answer {
                Some(batch_answer::Answer::Error(error)) => Err(status_of_batch_error(&error)),
                Some(answer_kind) => Ok(Answered { answer: answer_kind, leader_addr: answer.leader_addr }),
                None => Err(Status::internal("the member sent an empty answer")),
            };
            // A caller that gave up has dropped its end.
            let _ = reply.send(result);
        }
    }

    /// Fails everything the stream carried: the callers retry elsewhere.
    fn fail(self, status: &Status) {
        for (_, reply) in self.inflight {
            let _ = reply.send(Err(Status::new(status.code(), status.message().to_string())));
        }
    }
}
