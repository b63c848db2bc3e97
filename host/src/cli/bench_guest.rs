//! `raft-host bench-guest`: what a state machine module costs, measured in
//! this process: its size, the first compile, a load from the compiled
//! cache (what a restart pays), and apply calls per second through the
//! runtime, next to the built-in Rust kv guest running the same commands.

use anyhow::{Context, bail};
use clap::Args;
use raft_host::runtime::{EntryInfo, Limits, Machine, Runtime};
use raft_host::storage::{ApplyBatch, Durability, Identity, Store, StoreOptions};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchGuestArgs {
    /// The component (.wasm).
    path: PathBuf,
    /// The command applied, `{i}` replaced by a counter. The default is a kv
    /// put; a counter guest takes '{"op":"add","by":1}'.
    #[arg(long, default_value = r#"{"op":"put","key":"k{i}","value":"v{i}"}"#)]
    command: String,
    /// Seconds of applies per module.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Do not run the built-in Rust kv guest for comparison.
    #[arg(long)]
    no_baseline: bool,
    /// Print one JSON object instead of a report.
    #[arg(long)]
    json: bool,
}

/// What one module measured.
struct Figures {
    bytes: usize,
    compile: Duration,
    from_cache: Duration,
    applies_per_sec: f64,
}

pub fn bench_guest(args: BenchGuestArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.path).with_context(|| format!("reading {}", args.path.display()))?;
    let seconds = Duration::from_secs(args.seconds.max(1));
    let guest = measure(&bytes, &args.command, seconds).with_context(|| format!("{}", args.path.display()))?;
    let baseline = if args.no_baseline { None } else { Some(measure(raft_guests::KV, &args.command, seconds)?) };
    let as_json = |f: &Figures| {
        json!({
            "bytes": f.bytes,
            "compile_ms": f.compile.as_millis() as u64,
            "load_from_cache_ms": f.from_cache.as_millis() as u64,
            "applies_per_sec": f.applies_per_sec,
        })
    };
    if args.json {
        println!("{}", json!({ "guest": as_json(&guest), "rust_kv": baseline.as_ref().map(as_json) }));
        return Ok(());
    }
    let line = |name: &str, f: &Figures| {
        println!(
            "{name}: {:.1} MiB, compiled in {:.1} s, loaded from the cache in {} ms, {:.0} applies/s",
            f.bytes as f64 / (1u64 << 20) as f64,
            f.compile.as_secs_f64(),
            f.from_cache.as_millis(),
            f.applies_per_sec
        );
    };
    line(&args.path.display().to_string(), &guest);
    if let Some(baseline) = &baseline {
        line("built-in Rust kv", baseline);
        println!("apply rate against the Rust kv guest: {:.2}x", guest.applies_per_sec / baseline.applies_per_sec);
    }
    Ok(())
}

fn measure(bytes: &[u8], template: &str, seconds: Duration) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let options = StoreOptions { durability: Durability::UnsafeNoSync, ..StoreOptions::default() };
    let store = Store::open(dir.path(), &Identity::new("bench-guest", 1), &options)?;

    let started = Instant::now();
    Runtime::new(Limits::default())?.load_cached(bytes, Some(&store))?;
    let compile = started.elapsed();
    let runtime = Arc::new(Runtime::new(Limits::default())?);
    let started = Instant::now();
    let module = runtime.load_cached(bytes, Some(&store))?;
    let from_cache = started.elapsed();
    if runtime.load_counts() != (0, 1) {
        bail!("the second load did not come from the compiled cache");
    }

    let mut machine = Machine::new(runtime, module, "bench", store.clone());
    let started = Instant::now();
    let mut applied = 0u64;
    while started.elapsed() < seconds {
        let command = template.replace("{i}", &applied.to_string());
        let index = applied + 1;
        let entry = EntryInfo { index, term: 1, timestamp_ms: 1_700_000_000_000 + index };
        let (outcomes, writes) = machine.apply_batch(&[(entry, command.as_bytes())])?;
        if let Some(Err(error)) = outcomes.first() {
            bail!("the guest refused {command}: {error}");
        }
        store.apply(&ApplyBatch { applied_index: index, applied_term: 1, writes, ..ApplyBatch::default() })?;
        applied += 1;
    }
    let applies_per_sec = applied as f64 / started.elapsed().as_secs_f64();
    Ok(Figures { bytes: bytes.len(), compile, from_cache, applies_per_sec })
}
