//! A resumable change stream: [`ClusterClient::watch`] follows a state
//! machine's changes across disconnects, member failures and leader changes,
//! resuming each time where the last message it got left off, so that every
//! change arrives exactly once and in log order.

use super::{ClientError, ClusterClient, Consistency};
use crate::wire::HISTORY_FLOOR_KEY;
use crate::wire::client_pb::{Change, WatchChangesRequest};
use std::time::{Duration, Instant};
use tonic::{Code, Status, Streaming};

/// What to watch.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub state_machine: String,
    /// Keys that start with this (empty: every key)...
    pub prefix: Vec<u8>,
    /// ...or keys in `[range_start, range_end)` (an empty end: no end).
    pub range_start: Vec<u8>,
    pub range_end: Vec<u8>,
    /// The first log index to report; 0: from now.
    pub from_index: u64,
    /// Whether changes carry the value they replaced.
    pub previous_values: bool,
    /// What "now" is for `from_index` 0 (linearizable or stale).
    pub consistency: Consistency,
}

impl WatchSpec {
    /// Every key of `state_machine` that starts with `prefix`, from now.
    pub fn prefix(state_machine: &str, prefix: &[u8]) -> WatchSpec {
        WatchSpec {
            state_machine: state_machine.to_string(),
            prefix: prefix.to_vec(),
            range_start: Vec::new(),
            range_end: Vec::new(),
            from_index: 0,
            previous_values: false,
            consistency: Consistency::Linearizable,
        }
    }
}

/// One message's worth of changes.
#[derive(Debug)]
pub struct ChangeBatch {
    /// In log order.
    pub changes: Vec<Change>,
    /// Every matching change at or below this index has been delivered.
    pub covered_index: u64,
}

/// A change stream that reconnects by itself (see the module docs).
pub struct ChangeWatch {
    client: ClusterClient,
    spec: WatchSpec,
    stream: Option<Streaming<crate::wire::client_pb::WatchChangesResponse>>,
    /// The first index reported, once a member named it.
    start: Option<u64>,
    covered: u64,
    /// Changes delivered at index `covered + 1` (a message may end inside
    /// one entry's changes): skipped when a resumed stream sends them again.
    delivered_past_covered: usize,
    /// Changes still to skip on a resumed stream.
    skip: usize,
    /// Reconnections made.
    pub reconnects: u64,
}

/// How long one outage is retried before the watch gives up.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

impl ClusterClient {
    /// A change stream as `spec` asks for, over this client's members.
    pub fn watch(&mut self, spec: WatchSpec) -> Result<ChangeWatch, ClientError> {
        Ok(ChangeWatch {
            client: self.sharing_connections()?,
            spec,
            stream: None,
            start: None,
            covered: 0,
            delivered_past_covered: 0,
            skip: 0,
            reconnects: 0,
        })
    }
}

impl ChangeWatch {
    /// The first index this watch reports, once a member has named it.
    pub fn start_index(&self) -> Option<u64> {
        self.start
    }

    /// The index up to which every matching change has been delivered.
    pub fn covered_index(&self) -> u64 {
        self.covered
    }

