//! Change streams (`WatchChanges`): a state machine's changes, read from
//! this member's change history page by page as the watcher takes them, so
//! a slow watcher costs a page of memory and the store the rest.

use super::{ClientService, forwarded, is_forwarded, outcome_pb, request_id, status_of};
use crate::node::{RequestError, check_name};
use crate::raft::{Index, Role};
use crate::storage::{Change, HistoryFilter, HistoryPosition, HistoryRead, PageLimits, STATE_KEY_MAX_BYTES, Store};
use crate::wire::HISTORY_FLOOR_KEY;
use crate::wire::client_pb::{self, ReadRequest, WatchChangesRequest, WatchChangesResponse};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Status};
use tracing::Instrument as _;

/// What one message of a change stream holds (see [`PageLimits`]).
const PAGE: PageLimits = PageLimits { changes: 1024, bytes: 256 << 10, scanned: 16 << 10, hard_bytes: 2 << 20 };

/// A watch that sees no matching change still says how far it got, this
/// often at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Messages queued for one watcher beyond the one being sent: a watcher
/// that reads slowly holds this many pages, then stops the reading.
const WATCH_QUEUE: usize = 1;

/// What a watch asked for, checked.
pub(super) struct WatchPlan {
    filter: HistoryFilter,
    from_index: Index,
    previous_values: bool,
    linearizable: bool,
}

impl ClientService {
    /// Checks a watch request: names, bounds and options.
    pub(super) fn plan_watch(&self, request: &WatchChangesRequest) -> Result<WatchPlan, Status> {
        let name = &request.state_machine;
        check_name(name).map_err(Status::invalid_argument)?;
        for (what, key) in
            [("prefix", &request.prefix), ("range_start", &request.range_start), ("range_end", &request.range_end)]
        {
            if key.len() > STATE_KEY_MAX_BYTES {
                return Err(Status::invalid_argument(format!(
                    "{what} of {} bytes is longer than a key can be ({STATE_KEY_MAX_BYTES} bytes)",
                    key.len()
                )));
            }
        }
        let ranged = !request.range_start.is_empty() || !request.range_end.is_empty();
        if ranged && !request.prefix.is_empty() {
            return Err(Status::invalid_argument("give either a prefix or a range (range_start, range_end), not both"));
        }
        if !request.range_end.is_empty() && request.range_end <= request.range_start {
            return Err(Status::invalid_argument("range_end must be after range_start"));
        }
        let filter = if ranged {
            HistoryFilter {
                state_machine: name.clone(),
                start: request.range_start.clone(),
                end: Some(request.range_end.clone()).filter(|end| !end.is_empty()),
            }
        } else {
            HistoryFilter::prefix(name, &request.prefix)
        };
        let linearizable = match client_pb::Consistency::try_from(request.consistency) {
            Ok(client_pb::Consistency::Linearizable) => true,
            Ok(client_pb::Consistency::Stale) => false,
            Ok(client_pb::Consistency::Lease) => {
                return Err(Status::invalid_argument("a watch starts LINEARIZABLE or STALE, not LEASE"));
            }
            Err(_) => return Err(Status::invalid_argument(format!("unknown consistency {}", request.consistency))),
        };
        if !self.node.store.keeps_history() {
            return Err(Status::failed_precondition(
                "this member keeps no change history (--watch-history-entries 0), so it cannot serve watches",
            ));
        }
        Ok(WatchPlan { filter, from_index: request.from_index, previous_values: request.previous_values, linearizable })
    }

    /// The first index a watch reports: the one asked for, or the one after
    /// "now" (a ReadIndex round's commit index, applied here; or, stale,
    /// what this member has applied).
    pub(super) async fn watch_start(&self, plan: &WatchPlan, id: &str) -> Result<Index, Status> {
        if plan.from_index > 0 {
            return Ok(plan.from_index);
        }
        if !plan.linearizable {
            return Ok(self.node.store.applied().0 + 1);
        }
        let now = match self.node.core.barrier().await {
            Ok(index) => index,
            Err(error) => match self.forward_target(&error, false) {
                // A follower asks its leader for a ReadIndex, then waits to
                // have applied that far itself.
                Some((mut leader, _, address)) => {
                    let barrier = ReadRequest { state_machine: String::new(), query: Vec::new(), consistency: 0 };
                    let index = self.forwarding(leader.read(forwarded(barrier, id))).await?.into_inner().index;
                    tracing::debug!(leader = %address, index, "read index for a watch from the leader");
                    self.await_applied(index).await?;
                    index
                }
                None => return Err(status_of(error)),
            },
        };
        Ok(now + 1)
    }

    /// Waits until this member has applied `index`, as long as a request
    /// may wait.
    async fn await_applied(&self, index: Index) -> Result<(), Status> {
        let mut applied = self.node.applied.applied_index();
        let limit = self.config.node.request_timeout;
        match tokio::time::timeout(limit, applied.wait_for(|&at| at >= index)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(status_of(RequestError::ShuttingDown)),
            Err(_) => Err(Status::unavailable(format!(
                "this member did not apply index {index} within {limit:?}; try another member"
            ))),
        }
    }

    /// Whether a barrier read forwarded by a follower (a watch's
    /// linearizable start) is what `request` is.
    pub(super) fn is_forwarded_barrier(request: &Request<ReadRequest>) -> bool {
        let read = request.get_ref();
        is_forwarded(request) && read.state_machine.is_empty() && read.query.is_empty()
    }

