//! `raft-host endpoint status|health [--cluster]`: every member's view in
//! one table, as `etcdctl endpoint status --cluster -w table` gives it.

use super::client::Target;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use raft_host::client::ClusterClient;
use raft_host::server::health;
use raft_host::wire::client_pb::StatusResponse;
use serde_json::json;

#[derive(Args)]
pub struct EndpointArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Each member's role, term, leader, indexes, lag, state digests,
    /// version and resident memory.
    Status(Each),
    /// Whether each member is ready (online, a leader known, applied close
    /// to commit); exits 1 if one is not.
    Health(Each),
    /// Asks one member's gRPC health service (grpc.health.v1), as
    /// grpc_health_probe does: exits 0 when it answers SERVING. For
    /// container health checks.
    Probe(ProbeArgs),
}

#[derive(Args)]
struct ProbeArgs {
    #[command(flatten)]
    target: Target,
    /// The service to ask about ("" for the whole member).
    #[arg(long, default_value = "")]
    service: String,
}

#[derive(Args)]
struct Each {
    #[command(flatten)]
    target: Target,
    /// Ask every member the cluster lists (`members`), not only --addr.
    #[arg(long)]
    cluster: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// One member's answer, or why there is none.
struct Answer {
    address: String,
    status: Result<StatusResponse, String>,
}

pub fn endpoint(args: EndpointArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    match args.what {
        What::Probe(probe) => runtime.block_on(probe_health(&probe)),
        What::Status(each) => {
            let answers = runtime.block_on(ask_each(&each))?;
            let most_committed = answers.iter().filter_map(|a| a.status.as_ref().ok()).map(|s| s.commit_index).max();
            let lag = |s: &StatusResponse| most_committed.unwrap_or(0).saturating_sub(s.applied_index);
            if each.json {
                let rows: Vec<_> = answers
                    .iter()
                    .map(|a| match &a.status {
                        Ok(s) => json!({
                            "address": a.address, "id": s.id, "role": s.role, "term": s.term,
                            "leader_id": s.leader_id, "commit_index": s.commit_index, "applied_index": s.applied_index,
                            "lag": lag(s), "version": s.version, "resident_bytes": s.process_resident_bytes,
                            "state_machines": s.state_machines.iter().map(|m| json!({
                                "name": m.name, "module_hash": m.module_hash, "state_digest": m.state_digest,
                            })).collect::<Vec<_>>(),
                        }),
                        Err(error) => json!({ "address": a.address, "error": error }),
                    })
                    .collect();
                println!("{}", json!({ "endpoints": rows }));
                return Ok(());
            }
            println!(
                "{:<4} {:<22} {:<9} {:>5} {:>6} {:>9} {:>9} {:>6} {:<10} {:>8}  state digests",
                "id", "address", "role", "term", "leader", "commit", "applied", "lag", "version", "rss MiB"
            );
            for answer in &answers {
                match &answer.status {
                    Ok(s) => {
                        let digests: Vec<String> = s
                            .state_machines
                            .iter()
                            .map(|m| format!("{}={}", m.name, m.state_digest.get(..12).unwrap_or(&m.state_digest)))
                            .collect();
                        println!(
                            "{:<4} {:<22} {:<9} {:>5} {:>6} {:>9} {:>9} {:>6} {:<10} {:>8}  {}",
                            s.id,
                            answer.address,
                            s.role,
                            s.term,
                            s.leader_id,
                            s.commit_index,
                            s.applied_index,
                            lag(s),
                            s.version,
                            s.process_resident_bytes >> 20,
                            digests.join(" ")
                        );
                    }
                    Err(error) => println!("{:<4} {:<22} unreachable: {error}", "-", answer.address),
                }
            }
            Ok(())
        }
        What::Health(each) => {
            let answers = runtime.block_on(ask_each(&each))?;
            let verdicts: Vec<(String, Result<String, String>)> = answers
                .into_iter()
                .map(|a| {
                    let verdict = a.status.and_then(|s| {
                        health::ready(&s).map(|()| format!("member {} {} in term {}", s.id, s.role, s.term))
                    });
                    (a.address, verdict)
                })
                .collect();
            let unhealthy = verdicts.iter().filter(|(_, v)| v.is_err()).count();
            if each.json {
                let rows: Vec<_> = verdicts
                    .iter()
                    .map(|(address, v)| match v {
                        Ok(detail) => json!({"address": address, "healthy": true, "detail": detail}),
                        Err(why) => json!({"address": address, "healthy": false, "error": why}),
                    })
                    .collect();
                println!("{}", json!({ "endpoints": rows }));
            } else {
                for (address, verdict) in &verdicts {
                    match verdict {
                        Ok(detail) => println!("{address} is healthy: {detail}"),
                        Err(why) => println!("{address} is unhealthy: {why}"),
                    }
                }
            }
            if unhealthy > 0 {
                bail!("{unhealthy} of {} members are unhealthy", verdicts.len());
            }
            Ok(())
        }
    }
}

/// The members to ask: those the cluster lists (with `--cluster`), or the
/// addresses given; and each one's status, asked once.
async fn ask_each(each: &Each) -> anyhow::Result<Vec<Answer>> {
    let transport = each.target.transport()?;
    let addresses: Vec<String> = match each.cluster {
        true => {
            let members = each.target.client()?.members().await.context("listing the members failed")?;
            members.members.into_iter().map(|m| m.address).collect()
        }
        false => each.target.addresses().to_vec(),
    };
    let asks = addresses.into_iter().map(|address| {
        let transport = transport.clone();
        async move {
            let status = ClusterClient::status_at(&address, &transport).await.map_err(|e| e.to_string());
            Answer { address, status }
        }
    });
    Ok(futures_join_all(asks).await)
}

/// Runs the futures at once and collects their outputs, in order.
async fn futures_join_all<F: std::future::Future<Output = Answer> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Answer> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(answer) = handle.await {
            out.push(answer);
        }
    }
    out
}

/// One gRPC health check of the first address given.
async fn probe_health(probe: &ProbeArgs) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let address = probe.target.addresses().first().context("no address given")?;
    let channel = probe.target.transport()?.channel(address).map_err(anyhow::Error::msg)?;
    let request = HealthCheckRequest { service: probe.service.clone() };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), HealthClient::new(channel).check(request))
        .await
        .with_context(|| format!("{address} did not answer within 5 s"))?
        .with_context(|| format!("{address} did not answer the health check"))?;
    let status = ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown);
    println!("{address}: {}", status.as_str_name());
    if status != ServingStatus::Serving {
        bail!("{address} is not serving");
    }
    Ok(())
}
