//! Append throughput of the fjall store with fsync, next to a raw
//! fdatasync of the same bytes on the same disk: how close the store gets to
//! the disk's floor. 256-byte entries, batches of 1, 16 and 256 entries, each
//! batch one `persist` (entries plus hard state, one fdatasync).
//!
//! Run with `cargo bench -p raft-host --bench storage`.

use bytes::Bytes;
use raft_host::raft::{Entry, EntryKind, HardState};
use raft_host::storage::{Identity, Store, StoreOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const ENTRY_BYTES: usize = 256;
const RUN_FOR: Duration = Duration::from_secs(3);

struct Figure {
    entries: u64,
    bytes: u64,
    syncs: u64,
    elapsed: Duration,
}

impl Figure {
    fn row(&self, name: &str, batch: usize) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "{:<8} {:>6} {:>14.0} {:>10.1} {:>14.0}",
            name,
            batch,
            self.entries as f64 / secs,
            self.bytes as f64 / secs / 1e6,
            secs * 1e6 / self.syncs as f64
        );
    }
}

fn fjall_appends(dir: &Path, batch: usize, run_for: Duration) -> Figure {
    let store = Store::open(dir, &Identity::new("bench", 1), &StoreOptions::default()).expect("store opens");
    let payload = Bytes::from(vec![0x5a; ENTRY_BYTES]);
    let mut next = 1u64;
    let (mut syncs, started) = (0u64, Instant::now());
    while started.elapsed() < run_for {
        let entries: Vec<Entry> = (next..next + batch as u64)
            .map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: payload.clone() })
            .collect();
        next += batch as u64;
        let hard_state = HardState { term: 1, vote: Some(1), commit: next - 1 };
        store.persist(&entries, Some(&hard_state)).expect("persist");
        syncs += 1;
    }
    let entries = next - 1;
    Figure { entries, bytes: entries * ENTRY_BYTES as u64, syncs, elapsed: started.elapsed() }
}

fn raw_appends(dir: &Path, batch: usize, run_for: Duration) -> Figure {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("raw.log")).expect("open");
    let chunk = vec![0x5a; ENTRY_BYTES * batch];
    let (mut syncs, started) = (0u64, Instant::now());
    while started.elapsed() < run_for {
        file.write_all(&chunk).expect("write");
        file.sync_data().expect("fdatasync");
        syncs += 1;
    }
    let entries = syncs * batch as u64;
    Figure { entries, bytes: entries * ENTRY_BYTES as u64, syncs, elapsed: started.elapsed() }
}

fn main() {
    // Under the target directory, so on the real disk (never a tmpfs).
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let quick = !std::env::args().any(|a| a == "--bench");
    let run_for = if quick { Duration::from_millis(100) } else { RUN_FOR };
    println!("appends of {ENTRY_BYTES}-byte entries, one fdatasync per batch, {} s per row", run_for.as_secs_f64());
    println!("{:<8} {:>6} {:>14} {:>10} {:>14}", "writer", "batch", "entries/s", "MB/s", "µs/sync");
    for batch in [1, 16, 256] {
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        raw_appends(dir.path(), batch, run_for).row("raw", batch);
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        fjall_appends(dir.path(), batch, run_for).row("fjall", batch);
    }
}
