//! The client session table: exactly-once writes (Raft thesis §6.3).
//!
//! A client that names itself (a client id) numbers its writes. The apply
//! task remembers the answers to each client's latest writes, so a retry of a
//! write that was already applied gets the first answer back instead of being
//! applied again. Everything here is decided by applied entries only (their
//! order and leader timestamps), so every replica keeps the same table and
//! expires the same sessions at the same index.

use crate::storage::SessionChanges;
use crate::wire::pb::{SessionRecord, SessionReply, session_reply};
use prost::Message as _;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A client's id, shared by the table's indexes (cloning it copies nothing).
type ClientId = Arc<[u8]>;

/// Answers kept per client: a client may have this many writes in flight
/// and still retry any of them.
pub const REPLIES_PER_SESSION: u64 = 32;

/// What to do with a client's write.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Not seen before: apply it.
    Apply,
    /// Applied before: answer with this, apply nothing.
    Duplicate(SessionReply),
    /// So old that its answer is no longer kept; it may or may not have been
    /// applied, and it is not applied now.
    Expired { highest: u64 },
}

/// Lifetime and size bounds of the table. Identical on every member (they
/// decide which retries are answered).
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// A session unused for this long (by entry time) is dropped.
    pub ttl_ms: u64,
    /// Sessions kept at most; past it the least recently used one goes.
    pub max_sessions: usize,
}

impl Default for SessionLimits {
    fn default() -> SessionLimits {
        SessionLimits { ttl_ms: 3_600_000, max_sessions: 100_000 }
    }
}

/// The table, kept in memory and mirrored to the store by the apply task.
pub struct Sessions {
    limits: SessionLimits,
    records: FxHashMap<ClientId, SessionRecord>,
    /// One `(time, client id)` per session, the time at most its
    /// `last_used_ms`: a write does not move its session here (that would
    /// be a tree removal and insertion per write); an entry found older than
    /// its session's use when it reaches the front is moved then. So the
    /// front, once settled, is the least recently used session, exactly as
    /// if every write had moved its entry.
    by_age: BTreeSet<(u64, ClientId)>,
    /// Clients whose session changed (or was dropped) since the last
    /// `take_changes`; their records are encoded once, when taken.
    changed: FxHashSet<ClientId>,
}

/// A stored session record that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("session record of client {client:?} does not decode: {source}")]
pub struct SessionDecodeError {
    client: Vec<u8>,
    source: prost::DecodeError,
}

impl Sessions {
    /// The table as stored (`(client id, encoded record)` pairs).
    pub fn load(limits: SessionLimits, stored: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Sessions, SessionDecodeError> {
        let mut sessions =
            Sessions { limits, records: FxHashMap::default(), by_age: BTreeSet::new(), changed: FxHashSet::default() };
        sessions.records.reserve(stored.len());
        for (client, bytes) in stored {
            let record = SessionRecord::decode(bytes.as_slice())
                .map_err(|source| SessionDecodeError { client: client.clone(), source })?;
            let client: ClientId = client.into();
            sessions.by_age.insert((record.last_used_ms, client.clone()));
            sessions.records.insert(client, record);
        }
        Ok(sessions)
    }

    /// How many sessions are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len()
    }

    /// Decides about write `sequence` of `client`.
    pub fn admit(&self, client: &[u8], sequence: u64) -> Admission {
        let Some(record) = self.records.get(client) else { return Admission::Apply };
        if let Some(reply) = record.replies.iter().find(|r| r.sequence == sequence) {
            return Admission::Duplicate(reply.clone());
        }
        if sequence < record.answered_below || sequence + REPLIES_PER_SESSION <= record.highest_sequence {
            return Admission::Expired { highest: record.highest_sequence };
        }
        Admission::Apply
    }

    /// Records the answer to a write that was just applied, at entry time
    /// `now_ms`. The client has the answers below `lowest_unanswered` (0:
    /// it did not say), which are dropped.
    pub fn record(&mut self, client: &[u8], reply: SessionReply, lowest_unanswered: u64, now_ms: u64) {
        let id: ClientId = match self.records.get_key_value(client) {
            Some((id, _)) => id.clone(),
            None => {
                if self.records.len() >= self.limits.max_sessions {
                    self.evict_oldest();
                }
                let id: ClientId = client.into();
                self.by_age.insert((now_ms, id.clone()));
                id
            }
        };
        let record = self.records.entry(id.clone()).or_default();
        record.last_used_ms = record.last_used_ms.max(now_ms);
        record.highest_sequence = record.highest_sequence.max(reply.sequence);
        // Never past this write: its own answer is what a retry needs.
        record.answered_below = record.answered_below.max(lowest_unanswered.min(reply.sequence));
        record.replies.push(reply);
        let floor = record.highest_sequence.saturating_sub(REPLIES_PER_SESSION);
        let answered_below = record.answered_below;
        record.replies.retain(|r| r.sequence > floor && r.sequence >= answered_below);
        record.replies.sort_by_key(|r| r.sequence);
        self.changed.insert(id);
    }

