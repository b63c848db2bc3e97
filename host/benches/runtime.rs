//! Apply throughput of the kv guest through WebAssembly against the same kv
//! logic compiled natively, both reading the same fjall store and writing to
//! an overlay. Two figures each: the calls alone (the cost of the WASM
//! boundary and the guest itself), and the whole apply stage as a member
//! runs it, where each batch's writes are also committed to the store.
//!
//! Run with `cargo bench -p raft-host --bench runtime`.

use raft_host::runtime::{EntryInfo, Limits, Machine, Runtime};
use raft_host::storage::{ApplyBatch, Durability, Identity, StateWrite, Store, StoreOptions};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

// The same allocator as the raft-host binary, so both paths allocate as they
// do in a member.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Command {
    Put { key: String, value: String },
}

/// The kv guest's `put`, natively: parse, read the previous value, write to
/// the overlay, encode the reply.
fn native_put(store: &Store, overlay: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>, command: &[u8]) -> Vec<u8> {
    let Command::Put { key, value } = serde_json::from_slice(command).expect("valid command");
    let previous = match overlay.get(key.as_bytes()) {
        Some(v) => v.clone(),
        None => store.state_get("kv", key.as_bytes()).expect("read"),
    };
    overlay.insert(key.into_bytes(), Some(value.into_bytes()));
    let previous = previous.map(|p| String::from_utf8(p).expect("utf-8"));
    serde_json::to_vec(&serde_json::json!({ "previous": previous })).expect("reply")
}

fn commands(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| format!(r#"{{"op":"put","key":"key-{:06}","value":"{}"}}"#, i % 10_000, "v".repeat(64)).into_bytes())
        .collect()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let run_for = if quick { Duration::from_millis(100) } else { Duration::from_secs(3) };
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions { durability: Durability::UnsafeNoSync, ..StoreOptions::default() };
    let store = Store::open(dir.path(), &Identity::new("bench", 1), &options).expect("store");
    let runtime = Arc::new(Runtime::new(Limits::default()).expect("runtime"));
    let started = Instant::now();
    let module = runtime.load(raft_guests::KV).expect("kv guest loads");
    println!("kv guest: {} bytes, compiled in {:.0} ms", raft_guests::KV.len(), started.elapsed().as_secs_f64() * 1e3);
    let mut machine = Machine::new(runtime, module, "kv", store.clone());
    let pool = commands(4096);

    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>10}",
        "apply path", "wasm ns/cmd", "native ns/cmd", "wasm cmd/s", "wasm/native"
    );
    // One applied index for both paths: the store refuses to move it back.
    let mut index = 1u64;
    for commit in [false, true] {
        for batch in [1usize, 64] {
            let (mut wasm_count, wasm_started) = (0u64, Instant::now());
            while wasm_started.elapsed() < run_for {
                let chunk: Vec<(EntryInfo, &[u8])> = (0..batch)
                    .map(|i| {
                        index += 1;
                        (
                            EntryInfo { index, term: 1, timestamp_ms: index },
                            pool[(index as usize + i) % pool.len()].as_slice(),
                        )
                    })
                    .collect();
                let (outcomes, writes) = machine.apply_batch(&chunk).expect("runtime works");
                assert!(outcomes.iter().all(Result::is_ok));
                if commit {
                    commit_writes(&store, index, writes);
                }
                wasm_count += batch as u64;
            }
            let wasm_ns = wasm_started.elapsed().as_nanos() as f64 / wasm_count as f64;

            let (mut native_count, native_started) = (0u64, Instant::now());
            while native_started.elapsed() < run_for {
                let mut overlay = BTreeMap::new();
                for _ in 0..batch {
                    index += 1;
                    std::hint::black_box(native_put(&store, &mut overlay, &pool[index as usize % pool.len()]));
                }
                if commit {
                    let writes = overlay
                        .into_iter()
                        .map(|(key, value)| StateWrite { state_machine: "kv".into(), key, value })
                        .collect();
                    commit_writes(&store, index, writes);
                }
                native_count += batch as u64;
            }
            let native_ns = native_started.elapsed().as_nanos() as f64 / native_count as f64;
            let what = if commit { "+ store commit" } else { "calls only" };
            println!(
                "{:<34} {:>12.0} {:>12.0} {:>12.0} {:>10.2}",
                format!("{batch} cmd/batch, {what}"),
                wasm_ns,
                native_ns,
                1e9 / wasm_ns,
                wasm_ns / native_ns
            );
        }
    }
}

/// Commits a batch's writes as the apply task does (without the log's
/// fsync, which the apply stage does not pay either).
fn commit_writes(store: &Store, applied_index: u64, writes: Vec<StateWrite>) {
    let batch = ApplyBatch { applied_index, applied_term: 1, clock_ms: applied_index, writes, ..ApplyBatch::default() };
    store.apply(&batch).expect("store commit");
}
