//! The leader's view of each follower: how far its log is known to match, what
//! to send next, and how much is in flight.
//!
//! A follower is in one of three states. In `Probe` the leader does not know
//! where the logs diverge, so it sends one AppendEntries at a time and waits
//! for the answer (or the next heartbeat). In `Replicate` the logs are known to
//! match up to `matched`, so the leader streams entries optimistically,
//! bounded by the in-flight window. In `Snapshot` the follower needs entries
//! the leader has compacted; a snapshot is on its way and nothing else is
//! sent until it is installed or reported failed.

use super::types::Index;
use std::collections::VecDeque;

/// How the leader is currently talking to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    /// A snapshot of at least this index is being sent.
    Snapshot {
        pending: Index,
    },
}

/// Bounded window of AppendEntries sent but not yet acknowledged, each
/// remembered by its last index and byte size.
#[derive(Clone, Debug)]
pub struct Inflights {
    messages: VecDeque<(Index, u64)>,
    bytes: u64,
    max_messages: usize,
    max_bytes: u64,
}

impl Inflights {
    pub fn new(max_messages: usize, max_bytes: u64) -> Inflights {
        assert!(max_messages > 0, "the in-flight window must allow at least one message");
        Inflights { messages: VecDeque::with_capacity(max_messages), bytes: 0, max_messages, max_bytes }
    }

    /// Whether no more messages may be sent until some are acknowledged.
    pub fn full(&self) -> bool {
        self.messages.len() >= self.max_messages || self.bytes >= self.max_bytes
    }

    pub fn add(&mut self, last_index: Index, bytes: u64) {
        assert!(!self.full(), "in-flight window overflow");
        debug_assert!(self.messages.back().is_none_or(|&(i, _)| i < last_index), "in-flight indexes must grow");
        self.messages.push_back((last_index, bytes));
        self.bytes += bytes;
    }

    /// Forgets every message whose entries are all at or below `index`.
    pub fn free_to(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.messages.front() {
            if last > index {
                break;
            }
            self.messages.pop_front();
            self.bytes -= bytes;
        }
    }

    /// Frees the oldest message: a heartbeat response proves the follower is
    /// alive, so a window stuck on lost messages can move again.
    pub fn free_first(&mut self) {
        if let Some((_, bytes)) = self.messages.pop_front() {
            self.bytes -= bytes;
        }
    }

    pub fn reset(&mut self) {
        self.messages.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// Replication progress of one member, kept by the leader.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be in the follower's log (durably).
    pub matched: Index,
    /// Next index to send.
    pub next: Index,
    pub state: ProgressState,
    /// In `Probe`, set after sending one AppendEntries; cleared by its reply or
    /// by the next heartbeat reply.
    pub probe_sent: bool,
    pub inflights: Inflights,
    /// Heard from within the current CheckQuorum period.
    pub recent_active: bool,
    /// Heard from within the CheckQuorum period before the current one.
    /// With `recent_active`, says whether the follower is answering without
    /// the gap right after a period starts, when nobody has answered yet.
    pub active_last_period: bool,
    /// The index of the snapshot this follower was last sent, from the end
    /// of its transfer until the follower acknowledges it (or shows it lacks
    /// it); 0 otherwise. Meanwhile the follower installs it, and may be
    /// silent for as long as that takes.
    pub snapshot_sent: Index,
}

impl Progress {
    pub fn new(next: Index, max_inflight_messages: usize, max_inflight_bytes: u64) -> Progress {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::new(max_inflight_messages, max_inflight_bytes),
            recent_active: false,
            active_last_period: false,
            snapshot_sent: 0,
        }
    }

    /// Whether the follower answered within the last one or two CheckQuorum
    /// periods.
    pub fn answering(&self) -> bool {
        self.recent_active || self.active_last_period
    }

    /// A CheckQuorum period begins: nobody has answered in it yet.
    pub fn start_period(&mut self) {
        self.active_last_period = self.recent_active;
        self.recent_active = false;
    }