    /// Drops sessions idle for longer than the lifetime, as of entry time
    /// `now_ms`. The apply task calls it at every command entry, so every
    /// replica drops the same sessions at the same index. Cheap when nothing
    /// is due: it looks at the oldest session only.
    pub fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.limits.ttl_ms);
        // An entry's time is at most its session's: one at or past the
        // horizon means every session is.
        while let Some((time, _)) = self.by_age.first() {
            if *time >= horizon {
                break;
            }
            self.take_front();
        }
    }

    fn evict_oldest(&mut self) {
        while !self.by_age.is_empty() && !self.take_front() {}
    }

    /// Drops the session at the front of the age index if its entry is
    /// current (and says so), else moves the entry to its session's time.
    fn take_front(&mut self) -> bool {
        let Some((time, client)) = self.by_age.pop_first() else { return false };
        match self.records.get(&client) {
            Some(record) if record.last_used_ms > time => {
                self.by_age.insert((record.last_used_ms, client));
                false
            }
            Some(_) => {
                self.records.remove(&client);
                self.changed.insert(client);
                true
            }
            None => false,
        }
    }

    /// Every session's record, encoded, in client id order: a checkpoint of
    /// the table for the store, which covers the changes since the last
    /// `take_changes` (they are forgotten).
    pub fn take_checkpoint(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.changed.clear();
        let mut all: Vec<_> = self.records.iter().map(|(client, r)| (client.to_vec(), r.encode_to_vec())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The changes to write to the store with the applied entries that made
    /// them, encoded (in client id order).
    pub fn take_changes(&mut self) -> SessionChanges {
        let mut clients: Vec<ClientId> = self.changed.drain().collect();
        clients.sort_unstable();
        let mut records = Vec::with_capacity(clients.len());
        let mut bytes = 0;
        for client in clients {
            let record = self.records.get(&client).map(|record| (record, record.encoded_len()));
            bytes += 9 + client.len() + record.map_or(0, |(_, len)| 4 + len);
            records.push((client, record));
        }
        let mut changes = SessionChanges::with_capacity(bytes);
        for (client, record) in records {
            match record {
                Some((record, len)) => changes.push_encoded(&client, len, |buf| record.encode_raw(buf)),
                None => changes.push(&client, None),
            }
        }
        changes
    }
}

/// A reply for the session table.
pub fn session_reply(sequence: u64, index: u64, term: u64, outcome: Result<Vec<u8>, String>) -> SessionReply {
    let result = match outcome {
        Ok(bytes) => session_reply::Result::Ok(bytes),
        Err(message) => session_reply::Result::Error(message),
    };
    SessionReply { sequence, index, term, result: Some(result) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(ttl_ms: u64, max_sessions: usize) -> SessionLimits {
        SessionLimits { ttl_ms, max_sessions }
    }

    #[test]
    fn a_retry_gets_the_first_answer() {
        let mut s = Sessions::load(SessionLimits::default(), Vec::new()).expect("empty");
        assert_eq!(s.admit(b"c", 1), Admission::Apply);
        let reply = session_reply(1, 10, 2, Ok(b"first".to_vec()));
        s.record(b"c", reply.clone(), 0, 1000);
        assert_eq!(s.admit(b"c", 1), Admission::Duplicate(reply));
        assert_eq!(s.admit(b"c", 2), Admission::Apply);
        assert_eq!(s.admit(b"other", 1), Admission::Apply);
    }

    #[test]
    fn writes_may_complete_out_of_order_within_the_window() {
        let mut s = Sessions::load(SessionLimits::default(), Vec::new()).expect("empty");
        s.record(b"c", session_reply(5, 1, 1, Ok(Vec::new())), 0, 0);
        assert_eq!(s.admit(b"c", 3), Admission::Apply, "an earlier write still in flight applies");
        s.record(b"c", session_reply(40, 2, 1, Ok(Vec::new())), 0, 0);
        assert_eq!(s.admit(b"c", 3), Admission::Expired { highest: 40 });
        assert!(matches!(s.admit(b"c", 5), Admission::Expired { .. }), "its answer fell out of the window");
    }

    #[test]
    fn sessions_expire_by_entry_time_and_by_count() {
        let mut s = Sessions::load(limits(1000, 2), Vec::new()).expect("empty");
        s.record(b"a", session_reply(1, 1, 1, Ok(Vec::new())), 0, 0);
        s.record(b"b", session_reply(1, 2, 1, Ok(Vec::new())), 0, 500);
        s.expire(1200);
        assert_eq!(s.len(), 1, "a idled past the lifetime");
        assert_eq!(s.admit(b"a", 1), Admission::Apply);
        s.record(b"c", session_reply(1, 3, 1, Ok(Vec::new())), 0, 1300);
        s.record(b"d", session_reply(1, 4, 1, Ok(Vec::new())), 0, 1400);
        assert_eq!(s.len(), 2, "the least recently used went at the limit");
        assert_eq!(s.admit(b"b", 1), Admission::Apply);
        let changes = s.take_changes().decoded();
        assert!(changes.iter().any(|(c, r)| c == b"a" && r.is_none()));
        assert!(changes.iter().any(|(c, r)| c == b"d" && r.is_some()));
    }

    #[test]
    fn a_client_that_says_what_it_has_keeps_one_answer_and_old_retries_are_refused() {
        let mut s = Sessions::load(SessionLimits::default(), Vec::new()).expect("empty");
        for sequence in 1..=10 {
            s.record(b"c", session_reply(sequence, sequence, 1, Ok(vec![0; 100])), sequence, 0);
        }
        assert_eq!(s.records[&b"c"[..]].replies.len(), 1, "only the answer still unconfirmed is kept");
        assert!(matches!(s.admit(b"c", 10), Admission::Duplicate(_)), "a retry of the last write is answered");
        assert_eq!(s.admit(b"c", 9), Admission::Expired { highest: 10 }, "an answered write is never re-applied");
        // A client that claims more than it has does not lose this answer.
        s.record(b"c", session_reply(11, 11, 1, Ok(Vec::new())), 50, 0);
        assert!(matches!(s.admit(b"c", 11), Admission::Duplicate(_)));
    }

    #[test]
    fn a_checkpoint_holds_every_session_and_clears_the_changes() {
        let mut s = Sessions::load(SessionLimits::default(), Vec::new()).expect("empty");
        s.record(b"b", session_reply(1, 1, 1, Ok(Vec::new())), 0, 0);
        s.record(b"a", session_reply(1, 2, 1, Ok(Vec::new())), 0, 0);
        let all = s.take_checkpoint();
        assert_eq!(all.iter().map(|(c, _)| c.as_slice()).collect::<Vec<_>>(), [&b"a"[..], b"b"]);
        assert!(s.take_changes().is_empty(), "the checkpoint covered them");
        let reloaded = Sessions::load(SessionLimits::default(), all).expect("decodes");
        assert!(matches!(reloaded.admit(b"a", 1), Admission::Duplicate(_)));
    }

    proptest::proptest! {
        /// The age index moved lazily evicts exactly the sessions a strict
        /// least-recently-used order would, in the same order.
        #[test]
        fn sessions_go_in_least_recently_used_order(
            ops in proptest::collection::vec((0u8..12, 0u64..50, proptest::bool::weighted(0.2)), 1..300)
        ) {
            let (ttl_ms, max_sessions) = (400, 5);
            let mut s = Sessions::load(limits(ttl_ms, max_sessions), Vec::new()).expect("empty");
            // The reference: each client's last use, the oldest found by a scan.
            let mut model: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut now = 0;
            let mut sequence = 0;
            for (client, advance, expire) in ops {
                now += advance;
                let client = vec![client];
                if expire {
                    s.expire(now);
                    model.retain(|(_, used)| *used >= now.saturating_sub(ttl_ms));
                } else {
                    sequence += 1;
                    if !model.iter().any(|(c, _)| *c == client) && model.len() >= max_sessions {
                        let oldest = model.iter().min_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0))).cloned();
                        model.retain(|m| Some(m) != oldest.as_ref());
                    }
                    s.record(&client, session_reply(sequence, sequence, 1, Ok(Vec::new())), 0, now);
                    match model.iter_mut().find(|(c, _)| *c == client) {
                        Some((_, used)) => *used = now,
                        None => model.push((client, now)),
                    }
                }
                let mut kept: Vec<Vec<u8>> = s.records.keys().map(|c| c.to_vec()).collect();
                let mut expected: Vec<Vec<u8>> = model.iter().map(|(c, _)| c.clone()).collect();
                kept.sort();
                expected.sort();
                proptest::prop_assert_eq!(kept, expected);
                proptest::prop_assert_eq!(s.by_age.len(), s.records.len(), "one age entry per session");
            }
        }
    }

    #[test]
    fn the_table_survives_a_reload() {
        let mut s = Sessions::load(SessionLimits::default(), Vec::new()).expect("empty");
        let reply = session_reply(7, 3, 1, Err("no".into()));
        s.record(b"c", reply.clone(), 0, 9);
        let stored: Vec<_> = s.take_changes().decoded().into_iter().map(|(c, r)| (c, r.expect("kept"))).collect();
        let reloaded = Sessions::load(SessionLimits::default(), stored).expect("decodes");
        assert_eq!(reloaded.admit(b"c", 7), Admission::Duplicate(reply));
        assert!(Sessions::load(SessionLimits::default(), vec![(b"x".to_vec(), vec![0xff, 0xff])]).is_err());
    }
}
