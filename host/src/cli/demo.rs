//! `raft-host demo` and `raft-host validate`: the in-process cluster of the
//! consensus core, and the deploy check of a component.

use super::{DemoArgs, ValidateArgs};
use anyhow::{Context, bail};
use bytes::Bytes;
use raft_host::raft::LocalCluster;
use std::time::Instant;

const ELECTION_TICKS_MAX: u32 = 1_000;

pub fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    if !(1..=7).contains(&args.nodes) {
        bail!("--nodes must be between 1 and 7, got {}", args.nodes);
    }
    println!("starting {} members in this process (in-memory log and network, seed {})", args.nodes, args.seed);
    let mut cluster = LocalCluster::new(args.nodes, args.seed).context("starting the cluster")?;
    let leader = elect(&mut cluster)?;

    let first_half = args.writes / 2;
    write_many(&mut cluster, 0, first_half)?;

    if args.nodes < 3 {
        println!("(a cluster of {} cannot lose its leader and keep a quorum; skipping the crash)", args.nodes);
        write_many(&mut cluster, first_half, args.writes)?;
        return report(&cluster);
    }
    cluster.crash(leader);
    println!("crashed the leader, node {leader} (it keeps only what it had persisted)");
    let new_leader = elect(&mut cluster)?;
    if new_leader == leader {
        bail!("node {leader} is down but still reported as leader");
    }
    write_many(&mut cluster, first_half, args.writes)?;
    cluster.restart(leader).context("restarting the old leader")?;
    println!("restarted node {leader}; it catches up from the new leader");
    for _ in 0..ELECTION_TICKS_MAX {
        if cluster.converged() {
            break;
        }
        cluster.tick().context("catching up")?;
    }
    report(&cluster)
}

pub fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let (name, bytes) = match &args.path {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            (path.display().to_string(), bytes)
        }
        None => ("built-in kv guest".to_string(), raft_guests::KV.to_vec()),
    };
    let runtime = raft_host::runtime::Runtime::new(raft_host::runtime::Limits::default())?;
    let started = Instant::now();
    let module = runtime.load(&bytes).with_context(|| format!("{name} cannot be deployed"))?;
    println!(
        "{name}: fits raft:host/state-machine; {} bytes; sha256 {}; compiled in {:.0} ms",
        module.size_bytes(),
        raft_host::wire::hex(&module.hash()),
        started.elapsed().as_secs_f64() * 1e3
    );
    println!("imports (served by the host, WASI by its virtual, deterministic WASI):");
    for import in module.imports() {
        println!("  {import}");
    }
    Ok(())
}

fn elect(cluster: &mut LocalCluster) -> anyhow::Result<u64> {
    let ticks = cluster.elect(ELECTION_TICKS_MAX).context("electing")?.context("no leader was elected")?;
    let leader = cluster.leader().context("no leader after the election")?;
    let term = cluster.node(leader).map(|r| r.term()).unwrap_or_default();
    println!("node {leader} leads term {term} (elected after {ticks} ticks)");
    Ok(leader)
}

fn write_many(cluster: &mut LocalCluster, from: u64, to: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    for n in from..to {
        let command = Bytes::from(format!("{{\"op\":\"put\",\"key\":\"k{n}\",\"value\":\"{n}\"}}"));
        cluster.write(vec![command]).with_context(|| format!("write {n}"))?;
    }
    let secs = started.elapsed().as_secs_f64();
    let count = to - from;
    println!(
        "committed and applied {count} writes in {:.1} ms ({:.0} writes/s)",
        secs * 1e3,
        count as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn report(cluster: &LocalCluster) -> anyhow::Result<()> {
    for id in cluster.running() {
        let applied = cluster.applied(id);
        println!("node {id}: applied index {}, state digest {:016x}", applied.index, applied.digest);
    }
    if !cluster.converged() {
        bail!("replicas did not converge");
    }
    println!("every member applied the same entries in the same order");
    Ok(())
}
