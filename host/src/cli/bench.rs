//! `raft-host bench`: closed-loop clients over real gRPC against a running
//! cluster. Each client sends its next request when the last is answered;
//! every answer's latency goes into a histogram, every failure is counted
//! and shown.

use super::client::{ConsistencyArg, Target};
use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use raft_host::client::{ClusterClient, Consistency, WatchSpec, outcome_of};
use raft_host::wire::etcd_pb::PutRequest;
use raft_host::wire::etcd_pb::kv_client::KvClient;
use serde_json::json;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    target: Target,
    /// The state machine to drive (kv commands are generated).
    #[arg(long = "sm", default_value = "kv")]
    state_machine: String,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Connections the clients share, as a connection pool would (default:
    /// one per client). Each client still waits for its own answer.
    #[arg(long)]
    connections: Option<usize>,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Bytes per written value (random letters and digits, which do not
    /// compress away).
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys written and read.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Fraction of requests that are reads (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    read_ratio: f64,
    /// Consistency of the reads.
    #[arg(long, value_enum, default_value = "linearizable")]
    consistency: ConsistencyArg,
    /// Also measure this disk's own fdatasync latency, with a file in this
    /// directory, so write latency can be read against the physical floor.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Which client path: `batched` (writes and reads of every client
    /// sharing a connection coalesced on its `Batch` stream), `unary` (one
    /// call each), or `both`, one run after the other on the same cluster.
    #[arg(long, value_enum, default_value = "both")]
    path: PathArg,
    /// Print one JSON object per path instead of a report.
    #[arg(long)]
    json: bool,
    /// Drive an etcd cluster instead: `--addr` lists its client endpoints
    /// (host:port, plaintext), and the same closed-loop clients send etcd
    /// `Put`s of the same keys and values over the same number of shared
    /// connections, for a side-by-side figure (`tests/compare-etcd.sh`).
    /// CPU and memory are those of every `etcd` process on this machine.
    #[arg(long)]
    etcd: bool,
    /// Watchers of the state machine's every change during the run, spread
    /// over the members (`WatchChanges`): the report adds the changes
    /// delivered per second and how far behind the last write they ended.
    #[arg(long, default_value_t = 0)]
    watchers: usize,
}

/// See [`BenchArgs::path`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PathArg {
    Batched,
    Unary,
    Both,
}

/// What one client saw. Writes are kept per phase (a number the driver of
/// the run sets, such as "during a deploy"); a plain bench has one phase.
pub(super) struct ClientResult {
    pub writes: Vec<Histogram<u64>>,
    pub reads: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Answers a client gathers before adding their latencies to its
/// histograms and their count to the run's. Each histogram spans ~220 KB
/// and a client records once every few ms, so one at a time nearly every
/// record missed the cache, and the shared count bounced between cores:
/// with 256 clients, ~15% of the bench's own CPU. In runs the hot counts
/// stay cached; 64 keeps the progress line current.
const LATENCIES_PER_FLUSH: usize = 64;

impl ClientResult {
    /// Adds `pending` (write phase, or `None` for a read; microseconds) to
    /// the histograms and its count to `done`, and empties it.
    fn record(&mut self, pending: &mut Vec<(Option<usize>, u64)>, done: &AtomicU64) {
        done.fetch_add(pending.len() as u64, Ordering::Relaxed);
        for (phase, micros) in pending.drain(..) {
            let histogram = match phase {
                Some(phase) => &mut self.writes[phase],
                None => &mut self.reads,
            };
            histogram.saturating_record(micros);
        }
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.etcd {
        return bench_etcd(&args);
    }
    let paths: &[bool] = match args.path {
        PathArg::Batched => &[true],
        PathArg::Unary => &[false],
        PathArg::Both => &[true, false],
    };
    for &batching in paths {
        bench_path(&args, batching)?;
    }
    Ok(())
}

/// The number of connections the run's clients share, once its settings
/// are checked.
fn checked_connections(args: &BenchArgs) -> anyhow::Result<usize> {
    if args.clients == 0 || args.duration_secs == 0 {
        bail!("--clients and --duration-secs must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.read_ratio) {
        bail!("--read-ratio must be between 0 and 1, got {}", args.read_ratio);
    }
    let connections = args.connections.unwrap_or(args.clients);
    if connections == 0 || connections > args.clients {
        bail!("--connections must be between 1 and --clients ({}), got {connections}", args.clients);
    }
    Ok(connections)
}

/// The settings of one client of the run, sharing the run's counters.
fn context_of(args: &BenchArgs, id: usize, counters: &RunCounters) -> ClientContext {
    ClientContext {
        id: id as u64,
        state_machine: args.state_machine.clone(),
        values: counters.values(args.value_size),
        next_value: AtomicUsize::new(id),
        keys: args.keys.max(1),
        read_ratio: args.read_ratio,
        consistency: args.consistency.into(),
        done: counters.done.clone(),
        failed: counters.failed.clone(),
        stop: counters.stop.clone(),
        phase: Arc::new(AtomicUsize::new(0)),
        phases: 1,
    }
}

/// What every client of a run counts into, and the flag that ends it.
#[derive(Default)]
struct RunCounters {
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    values: std::sync::OnceLock<Arc<Vec<String>>>,
}

/// Distinct values the clients of a run cycle through.
pub(super) const VALUE_POOL: usize = 4096;

/// `count` values of `size` random letters and digits: like real data they
/// do not compress away (a value of one repeated letter shrinks a
/// hundredfold in the storage engines' compression, and flatters them).
pub(super) fn random_values(count: usize, size: usize) -> Vec<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // splitmix64, with a fixed seed: every run writes the same values.
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..count)
        .map(|_| (0..size).map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize] as char).collect())
        .collect()
}