    /// The next message's changes (possibly none: then only how far the
    /// watch got). Reconnects (to the next member when one is down) and
    /// resumes as needed; an error only for what retrying cannot change: a
    /// refused request, or [`ClientError::Compacted`].
    pub async fn next(&mut self) -> Result<ChangeBatch, ClientError> {
        let mut outage: Option<(Instant, u32, String)> = None;
        let mut backoff = Duration::from_millis(20);
        loop {
            if self.stream.is_none() {
                match self.connect().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(status) => {
                        self.give_up_unless_retryable(&status, &mut outage)?;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                        continue;
                    }
                }
            }
            let stream = self.stream.as_mut().expect("connected above");
            let status = match stream.message().await {
                Ok(Some(message)) => {
                    if let Some(batch) = self.take(message) {
                        return Ok(batch);
                    }
                    continue;
                }
                Ok(None) => Status::unavailable("the member ended the stream"),
                Err(status) => status,
            };
            self.stream = None;
            self.give_up_unless_retryable(&status, &mut outage)?;
            self.reconnects += 1;
            tracing::debug!(covered = self.covered, error = %status.message(), "watch reconnecting");
        }
    }

    /// Folds one message into the watch's position; the changes the caller
    /// has not seen yet (none for a message that only says how far).
    fn take(&mut self, message: crate::wire::client_pb::WatchChangesResponse) -> Option<ChangeBatch> {
        self.start.get_or_insert(message.start_index);
        let mut changes = message.changes;
        if self.skip > 0 {
            let again = changes.iter().take(self.skip).take_while(|c| c.index == self.covered + 1).count();
            changes.drain(..again);
            self.skip -= again;
        }
        let covered = message.covered_index.max(self.covered);
        let past = changes.iter().filter(|c| c.index > covered).count();
        if covered > self.covered {
            self.delivered_past_covered = past;
            self.skip = 0;
        } else {
            self.delivered_past_covered += past;
        }
        let moved = covered > self.covered;
        self.covered = covered;
        (moved || !changes.is_empty()).then_some(ChangeBatch { changes, covered_index: covered })
    }

    async fn connect(&mut self) -> Result<Streaming<crate::wire::client_pb::WatchChangesResponse>, Status> {
        let from_index = match self.start {
            Some(_) => self.covered + 1,
            None => self.spec.from_index,
        };
        self.skip = self.delivered_past_covered;
        let request = WatchChangesRequest {
            state_machine: self.spec.state_machine.clone(),
            prefix: self.spec.prefix.clone(),
            range_start: self.spec.range_start.clone(),
            range_end: self.spec.range_end.clone(),
            from_index,
            previous_values: self.spec.previous_values,
            consistency: self.spec.consistency.into(),
        };
        let mut client =
            self.client.channel(self.client.current).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match tokio::time::timeout(super::CALL_TIMEOUT, client.watch_changes(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("the member did not start the watch in time")),
        }
    }

    /// An error if `status` is one that retrying cannot change, or the
    /// outage has lasted too long; otherwise counts the attempt.
    fn give_up_unless_retryable(
        &mut self,
        status: &Status,
        outage: &mut Option<(Instant, u32, String)>,
    ) -> Result<(), ClientError> {
        if status.code() == Code::OutOfRange {
            let floor = status.metadata().get(HISTORY_FLOOR_KEY).and_then(|v| v.to_str().ok()?.parse().ok());
            return Err(ClientError::Compacted { floor: floor.unwrap_or(0), message: status.message().to_string() });
        }
        let retryable = matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::ResourceExhausted
        );
        if !retryable {
            return Err(ClientError::Refused { code: status.code(), message: status.message().to_string() });
        }
        let (since, attempts, last) = outage.get_or_insert_with(|| (Instant::now(), 0, String::new()));
        *attempts += 1;
        *last = format!("{}: {}", self.client.addresses[self.client.current], status.message());
        if since.elapsed() >= RECONNECT_DEADLINE {
            return Err(ClientError::GaveUp { attempts: *attempts, elapsed: since.elapsed(), last: last.clone() });
        }
        // A member that is down, stopping or stuck: the next one serves the
        // watch as well (busy: the same one, after the pause).
        if status.code() != Code::ResourceExhausted {
            self.client.current = (self.client.current + 1) % self.client.addresses.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::client_pb::WatchChangesResponse;

    fn change(index: u64, key: &str) -> Change {
        Change { index, key: key.into(), deleted: false, value: b"v".to_vec(), previous: None }
    }

    fn watch() -> ChangeWatch {
        let mut client = ClusterClient::new(vec!["127.0.0.1:1".into()]).expect("client");
        client.watch(WatchSpec::prefix("kv", b"")).expect("watch")
    }

    #[test]
    fn a_resumed_stream_skips_what_was_delivered_of_an_entry_cut_across_messages() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let _entered = runtime.enter();
        let mut watch = watch();
        let opening = WatchChangesResponse { changes: vec![], covered_index: 9, start_index: 10 };
        assert!(watch.take(opening).is_some_and(|b| b.changes.is_empty()));
        // Index 11's changes do not fit in one message: this one covers 10.
        let first = WatchChangesResponse {
            changes: vec![change(10, "a"), change(11, "b"), change(11, "c")],
            covered_index: 10,
            start_index: 10,
        };
        assert_eq!(watch.take(first).expect("changes").changes.len(), 3);
        // The stream breaks; the resumed one starts at 11 and sends b and c again.
        watch.skip = watch.delivered_past_covered;
        let resumed = WatchChangesResponse {
            changes: vec![change(11, "b"), change(11, "c"), change(11, "d"), change(12, "e")],
            covered_index: 12,
            start_index: 11,
        };
        let batch = watch.take(resumed).expect("changes");
        let keys: Vec<_> = batch.changes.iter().map(|c| c.key.clone()).collect();
        assert_eq!(keys, [b"d".to_vec(), b"e".to_vec()]);
        assert_eq!((watch.covered_index(), watch.start_index()), (12, Some(10)));
    }
}
