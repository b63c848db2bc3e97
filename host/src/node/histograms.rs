//! The node's latency and batch-size histograms, shared by the core task
//! (persist, propose-to-commit) and the apply task (apply batches), read by
//! the metrics endpoint.

use crate::histogram::{Histogram, write_header};

/// What the node measures on the write path.
#[derive(Debug)]
pub struct NodeHistograms {
    /// One append of entries and hard state to the log, fsync included.
    pub persist: Histogram,
    /// Entries per append (the group commit's batch size).
    pub persist_entries: Histogram,
    /// From a write's proposal on the leader to its commit (a quorum holds it).
    pub propose_to_commit: Histogram,
    /// One batch of committed entries through the guests and into the store.
    pub apply_batch: Histogram,
    /// Entries per applied batch.
    pub apply_batch_entries: Histogram,
    /// Linearizable reads served by one ReadIndex round.
    pub read_index_reads: Histogram,
}

impl Default for NodeHistograms {
    fn default() -> NodeHistograms {
        NodeHistograms {
            persist: Histogram::durations(),
            persist_entries: Histogram::sizes(),
            propose_to_commit: Histogram::durations(),
            apply_batch: Histogram::durations(),
            apply_batch_entries: Histogram::sizes(),
            read_index_reads: Histogram::sizes(),
        }
    }
}

impl NodeHistograms {
    /// Appends every histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let series: [(&Histogram, &str, &str); 6] = [
            (
                &self.persist,
                "raft_host_log_persist_seconds",
                "One append to the log (entries and hard state), fsync included.",
            ),
            (
                &self.persist_entries,
                "raft_host_log_persist_entries",
                "Entries per append to the log (group commit batch size).",
            ),
            (
                &self.propose_to_commit,
                "raft_host_propose_to_commit_seconds",
                "From a proposal on the leader to its commit by a quorum.",
            ),
            (
                &self.apply_batch,
                "raft_host_apply_batch_seconds",
                "One batch of committed entries applied through the guests and written to the store.",
            ),
            (&self.apply_batch_entries, "raft_host_apply_batch_entries", "Entries per applied batch."),
            (
                &self.read_index_reads,
                "raft_host_read_index_reads",
                "Linearizable reads served by one ReadIndex round (reads gathered while the last round started).",
            ),
        ];
        for (histogram, name, help) in series {
            write_header(out, name, help);
            histogram.render(out, name, "");
        }
    }
}
