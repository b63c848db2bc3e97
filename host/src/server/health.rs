//! Whether a member is healthy and ready, as probes ask it: the gRPC
//! health service (`grpc.health.v1` on the main port) and `/healthz` and
//! `/readyz` on the metrics port.
//!
//! - alive (`/healthz`): the member answers its own status;
//! - serving (gRPC health): online, a leader is known, not stopping;
//! - ready (`/readyz`): serving, and applied within [`READY_LAG_MAX`]
//!   entries of its commit index, so a read it serves is not far behind.

use crate::node::ShutdownSignal;
use crate::wire::client_pb::StatusResponse;
use std::time::Duration;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Committed entries a ready member may still have to apply.
pub const READY_LAG_MAX: u64 = 1_000;

/// How often the health service's status is brought up to date.
const HEALTH_POLL: Duration = Duration::from_millis(500);

/// The client API's service name, as the health service reports it.
const CLIENT_SERVICE: &str = "raft.client.v1.Client";

/// Why the member does not serve, if it does not.
pub fn serving(status: &StatusResponse) -> Result<(), String> {
    if status.offline {
        return Err("offline for maintenance".into());
    }
    if status.leader_id == 0 {
        return Err(format!("no leader is known (term {})", status.term));
    }
    Ok(())
}

/// Why the member is not ready, if it is not.
pub fn ready(status: &StatusResponse) -> Result<(), String> {
    serving(status)?;
    let lag = status.commit_index.saturating_sub(status.applied_index);
    if lag > READY_LAG_MAX {
        return Err(format!(
            "applied {} is {lag} entries behind commit {} (at most {READY_LAG_MAX})",
            status.applied_index, status.commit_index
        ));
    }
    Ok(())
}

/// Keeps the health service's statuses (the whole server, "", and the
/// client API) in step with the member's `status` (`None`: it cannot say)
/// until it stops, then reports NOT_SERVING.
pub(super) async fn report<F, Fut>(reporter: HealthReporter, status: F, mut stop: ShutdownSignal)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<StatusResponse>>,
{
    let mut last = None;
    loop {
        let now = match status().await {
            Some(status) if serving(&status).is_ok() => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        };
        if last != Some(now) {
            for service in ["", CLIENT_SERVICE] {
                reporter.set_service_status(service, now).await;
            }
            last = Some(now);
        }
        tokio::select! {
            _ = stop.wait() => break,
            _ = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
    for service in ["", CLIENT_SERVICE] {
        reporter.set_service_status(service, ServingStatus::NotServing).await;
    }
}
