//! Throughput of the consensus core alone: 3 in-process nodes, in-memory
//! logs, a perfect synchronous network. No disk, no gRPC, no WebAssembly:
//! this is the ceiling the core puts on the whole host.
//!
//! Prints committed proposals per second for one proposer waiting for each
//! write (one entry per proposal), and for proposals of 64 entries.
//! Run with `cargo bench -p raft-core --bench core`.

use bytes::Bytes;
use raft_core::LocalCluster;
use std::time::{Duration, Instant};

const NODES: u64 = 3;
const PAYLOAD_BYTES: usize = 256;
const RUN_FOR: Duration = Duration::from_secs(3);

struct Figure {
    proposals: u64,
    entries: u64,
    elapsed: Duration,
}

fn run(batch: usize) -> Figure {
    let mut cluster = LocalCluster::new(NODES, 7).expect("cluster starts");
    cluster.elect(100).expect("election runs").expect("a leader is elected");
    let payload = Bytes::from(vec![0xAB; PAYLOAD_BYTES]);
    let (mut proposals, mut entries) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < RUN_FOR {
        // Check the clock every 256 writes to keep it off the measured path.
        for _ in 0..256 {
            let batch_payloads = vec![payload.clone(); batch];
            cluster.write(batch_payloads).expect("write commits");
            proposals += 1;
            entries += batch as u64;
        }
    }
    let elapsed = started.elapsed();
    assert!(cluster.converged(), "every replica applied the same entries");
    Figure { proposals, entries, elapsed }
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent: keep
    // that quick.
    if !std::env::args().any(|a| a == "--bench") {
        let figure = run(1);
        assert!(figure.entries > 0);
        println!("core bench smoke run: ok");
        return;
    }
    println!(
        "consensus core, {NODES} in-process nodes, in-memory log, {PAYLOAD_BYTES}-byte entries, {}s per row",
        RUN_FOR.as_secs()
    );
    println!("{:<34} {:>14} {:>16} {:>12}", "workload", "proposals/s", "entries/s", "µs/proposal");
    for (name, batch) in [("one proposer, 1 entry per write", 1), ("one proposer, 64 entries per write", 64)] {
        let f = run(batch);
        let secs = f.elapsed.as_secs_f64();
        println!(
            "{:<34} {:>14.0} {:>16.0} {:>12.2}",
            name,
            f.proposals as f64 / secs,
            f.entries as f64 / secs,
            secs * 1e6 / f.proposals as f64
        );
    }
}