    /// Probes from the follower's last known match; after a snapshot was
    /// sent, from past the snapshot: the follower most likely holds it (or
    /// is installing it), and probing lower would find the leader's log
    /// compacted there and send another snapshot while the first is still
    /// being installed. A follower that lacks it rejects, and the probe
    /// falls back.
    pub fn become_probe(&mut self) {
        let after = match self.state {
            ProgressState::Snapshot { pending } => pending,
            _ => 0,
        };
        self.state = ProgressState::Probe;
        self.next = self.matched.max(after) + 1;
        self.snapshot_sent = after.max(self.snapshot_sent);
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next = self.matched + 1;
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// A snapshot of at least `pending` is being sent; nothing else goes out
    /// until it lands or fails.
    pub fn become_snapshot(&mut self, pending: Index) {
        self.state = ProgressState::Snapshot { pending };
        self.snapshot_sent = 0;
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Whether the leader should hold back AppendEntries with new entries.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot { .. } => true,
        }
    }

    /// Records that entries up to `last_index` were just sent.
    pub fn sent_entries(&mut self, last_index: Index, bytes: u64) {
        match self.state {
            ProgressState::Replicate => {
                self.next = last_index + 1;
                self.inflights.add(last_index, bytes);
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot { .. } => {}
        }
    }

    /// A successful AppendEntries response up to `index`. Returns whether it
    /// told us something new.
    pub fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.matched;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        if self.matched >= self.snapshot_sent {
            self.snapshot_sent = 0;
        }
        self.next = self.next.max(index + 1);
        updated
    }

    /// A rejection of the AppendEntries whose `prev_log_index` was `rejected`.
    /// `match_hint` is the highest index that may still match. Returns false
    /// for a stale rejection (of a message already superseded).
    pub fn maybe_decrease_to(&mut self, rejected: Index, match_hint: Index) -> bool {
        if self.state == ProgressState::Replicate {
            // Rejections at or below the known match are stale: the follower
            // already accepted entries there.
            if rejected <= self.matched {
                return false;
            }
            self.next = self.matched + 1;
            return true;
        }
        if matches!(self.state, ProgressState::Snapshot { .. }) {
            return false;
        }
        // In Probe only the rejection of the message just sent counts.
        if self.next == 0 || self.next - 1 != rejected {
            return false;
        }
        self.next = rejected.min(match_hint + 1).max(self.matched + 1);
        self.probe_sent = false;
        if self.next <= self.snapshot_sent {
            // It lacks the snapshot (its transfer or install failed).
            self.snapshot_sent = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_fill_by_count_and_by_bytes_and_free_in_order() {
        let mut window = Inflights::new(3, 1000);
        window.add(5, 100);
        window.add(9, 100);
        assert!(!window.full());
        window.add(12, 100);
        assert!(window.full());
        window.free_to(9);
        assert_eq!(window.len(), 1);
        assert!(!window.full());
        window.add(20, 950);
        assert!(window.full(), "1050 bytes in flight exceeds the 1000-byte window");
        window.free_first();
        window.free_first();
        assert!(window.is_empty());
        assert!(!window.full());
    }

    #[test]
    fn probe_decrease_ignores_stale_rejections_and_uses_the_hint() {
        let mut pr = Progress::new(11, 4, 1 << 20);
        // Stale: we did not send prev_log_index 7.
        assert!(!pr.maybe_decrease_to(7, 3));
        assert_eq!(pr.next, 11);
        // The follower's log ends at 4 (hint), we sent prev 10.
        assert!(pr.maybe_decrease_to(10, 4));
        assert_eq!(pr.next, 5);
        assert!(!pr.probe_sent);
    }

    #[test]
    fn replicate_decrease_falls_back_to_match() {
        let mut pr = Progress::new(1, 4, 1 << 20);
        pr.maybe_update(5);
        pr.become_replicate();
        pr.sent_entries(9, 10);
        assert_eq!(pr.next, 10);
        assert!(!pr.maybe_decrease_to(4, 0), "rejections below match are stale");
        assert!(pr.maybe_decrease_to(8, 0));
        assert_eq!(pr.next, 6);
    }
}