    /// Answers a barrier read forwarded by a follower on the leader: the
    /// index up to which everything acknowledged is applied here.
    pub(super) async fn forwarded_barrier(&self) -> Result<client_pb::ReadResponse, Status> {
        if self.node.core.current_leadership().role != Role::Leader {
            return Err(status_of(RequestError::NotLeader { leader: None }));
        }
        let index = self.node.core.barrier().await.map_err(status_of)?;
        Ok(client_pb::ReadResponse { outcome: Some(outcome_pb(Ok(Vec::new()))), index })
    }

    /// Starts the stream of changes `plan` asks for; messages come from a
    /// task that reads the history a page at a time, only as fast as the
    /// watcher takes them.
    pub(super) async fn start_watch(
        &self,
        request: Request<WatchChangesRequest>,
    ) -> Result<mpsc::Receiver<Result<WatchChangesResponse, Status>>, Status> {
        let id = request_id(&request);
        let plan = self.plan_watch(request.get_ref())?;
        let span = tracing::info_span!(
            "watch",
            request = %id,
            state_machine = %plan.filter.state_machine,
            from_index = plan.from_index,
        );
        let start = self.watch_start(&plan, &id).instrument(span.clone()).await?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let feed = Feed {
            store: self.node.store.clone(),
            applied: self.node.applied.applied_index(),
            plan,
            start,
            tx,
            stop: self.stop.clone(),
        };
        tokio::spawn(feed.run().instrument(span));
        Ok(rx)
    }
}

/// Why a caught-up watch goes on.
enum Wake {
    /// More is applied (or progress is due).
    Applied,
    /// The watcher went away.
    Left,
    /// The member shuts down.
    Stopping,
}

/// One watcher's producer.
struct Feed {
    store: Store,
    applied: watch::Receiver<Index>,
    plan: WatchPlan,
    start: Index,
    tx: mpsc::Sender<Result<WatchChangesResponse, Status>>,
    stop: crate::node::ShutdownSignal,
}

impl Feed {
    async fn run(mut self) {
        tracing::debug!(start = self.start, "watch started");
        let mut position = HistoryPosition::at(self.start);
        let mut reported = self.start - 1;
        let mut reported_at = tokio::time::Instant::now();
        // The first message names the start at once: a watcher that loses
        // the stream before any change resumes from there, not from a new
        // "now".
        let opening = WatchChangesResponse { changes: Vec::new(), covered_index: reported, start_index: self.start };
        if self.tx.send(Ok(opening)).await.is_err() {
            return;
        }
        loop {
            // Marked seen before reading, so an apply that lands during
            // the read wakes the wait below.
            let _ = self.applied.borrow_and_update();
            let page = self.read(position).await;
            let page = match page {
                Ok(HistoryRead::Page(page)) => page,
                Ok(HistoryRead::Compacted { floor }) => {
                    tracing::info!(floor, at = position.index, "watch ended: compacted");
                    let _ = self.tx.send(Err(compacted(position.index, floor))).await;
                    return;
                }
                Err(status) => {
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
            };
            let caught_up = page.covered >= page.applied;
            let progressed = page.covered > reported && reported_at.elapsed() >= PROGRESS_EVERY;
            if !page.changes.is_empty() || progressed {
                let message = WatchChangesResponse {
                    changes: page
                        .changes
                        .into_iter()
                        .map(|change| change_pb(change, self.plan.previous_values))
                        .collect(),
                    covered_index: page.covered,
                    start_index: self.start,
                };
                if self.tx.send(Ok(message)).await.is_err() {
                    tracing::debug!("watch ended: the watcher left");
                    return;
                }
                (reported, reported_at) = (page.covered, tokio::time::Instant::now());
            }
            position = page.next;
            if !caught_up {
                continue;
            }
            let progress_due = reported_at + PROGRESS_EVERY;
            let woken = tokio::select! {
                changed = self.applied.changed() => if changed.is_ok() { Wake::Applied } else { Wake::Stopping },
                _ = tokio::time::sleep_until(progress_due), if page.covered > reported => Wake::Applied,
                _ = self.tx.closed() => Wake::Left,
                _ = self.stop.wait() => Wake::Stopping,
            };
            match woken {
                Wake::Applied => {}
                Wake::Left => return,
                Wake::Stopping => {
                    let _ = self.tx.send(Err(status_of(RequestError::ShuttingDown))).await;
                    return;
                }
            }
        }
    }

    async fn read(&self, position: HistoryPosition) -> Result<HistoryRead, Status> {
        let (store, filter) = (self.store.clone(), self.plan.filter.clone());
        tokio::task::spawn_blocking(move || store.history_page(position, &filter, PAGE))
            .await
            .map_err(|_| Status::internal("the watch's reader thread was lost"))?
            .map_err(|error| Status::internal(format!("reading the change history: {error}")))
    }
}

/// The refusal of a watch from an index the history no longer holds.
fn compacted(from: Index, floor: Index) -> Status {
    let mut status = Status::out_of_range(format!(
        "compacted: this member's change history starts after index {floor}, so changes from index {from} on \
         cannot all be sent; re-read the state (at index {floor} or later) and watch from the index after that read"
    ));
    if let Ok(value) = floor.to_string().parse() {
        status.metadata_mut().insert(HISTORY_FLOOR_KEY, value);
    }
    status
}

fn change_pb(change: Change, previous_values: bool) -> client_pb::Change {
    client_pb::Change {
        index: change.index,
        key: change.key,
        deleted: change.value.is_none(),
        value: change.value.unwrap_or_default(),
        previous: if previous_values { change.previous } else { None },
    }
}
