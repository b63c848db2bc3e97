//! The apply stage of a member, in the shape `raft-host bench` drives it:
//! kv puts of 256-byte values to random keys over a state of 100,000 keys,
//! 32 commands per batch, each batch's writes, history records and applied
//! position committed to the store. Prints the CPU per command for each
//! state-cache size, so the cache's worth is read off one process rather
//! than a noisy cluster.
//!
//! Run with `cargo bench -p raft-host --bench apply`; `RAFT_APPLY_BENCH_SECS`
//! sets the seconds per row (default 4), `RAFT_APPLY_BENCH_CACHE` runs one
//! row with that state cache size in bytes (for a profiler). The puts do
//! not ask for the value they replace, as `raft-host bench`'s do (so the
//! history looks it up); `RAFT_APPLY_BENCH_PREVIOUS=1` asks for it (the
//! guest reads it, and the history takes it from that read).

use raft_host::runtime::{EntryInfo, Limits, Machine, Runtime};
use raft_host::storage::{ApplyBatch, Durability, Identity, Store, StoreMemory, StoreOptions};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The same allocator as the raft-host binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: u64 = 100_000;
const VALUE_BYTES: usize = 256;
const BATCH: usize = 32;

fn command(key: u64, value: &str, return_previous: bool) -> Vec<u8> {
    format!(r#"{{"op":"put","key":"key-{key:06}","value":"{value}","return_previous":{return_previous}}}"#).into_bytes()
}

/// Applies batches of random puts for `run_for`; returns ns per command of
/// this thread's CPU, of the whole process's (fjall's flushes and
/// compactions run on threads of their own) and of wall time.
fn run(
    store: &Store,
    machine: &mut Machine,
    (index, return_previous): (&mut u64, bool),
    run_for: Duration,
    rng: &mut impl Rng,
) -> [f64; 3] {
    // Random letters and digits: real values do not compress away.
    let values: Vec<String> =
        (0..1024).map(|_| (0..VALUE_BYTES).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect()).collect();
    let (mut count, started) = (0u64, Instant::now());
    let (thread_started, process_started) = (cpu("/proc/thread-self/stat"), cpu("/proc/self/stat"));
    while started.elapsed() < run_for {
        let commands: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| command(rng.random_range(0..KEYS), &values[rng.random_range(0..values.len())], return_previous))
            .collect();
        let first = *index + 1;
        let entries: Vec<(EntryInfo, &[u8])> = commands
            .iter()
            .enumerate()
            .map(|(i, c)| (EntryInfo { index: first + i as u64, term: 1, timestamp_ms: first }, c.as_slice()))
            .collect();
        *index += BATCH as u64;
        let mut batch = raft_host::runtime::WriteBatch::default();
        for (entry, command) in &entries {
            let outcome = machine.apply(*entry, command, &mut batch).expect("runtime works");
            assert!(outcome.is_ok(), "{outcome:?}");
        }
        let (writes, changes) = batch.into_writes("kv");
        let apply = ApplyBatch {
            applied_index: *index,
            applied_term: 1,
            clock_ms: first,
            writes,
            changes,
            ..ApplyBatch::default()
        };
        store.apply(&apply).expect("store commit");
        count += BATCH as u64;
    }
    let per_command = |d: Duration| d.as_nanos() as f64 / count as f64;
    [
        per_command(cpu("/proc/thread-self/stat") - thread_started),
        per_command(cpu("/proc/self/stat") - process_started),
        per_command(started.elapsed()),
    ]
}

/// CPU time used, from a `stat` file of /proc.
fn cpu(stat: &str) -> Duration {
    let stat = std::fs::read_to_string(stat).unwrap_or_default();
    // utime and stime are fields 14 and 15, in clock ticks (100 per second
    // on Linux), counted after the command name's closing parenthesis.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |at: usize| fields.get(at).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let seconds = std::env::var("RAFT_APPLY_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let run_for = if quick { Duration::from_millis(200) } else { Duration::from_secs(seconds) };
    let return_previous = std::env::var("RAFT_APPLY_BENCH_PREVIOUS").is_ok_and(|v| v == "1");
    let answers = match return_previous {
        true => "answering the previous value",
        false => "not answering the previous value",
    };
    println!(
        "apply stage: kv puts of {VALUE_BYTES} B over {KEYS} keys ({answers}), {BATCH} per batch, history kept, no fsync"
    );
    println!(
        "{:<14} {:>16} {:>18} {:>12} {:>12}",
        "state cache", "apply CPU ns/cmd", "process CPU ns/cmd", "wall ns/cmd", "cache bytes"
    );
    let sizes = match std::env::var("RAFT_APPLY_BENCH_CACHE").ok().and_then(|s| s.parse().ok()) {
        Some(bytes) => vec![bytes],
        None => vec![0u64, 8 << 20, 32 << 20],
    };
    for cache_bytes in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = StoreMemory { state_cache_bytes: cache_bytes, ..StoreMemory::default() };
        let mut options = StoreOptions { durability: Durability::UnsafeNoSync, memory, ..StoreOptions::default() };
        if std::env::var("RAFT_APPLY_BENCH_HISTORY").is_ok_and(|v| v == "0") {
            options.history.entries = 0;
        }
        let store = Store::open(dir.path(), &Identity::new("bench", 1), &options).expect("store");
        let runtime = Arc::new(Runtime::new(Limits::default()).expect("runtime"));
        let module = runtime.load(raft_guests::KV).expect("kv guest loads");
        let mut machine = Machine::new(runtime, module, "kv", store.clone());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut index = 0;
        // Every key written once, then as long again to settle flushes.
        run(&store, &mut machine, (&mut index, return_previous), run_for * 2, &mut rng);
        let [apply, process, wall] = run(&store, &mut machine, (&mut index, return_previous), run_for, &mut rng);
        let label = if cache_bytes == 0 { "off".to_string() } else { format!("{} MiB", cache_bytes >> 20) };
        println!("{label:<14} {apply:>16.0} {process:>18.0} {wall:>12.0} {:>12}", store.state_cache_bytes());
    }
}
