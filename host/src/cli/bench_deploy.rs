//! `raft-host bench-deploy`: how long a hot deploy takes and what it costs
//! the writes around it. Closed-loop clients write kv puts throughout; the
//! steady phase gives the baseline latency; then, for each module size, the
//! built-in kv guest padded to that size (a custom section, so every size
//! has its own hash and the guest behaves the same) is deployed for `kv`
//! and activated, and the writes during the deploy are measured apart.

use super::bench::{ClientContext, Load, errors_of, latency_histogram, percentiles, print_errors, run_client};
use super::client::Target;
use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use raft_host::client::{ClusterClient, Consistency};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchDeployArgs {
    #[command(flatten)]
    target: Target,
    /// Module sizes to deploy, in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,30")]
    sizes_mb: Vec<u64>,
    /// Concurrent closed-loop writers.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of writes before the first deploy and between deploys.
    #[arg(long, default_value_t = 5)]
    steady_secs: u64,
    /// Print one JSON object instead of a report.
    #[arg(long)]
    json: bool,
}

/// The kv guest with a custom section that brings it to `size` bytes; the
/// section's contents depend on `size`, so each size is a new version.
pub fn padded_module(base: &[u8], size: usize) -> Vec<u8> {
    const NAME: &[u8] = b"raft-host-bench-padding";
    let mut module = base.to_vec();
    // Section id, then the section size, then the name (length-prefixed), then the payload.
    let overhead = 1 + 5 + 1 + NAME.len();
    let payload_len = size.saturating_sub(base.len() + overhead).max(1);
    let section_len = 1 + NAME.len() + payload_len;
    module.push(0);
    module.extend_from_slice(&leb128_padded(section_len as u32));
    module.push(NAME.len() as u8);
    module.extend_from_slice(NAME);
    let mut state = size as u64 | 1;
    module.extend((0..payload_len).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    }));
    module
}

/// A 5-byte unsigned LEB128 (padded, which the format allows), so the
/// overhead does not depend on the value.
fn leb128_padded(value: u32) -> [u8; 5] {
    let mut out = [0u8; 5];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = ((value >> (7 * i)) & 0x7f) as u8 | if i < 4 { 0x80 } else { 0 };
    }
    out
}

pub fn bench_deploy(args: BenchDeployArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.sizes_mb.is_empty() {
        bail!("--clients and --sizes-mb must not be empty");
    }
    let runtime = super::runtime()?;
    let steady = Duration::from_secs(args.steady_secs.max(1));
    let phases = 1 + args.sizes_mb.len();
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut deploys = Vec::new();
    let results = runtime.block_on(async {
        let mut tasks = Vec::new();
        let values = Arc::new(super::bench::random_values(super::bench::VALUE_POOL, 256));
        for id in 0..args.clients {
            let mut client = args.target.client()?;
            client.deadline = Duration::ZERO;
            let ctx = ClientContext {
                id: id as u64,
                state_machine: "kv".into(),
                values: values.clone(),
                next_value: AtomicUsize::new(id),
                keys: 100_000,
                read_ratio: 0.0,
                consistency: Consistency::Linearizable,
                done: Arc::new(AtomicU64::new(0)),
                failed: failed.clone(),
                stop: stop.clone(),
                phase: phase.clone(),
                phases,
            };
            tasks.push(tokio::spawn(run_client(Load::Raft(client), ctx)));
        }
        let mut deployer = args.target.client()?;
        deployer.deadline = Duration::from_secs(600);
        tokio::time::sleep(steady).await;
        for (number, &mb) in args.sizes_mb.iter().enumerate() {
            let module = padded_module(raft_guests::KV, (mb as usize) << 20);
            phase.store(1 + number, Ordering::Relaxed);
            let started = Instant::now();
            let last = deployer.deploy("kv", &module, true, |_| {}).await.context("deploy failed")?;
            let activated = started.elapsed();
            let everywhere = wait_active_everywhere(&args.target, &last.module_hash, started).await?;
            phase.store(0, Ordering::Relaxed);
            deploys.push((module.len(), activated, everywhere, last.index));
            tokio::time::sleep(steady).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.context("a client task failed")??);
        }
        anyhow::Ok(results)
    })?;

    let mut per_phase: Vec<Histogram<u64>> = (0..phases).map(|_| latency_histogram()).collect::<Result<_, _>>()?;
    for result in &results {
        for (merged, phase) in per_phase.iter_mut().zip(&result.writes) {
            merged.add(phase).context("merging histograms")?;
        }
    }
    let (errors, first_error) = errors_of(&results);
    let rows: Vec<serde_json::Value> = deploys
        .iter()
        .zip(&per_phase[1..])
        .map(|((bytes, activated, everywhere, index), during)| {
            json!({
                "module_bytes": bytes,
                "activated_ms": activated.as_millis() as u64,
                "active_on_all_members_ms": everywhere.map(|d| d.as_millis() as u64),
                "activation_index": index,
                "writes_during": percentiles(during),
            })
        })
        .collect();
    let summary = json!({
        "clients": args.clients,
        "steady": percentiles(&per_phase[0]),
        "deploys": rows,
        "errors": errors,
        "first_error": first_error,
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    let steady = &per_phase[0];
    println!(
        "{} writers; steady writes: p50 {} µs, p99 {} µs ({} writes)",
        args.clients,
        steady.value_at_quantile(0.5),
        steady.value_at_quantile(0.99),
        steady.len()
    );
    for ((bytes, activated, everywhere, index), during) in deploys.iter().zip(&per_phase[1..]) {
        println!(
            "deploy of {:.1} MiB: active at index {index} after {:.2} s, on every member after {}; writes meanwhile p50 {} µs, p99 {} µs ({} writes)",
            *bytes as f64 / (1u64 << 20) as f64,
            activated.as_secs_f64(),
            everywhere.map_or("(a member did not answer)".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            during.value_at_quantile(0.5),
            during.value_at_quantile(0.99),
            during.len()
        );
    }
    print_errors(errors, first_error.as_deref());
    Ok(())
}

/// Time from `started` until every member of the target list reports `hash`
/// active for kv (`None` if one stops answering for 30 s).
async fn wait_active_everywhere(target: &Target, hash: &str, started: Instant) -> anyhow::Result<Option<Duration>> {
    let mut client: ClusterClient = target.client()?;
    let members = target.len();
    let mut done = vec![false; members];
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.iter().any(|d| !d) {
        for (at, finished) in done.iter_mut().enumerate().filter(|(_, d)| !**d) {
            if let Ok(status) = client.status_of(at).await {
                *finished = status.state_machines.iter().any(|m| m.name == "kv" && m.module_hash == hash);
            }
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Some(started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_host::runtime::{Limits, Runtime};

    #[test]
    fn a_padded_module_has_the_size_asked_for_and_still_loads() {
        let size = 1 << 20;
        let padded = padded_module(raft_guests::KV, size);
        assert_eq!(padded.len(), size);
        assert_ne!(padded_module(raft_guests::KV, size + 1)[..size], padded[..], "each size is its own version");
        let runtime = Runtime::new(Limits::default()).expect("runtime");
        runtime.load(&padded).expect("a custom section changes nothing the runtime checks");
    }
}