impl RunCounters {
    /// The run's pool of values, made once.
    fn values(&self, size: usize) -> Arc<Vec<String>> {
        self.values.get_or_init(|| Arc::new(random_values(VALUE_POOL, size))).clone()
    }

    /// Lets the clients run for `duration` (with a progress line on a
    /// terminal), stops them, and gathers what each saw.
    async fn finish(
        &self,
        tasks: Vec<tokio::task::JoinHandle<anyhow::Result<ClientResult>>>,
        duration: Duration,
        started: Instant,
        progress: bool,
    ) -> anyhow::Result<Vec<ClientResult>> {
        while started.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(500).min(duration.saturating_sub(started.elapsed()))).await;
            if progress {
                let secs = started.elapsed().as_secs_f64();
                let ops = self.done.load(Ordering::Relaxed);
                eprint!(
                    "\r{secs:5.1}s  {ops} ok ({:.0}/s)  {} errors",
                    ops as f64 / secs.max(1e-9),
                    self.failed.load(Ordering::Relaxed)
                );
                let _ = std::io::stderr().flush();
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        if progress {
            eprintln!();
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.context("a client task failed")??);
        }
        Ok(results)
    }
}

/// One run against etcd (`--etcd`): writes only, plaintext, connections
/// spread over the endpoints given.
fn bench_etcd(args: &BenchArgs) -> anyhow::Result<()> {
    let connections = checked_connections(args)?;
    if args.read_ratio > 0.0 {
        bail!("--etcd measures writes only; leave --read-ratio at 0");
    }
    let disk = args.disk.as_deref().map(measure_fdatasync).transpose()?;
    let runtime = super::runtime()?;
    let duration = Duration::from_secs(args.duration_secs);
    let counters = RunCounters::default();
    let pids = raft_host::process::pids_named("etcd");
    let usage_of = |pids: &[u32]| pids.iter().map(|&pid| raft_host::process::usage_of(pid)).collect::<Vec<_>>();
    let etcd_before = usage_of(&pids);
    let bench_before = raft_host::process::usage();
    let started = Instant::now();
    let results = runtime.block_on(async {
        let addresses = args.target.addresses();
        let mut channels = Vec::with_capacity(connections);
        for n in 0..connections {
            let address = &addresses[n % addresses.len()];
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .with_context(|| format!("etcd endpoint {address:?}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to etcd at {address}"))?;
            channels.push(channel);
        }
        let tasks = (0..args.clients)
            .map(|id| {
                let client = KvClient::new(channels[id % connections].clone());
                tokio::spawn(run_client(Load::Etcd(client), context_of(args, id, &counters)))
            })
            .collect();
        counters.finish(tasks, duration, started, std::io::stderr().is_terminal() && !args.json).await
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let bench_after = raft_host::process::usage();
    let etcd_after = usage_of(&pids);
    let processes = pids
        .iter()
        .zip(etcd_before.iter().zip(&etcd_after))
        .filter_map(|(pid, (before, after))| {
            let (before, after) = (before.as_ref()?, after.as_ref()?);
            Some(ProcessCpu {
                name: format!("etcd (pid {pid})"),
                members: Vec::new(),
                cpu_seconds: after.cpu_seconds - before.cpu_seconds,
                resident_bytes: after.resident_bytes,
                threads: Vec::new(),
            })
        })
        .collect();
    let cpu = CpuUse {
        processes,
        bench_cpu_seconds: bench_before.zip(bench_after).map(|(b, a)| a.cpu_seconds - b.cpu_seconds),
    };
    report(args, "etcd", &results, elapsed, disk, &cpu)
}

/// One run of the bench, over the batched path or the unary one.
fn bench_path(args: &BenchArgs, batching: bool) -> anyhow::Result<()> {
    let connections = checked_connections(args)?;
    let disk = args.disk.as_deref().map(measure_fdatasync).transpose()?;
    let transport = args.target.transport()?;
    let runtime = super::runtime()?;
    let duration = Duration::from_secs(args.duration_secs);
    let counters = RunCounters::default();
    let members_before = runtime.block_on(sample_members(args.target.addresses(), &transport));
    let bench_before = raft_host::process::usage();
    let started = Instant::now();
    let watched = Arc::new(AtomicU64::new(0));
    let watchers = runtime.block_on(start_watchers(args, &counters, &watched))?;
    let results = runtime.block_on(async {
        let mut tasks = Vec::new();
        let mut pool = Vec::with_capacity(connections);
        for id in 0..args.clients {
            let mut client = match pool.get_mut(id % connections) {
                Some(shared) => ClusterClient::sharing_connections(shared)?,
                None => {
                    let mut first = args.target.client()?;
                    let client = first.sharing_connections()?;
                    pool.push(first);
                    client
                }
            };
            // No retries: a failure is counted, never hidden by a retry.
            client.deadline = Duration::ZERO;
            client.batching = batching;
            tasks.push(tokio::spawn(run_client(Load::Raft(client), context_of(args, id, &counters))));
        }
        counters.finish(tasks, duration, started, std::io::stderr().is_terminal() && !args.json).await
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let bench_after = raft_host::process::usage();
    let members_after = runtime.block_on(sample_members(args.target.addresses(), &transport));
    let cpu = CpuUse {
        processes: processes_cpu(&members_before, &members_after),
        bench_cpu_seconds: bench_before.zip(bench_after).map(|(b, a)| a.cpu_seconds - b.cpu_seconds),
    };
    let path = if batching { "batched" } else { "unary" };
    report(args, path, &results, elapsed, disk, &cpu)?;
    if !watchers.is_empty() {
        let delivered = watched.load(Ordering::Relaxed);
        let lags = runtime.block_on(async {
            let mut lags = Vec::new();
            for watcher in watchers {
                lags.push(watcher.await.context("a watcher failed")??);
            }
            Ok::<_, anyhow::Error>(lags)
        })?;
        let behind = lags.iter().max().copied().unwrap_or(0);
        let per_second = delivered as f64 / elapsed;
        if args.json {
            println!(
                "{}",
                json!({"path": path, "watchers": args.watchers, "changes_delivered": delivered,
                       "changes_per_sec": per_second, "most_indexes_behind_at_end": behind})
            );
        } else {
            println!(
                "watch:    {} watchers, {delivered} changes delivered ({per_second:.0}/s in all, {:.0}/s each); \
                 at the end the furthest behind was {behind} indexes",
                args.watchers,
                per_second / args.watchers as f64
            );
        }
    }
    Ok(())
}

/// Starts `--watchers` watchers of every change of the run's state machine,
/// one per member in turn, counting what they receive into `watched`; each
/// ends with the run and answers how many indexes it was behind then.
async fn start_watchers(
    args: &BenchArgs,
    counters: &RunCounters,
    watched: &Arc<AtomicU64>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<u64>>>> {
    let mut out = Vec::with_capacity(args.watchers);
    let transport = args.target.transport()?;
    let addresses = args.target.addresses();
    for n in 0..args.watchers {
        // Each watcher starts at its own member, and falls back on the others.
        let mut order = addresses.to_vec();
        order.rotate_left(n % addresses.len());
        let home = order[0].clone();
        let mut client = ClusterClient::with_transport(order, transport.clone())?;
        let spec = WatchSpec { consistency: Consistency::Stale, ..WatchSpec::prefix(&args.state_machine, b"") };
        let mut watch = client.watch(spec)?;
        watch.next().await.context("starting a watcher")?;
        let (stop, watched, transport) = (counters.stop.clone(), watched.clone(), transport.clone());
        out.push(tokio::spawn(async move {
            let mut last_seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
                let Ok(batch) = next else { continue };
                let batch = batch?;
                watched.fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
                last_seen = batch.covered_index;
            }
            let now = ClusterClient::status_at(&home, &transport).await.map_or(0, |s| s.applied_index);
            Ok(now.saturating_sub(last_seen))
        }));
    }
    Ok(out)
}

/// Each member's status, by position in the address list, asked of all at
/// once (`None` for one that does not answer: the CPU figures then leave it
/// out).
async fn sample_members(
    addresses: &[String],
    transport: &raft_host::wire::Transport,
) -> Vec<Option<raft_host::wire::client_pb::StatusResponse>> {
    let asks: Vec<_> = addresses
        .iter()
        .map(|address| {
            let (address, transport) = (address.clone(), transport.clone());
            // A member busy starting up, or on cores a profiler just took,
            // may miss one status call; without its figures the report
            // would leave the member out of the CPU per operation.
            tokio::spawn(async move {
                retrying(STATUS_ATTEMPTS, STATUS_RETRY_PAUSE, || ClusterClient::status_at(&address, &transport)).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(asks.len());
    for ask in asks {
        out.push(ask.await.ok().flatten());
    }
    out
}

/// Status calls per member before the report goes without its figures.
const STATUS_ATTEMPTS: usize = 3;
const STATUS_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// The first success of up to `attempts` calls of `call`, `pause` apart.
async fn retrying<T, E, F, Fut>(attempts: usize, pause: std::time::Duration, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(pause).await;
        }
        if let Ok(value) = call().await {
            return Some(value);
        }
    }
    None
}

/// CPU used during the run: by each member process that answered before
/// and after it, and by this bench process (its clients, their gRPC and TCP).
struct CpuUse {
    processes: Vec<ProcessCpu>,
    bench_cpu_seconds: Option<f64>,
}

/// One member process: several members when they share it (`raft-host
/// dev`), whose figures are then counted once.
struct ProcessCpu {
    /// What the report calls it.
    name: String,
    /// Ids and roles of the members it runs.
    members: Vec<(u64, String)>,
    cpu_seconds: f64,
    resident_bytes: u64,
    /// CPU seconds by kind of thread (`StatusResponse.thread_cpu`), in the
    /// member's order; empty where it does not report them.
    threads: Vec<(String, f64)>,
}

/// What a report calls a process running `members`.
fn label_of(members: &[(u64, String)]) -> String {
    let names: Vec<String> = members.iter().map(|(id, role)| format!("{id} ({role})")).collect();
    match names.len() {
        1 => format!("member {}", names[0]),
        _ => format!("members {} in one process", names.join(" + ")),
    }
}

/// Groups the members' two samples by process. A member that restarted in
/// between (another process instance) or does not report usage is left out.
fn processes_cpu(
    before: &[Option<raft_host::wire::client_pb::StatusResponse>],
    after: &[Option<raft_host::wire::client_pb::StatusResponse>],
) -> Vec<ProcessCpu> {
    let mut processes: Vec<(u64, ProcessCpu)> = Vec::new();
    for (before, after) in before.iter().zip(after) {
        let (Some(before), Some(after)) = (before, after) else { continue };
        if after.process_instance == 0
            || after.process_instance != before.process_instance
            || after.process_cpu_seconds < before.process_cpu_seconds
        {
            continue;
        }
        let member = (after.id, after.role.clone());
        match processes.iter_mut().find(|(instance, _)| *instance == after.process_instance) {
            Some((_, process)) => process.members.push(member),
            None => processes.push((
                after.process_instance,
                ProcessCpu {
                    name: String::new(),
                    members: vec![member],
                    cpu_seconds: after.process_cpu_seconds - before.process_cpu_seconds,
                    resident_bytes: after.process_resident_bytes,
                    threads: after
                        .thread_cpu
                        .iter()
                        .filter_map(|threads| {
                            let start = before.thread_cpu.iter().find(|b| b.kind == threads.kind)?;
                            Some((threads.kind.clone(), (threads.cpu_seconds - start.cpu_seconds).max(0.0)))
                        })
                        .collect(),
                },
            )),
        }
    }
    processes
        .into_iter()
        .map(|(_, mut process)| {
            process.name = label_of(&process.members);
            process
        })
        .collect()
}

pub(super) struct ClientContext {
    pub id: u64,
    pub state_machine: String,
    /// The values written, in turn (see [`random_values`]).
    pub values: Arc<Vec<String>>,
    pub next_value: AtomicUsize,
    pub keys: u64,
    pub read_ratio: f64,
    pub consistency: raft_host::client::Consistency,
    pub done: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
    /// The phase each write's latency is recorded under, below `phases`.
    pub phase: Arc<AtomicUsize>,
    pub phases: usize,
}

/// A histogram of microseconds up to a minute.
pub(super) fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

/// What a bench client drives: a raft-host cluster through the Rust
/// client, or etcd through its `KV.Put` (`--etcd`).
pub(super) enum Load {
    Raft(ClusterClient),
    Etcd(KvClient<tonic::transport::Channel>),
}

impl Load {
    /// Writes `value` under `key`; the failure, if any, as the report shows it.
    async fn write(&mut self, ctx: &ClientContext, key: &str) -> Result<(), String> {
        let value = &ctx.values[ctx.next_value.fetch_add(1, Ordering::Relaxed) % ctx.values.len()];
        match self {
            Load::Raft(client) => {
                // Like the etcd `Put` below (no `prev_kv`), the answer does
                // not carry the value it replaced.
                answered(client.write(&ctx.state_machine, put_command(key, value)).await.map(|r| outcome_of(r.outcome)))
            }
            Load::Etcd(client) => {
                let put =
                    PutRequest { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec(), ..Default::default() };
                client.put(put).await.map(|_| ()).map_err(|status| format!("etcd: {}", status.message()))
            }
        }
    }

    async fn read(&mut self, ctx: &ClientContext, key: &str) -> Result<(), String> {
        match self {
            Load::Raft(client) => {
                let query = format!(r#"{{"op":"get","key":"{key}"}}"#).into_bytes();
                answered(client.read(&ctx.state_machine, query, ctx.consistency).await.map(|r| outcome_of(r.outcome)))
            }
            // `bench_etcd` refuses a read ratio.
            Load::Etcd(_) => Err("etcd reads are not measured".to_string()),
        }
    }
}

/// The kv guest's put of `value` under `key`, neither of which needs
/// escaping (the bench's own keys and letters): built by concatenation,
/// at a fraction of what formatting costs the load generator per write.
fn put_command(key: &str, value: &str) -> Vec<u8> {
    const HEAD: &[u8] = br#"{"op":"put","key":""#;
    const MIDDLE: &[u8] = br#"","value":""#;
    const TAIL: &[u8] = br#"","return_previous":false}"#;
    let mut command = Vec::with_capacity(HEAD.len() + key.len() + MIDDLE.len() + value.len() + TAIL.len());
    for part in [HEAD, key.as_bytes(), MIDDLE, value.as_bytes(), TAIL] {
        command.extend_from_slice(part);
    }
    command
}

fn answered<E: std::fmt::Display>(outcome: Result<Result<Vec<u8>, String>, E>) -> Result<(), String> {
    match outcome {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(refused)) => Err(format!("the state machine refused: {refused}")),
        Err(error) => Err(error.to_string()),
    }
}

pub(super) async fn run_client(mut load: Load, ctx: ClientContext) -> anyhow::Result<ClientResult> {
    let writes = (0..ctx.phases.max(1)).map(|_| latency_histogram()).collect::<anyhow::Result<Vec<_>>>()?;
    let mut result = ClientResult { writes, reads: latency_histogram()?, errors: 0, first_error: None };
    // A per-client xorshift: cheap, and reproducible for a given client id.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (ctx.id + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut pending = Vec::with_capacity(LATENCIES_PER_FLUSH);
    while !ctx.stop.load(Ordering::Relaxed) {
        let key = format!("k{}", next() % ctx.keys);
        let is_read = (next() % 1_000_000) as f64 / 1_000_000.0 < ctx.read_ratio;
        let began = Instant::now();
        let phase = ctx.phase.load(Ordering::Relaxed).min(result.writes.len() - 1);
        let outcome = if is_read { load.read(&ctx, &key).await } else { load.write(&ctx, &key).await };
        let micros = began.elapsed().as_micros() as u64;
        match outcome {
            Ok(()) => {
                pending.push((if is_read { None } else { Some(phase) }, micros.max(1)));
                if pending.len() == LATENCIES_PER_FLUSH {
                    result.record(&mut pending, &ctx.done);
                }
            }
            Err(error) => {
                result.errors += 1;
                result.first_error.get_or_insert(error);
                ctx.failed.fetch_add(1, Ordering::Relaxed);
                // Do not spin on a cluster that refuses everything.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    result.record(&mut pending, &ctx.done);
    Ok(result)
}

/// fdatasync latency of the disk holding `dir`: 256-byte appends, each
/// followed by a sync, as a log would do.
fn measure_fdatasync(dir: &std::path::Path) -> anyhow::Result<Histogram<u64>> {
    let mut file = tempfile::tempfile_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).context("histogram bounds")?;
    let record = [0x5au8; 256];
    let started = Instant::now();
    while histogram.len() < 2_000 && started.elapsed() < Duration::from_secs(5) {
        let began = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        histogram.saturating_record((began.elapsed().as_micros() as u64).max(1));
    }
    Ok(histogram)
}

pub(super) fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn report(
    args: &BenchArgs,
    path: &str,
    results: &[ClientResult],
    elapsed: f64,
    disk: Option<Histogram<u64>>,
    cpu: &CpuUse,
) -> anyhow::Result<()> {
    let mut writes = latency_histogram()?;
    let mut reads = writes.clone();
    for result in results {
        for phase in &result.writes {
            writes.add(phase).context("merging histograms")?;
        }
        reads.add(&result.reads).context("merging histograms")?;
    }
    let (errors, first_error) = errors_of(results);
    // CPU per answered operation: what one write (or read) costs the whole
    // machine, which is what bounds throughput once the cores are busy.
    let operations = (writes.len() + reads.len()).max(1) as f64;
    let per_op_us = |seconds: f64| seconds * 1e6 / operations;
    let processes_cpu: Vec<serde_json::Value> = cpu
        .processes
        .iter()
        .map(|p| {
            json!({
                "members": p.members.iter().map(|(id, role)| json!({"id": id, "role": role})).collect::<Vec<_>>(),
                "cpu_seconds": p.cpu_seconds,
                "cpu_us_per_op": per_op_us(p.cpu_seconds),
                "threads_cpu_us_per_op": p.threads.iter()
                    .map(|(kind, seconds)| (kind.clone(), json!(per_op_us(*seconds))))
                    .collect::<serde_json::Map<_, _>>(),
                "resident_bytes": p.resident_bytes,
            })
        })
        .collect();
    let summary = json!({
        "path": path,
        "clients": args.clients,
        "connections": args.connections.unwrap_or(args.clients),
        "duration_secs": elapsed,
        "value_size": args.value_size,
        "read_ratio": args.read_ratio,
        "writes_per_sec": writes.len() as f64 / elapsed,
        "reads_per_sec": reads.len() as f64 / elapsed,
        "errors": errors,
        "first_error": first_error,
        "write_latency": percentiles(&writes),
        "read_latency": percentiles(&reads),
        "disk_fdatasync": disk.as_ref().map(percentiles),
        "processes_cpu": processes_cpu,
        "bench_cpu_seconds": cpu.bench_cpu_seconds,
        "bench_cpu_us_per_op": cpu.bench_cpu_seconds.map(per_op_us),
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    println!(
        "{path} path: {} clients on {} connection(s) for {elapsed:.1} s, {} B values, read ratio {}",
        args.clients,
        args.connections.unwrap_or(args.clients),
        args.value_size,
        args.read_ratio
    );
    let line = |name: &str, h: &Histogram<u64>| {
        if h.is_empty() {
            return;
        }
        println!(
            "{name:>6}: {:>9.0}/s   p50 {:>7} µs  p90 {:>7} µs  p99 {:>7} µs  p99.9 {:>7} µs  max {:>7} µs",
            h.len() as f64 / elapsed,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    };
    line("writes", &writes);
    line("reads", &reads);
    if let Some(disk) = &disk {
        println!(
            "  disk: fdatasync p50 {} µs, p99 {} µs ({} syncs)",
            disk.value_at_quantile(0.5),
            disk.value_at_quantile(0.99),
            disk.len()
        );
    }
    if !cpu.processes.is_empty() || cpu.bench_cpu_seconds.is_some() {
        let mut parts: Vec<String> =
            cpu.processes.iter().map(|p| format!("{} {:.0}", p.name, per_op_us(p.cpu_seconds))).collect();
        if let Some(seconds) = cpu.bench_cpu_seconds {
            parts.push(format!("this bench {:.0}", per_op_us(seconds)));
        }
        let total = cpu.processes.iter().map(|p| p.cpu_seconds).sum::<f64>() + cpu.bench_cpu_seconds.unwrap_or(0.0);
        println!("   cpu: µs per operation: {}; total {:.0}", parts.join(", "), per_op_us(total));
        let by_kind = threads_over_processes(&cpu.processes);
        if !by_kind.is_empty() {
            let parts: Vec<String> =
                by_kind.iter().map(|(kind, seconds)| format!("{kind} {:.1}", per_op_us(*seconds))).collect();
            println!("threads: µs per operation, members together: {}", parts.join(", "));
        }
        let memory: Vec<String> =
            cpu.processes.iter().map(|p| format!("{} {} MiB", p.name, p.resident_bytes >> 20)).collect();
        if !memory.is_empty() {
            println!("memory: resident {}", memory.join(", "));
        }
    }
    print_errors(errors, first_error.as_deref());
    Ok(())
}

/// Each kind of thread's CPU seconds summed over the member processes, in
/// the order the members report the kinds.
fn threads_over_processes(processes: &[ProcessCpu]) -> Vec<(String, f64)> {
    let mut by_kind: Vec<(String, f64)> = Vec::new();
    for (kind, seconds) in processes.iter().flat_map(|p| &p.threads) {
        match by_kind.iter_mut().find(|(k, _)| k == kind) {
            Some((_, total)) => *total += seconds,
            None => by_kind.push((kind.clone(), *seconds)),
        }
    }
    by_kind
}

/// Failures over every client: how many, and the first one seen.
pub(super) fn errors_of(results: &[ClientResult]) -> (u64, Option<String>) {
    let errors = results.iter().map(|r| r.errors).sum();
    (errors, results.iter().find_map(|r| r.first_error.clone()))
}

/// The closing line of a report: the failures, never hidden.
pub(super) fn print_errors(errors: u64, first_error: Option<&str>) {
    match first_error {
        Some(error) => println!("errors: {errors} (first: {error})"),
        None => println!("errors: 0"),
    }
}

#[cfg(test)]
mod tests {
    use super::{processes_cpu, put_command, random_values, retrying, threads_over_processes};
    use raft_host::wire::client_pb::{StatusResponse, ThreadCpu};

    fn sample(id: u64, role: &str, instance: u64, cpu: f64) -> Option<StatusResponse> {
        Some(StatusResponse {
            id,
            role: role.into(),
            process_instance: instance,
            process_cpu_seconds: cpu,
            process_resident_bytes: 64 << 20,
            ..StatusResponse::default()
        })
    }

    #[test]
    fn a_put_command_is_the_json_the_kv_guest_reads() {
        let value = &random_values(1, 256)[0];
        let command = put_command("k42", value);
        let parsed: serde_json::Value = serde_json::from_slice(&command).expect("valid JSON");
        assert_eq!(parsed, serde_json::json!({"op": "put", "key": "k42", "value": value, "return_previous": false}));
    }

    #[test]
    fn members_sharing_a_process_count_its_cpu_once_and_a_restarted_member_is_left_out() {
        let before = [sample(1, "leader", 7, 1.0), sample(2, "follower", 7, 1.0), sample(3, "follower", 9, 5.0), None];
        let after = [
            sample(1, "leader", 7, 3.5),
            sample(2, "follower", 7, 3.5),
            // Restarted during the run: another process, figures not comparable.
            sample(3, "follower", 11, 0.5),
            sample(4, "follower", 12, 1.0),
        ];
        let processes = processes_cpu(&before, &after);
        assert_eq!(processes.len(), 1);
        assert_eq!(processes[0].members, vec![(1, "leader".to_string()), (2, "follower".to_string())]);
        assert!((processes[0].cpu_seconds - 2.5).abs() < 1e-9);
        assert_eq!(processes[0].name, "members 1 (leader) + 2 (follower) in one process");
    }

    #[test]
    fn thread_cpu_is_the_change_of_each_kind_both_samples_report_summed_over_processes() {
        let with_threads = |id, instance, apply, runtime: Option<f64>| {
            let mut status = sample(id, "follower", instance, apply + runtime.unwrap_or(0.0))?;
            status.thread_cpu.push(ThreadCpu { kind: "apply".into(), cpu_seconds: apply });
            if let Some(runtime) = runtime {
                status.thread_cpu.push(ThreadCpu { kind: "runtime".into(), cpu_seconds: runtime });
            }
            Some(status)
        };
        let before = [with_threads(1, 7, 1.0, Some(2.0)), with_threads(2, 8, 0.5, None)];
        let after = [with_threads(1, 7, 1.25, Some(3.0)), with_threads(2, 8, 1.0, Some(4.0))];
        let processes = processes_cpu(&before, &after);
        assert_eq!(processes[0].threads, vec![("apply".to_string(), 0.25), ("runtime".to_string(), 1.0)]);
        // A kind the first sample lacked has no change to report.
        assert_eq!(processes[1].threads, vec![("apply".to_string(), 0.5)]);
        assert_eq!(threads_over_processes(&processes), vec![("apply".to_string(), 0.75), ("runtime".to_string(), 1.0)]);
    }

    #[test]
    fn a_status_call_is_retried_until_it_answers_and_given_up_after_its_attempts() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let pause = std::time::Duration::from_millis(1);
        let mut calls = 0;
        let answered = runtime.block_on(retrying(3, pause, || {
            calls += 1;
            let outcome: Result<u32, ()> = if calls < 3 { Err(()) } else { Ok(calls) };
            std::future::ready(outcome)
        }));
        assert_eq!(answered, Some(3));
        let mut calls = 0;
        let never = runtime.block_on(retrying(3, pause, || {
            calls += 1;
            std::future::ready(Err::<u32, ()>(()))
        }));
        assert_eq!((never, calls), (None, 3));
    }
}
