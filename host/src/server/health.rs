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

/// How long the member's own status may take before the health service
/// says NOT_SERVING. The status is asked of the core and the apply thread,
/// the two that every request goes through: a member whose threads cannot
/// answer it in this time cannot serve requests either (a status waits
/// behind the apply thread's backlog, which is bounded, and a member seconds
/// behind is not ready for reads anyway).
pub const STATUS_WAIT_MAX: Duration = Duration::from_secs(5);

/// Why a probe fails when the member's status did not come within `wait`.
pub fn status_late(wait: Duration) -> String {
    format!("the member's status did not come within {} ms", wait.as_millis())
}

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
/// client API) in step with the member's `status` (`None`: it cannot say):
/// NOT_SERVING until a status says otherwise, and whenever one does not come
/// within `wait`. Reports NOT_SERVING once the member stops.
pub(super) async fn report<F, Fut>(reporter: HealthReporter, status: F, wait: Duration, mut stop: ShutdownSignal)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<StatusResponse>>,
{
    // The reporter starts the whole server at SERVING; nothing is known yet.
    set_status(&reporter, ServingStatus::NotServing).await;
    let mut last = ServingStatus::NotServing;
    loop {
        let why_not = tokio::select! {
            _ = stop.wait() => break,
            answer = tokio::time::timeout(wait, status()) => match answer {
                Ok(Some(status)) => serving(&status).err(),
                Ok(None) => Some("the member cannot say its status".to_string()),
                Err(_) => Some(status_late(wait)),
            },
        };
        let now = if why_not.is_none() { ServingStatus::Serving } else { ServingStatus::NotServing };
        if now != last {
            match &why_not {
                None => tracing::info!("health: serving"),
                Some(why) => tracing::warn!(why = %why, "health: not serving"),
            }
            set_status(&reporter, now).await;
            last = now;
        }
        tokio::select! {
            _ = stop.wait() => break,
            _ = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
    set_status(&reporter, ServingStatus::NotServing).await;
}

async fn set_status(reporter: &HealthReporter, status: ServingStatus) {
    for service in ["", CLIENT_SERVICE] {
        reporter.set_service_status(service, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Shutdown;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::HealthService;

    fn with_leader(leader_id: u64) -> StatusResponse {
        StatusResponse { leader_id, term: 3, ..StatusResponse::default() }
    }

    /// What the health service says of `name` (`None`: nothing yet).
    async fn said(service: &HealthService, name: &str) -> Option<i32> {
        let request = tonic::Request::new(HealthCheckRequest { service: name.to_string() });
        service.check(request).await.ok().map(|response| response.into_inner().status)
    }

    /// Polls the health service until `name` says `expected`, for at most 5 s.
    async fn comes_to(service: &HealthService, name: &str, expected: ServingStatus) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if said(service, name).await == Some(expected as i32) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_status_that_does_not_come_is_not_serving_and_a_stop_ends_the_reports() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        // The member answers at first, then its threads stop answering.
        let answering = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let status = {
            let answering = answering.clone();
            move || {
                let answering = answering.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if !answering {
                        std::future::pending::<()>().await;
                    }
                    Some(with_leader(2))
                }
            }
        };
        let shutdown = Shutdown::new();
        let reports = tokio::spawn(report(reporter, status, Duration::from_millis(100), shutdown.signal()));
        for name in ["", CLIENT_SERVICE] {
            assert!(comes_to(&service, name, ServingStatus::Serving).await, "{name:?} serves while the member answers");
        }
        answering.store(false, std::sync::atomic::Ordering::SeqCst);
        for name in ["", CLIENT_SERVICE] {
            assert!(comes_to(&service, name, ServingStatus::NotServing).await, "{name:?} stops serving");
        }
        // A stop is seen even while a status is awaited.
        shutdown.begin();
        tokio::time::timeout(Duration::from_secs(5), reports).await.expect("the reports end").expect("no panic");
        assert_eq!(said(&service, "").await, Some(ServingStatus::NotServing as i32));
    }

    #[tokio::test]
    async fn nothing_is_serving_before_the_first_status_nor_without_a_leader() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let shutdown = Shutdown::new();
        let reports = tokio::spawn(report(
            reporter,
            || async { Some(with_leader(0)) },
            Duration::from_secs(5),
            shutdown.signal(),
        ));
        tokio::time::sleep(HEALTH_POLL * 2).await;
        let not_serving = Some(ServingStatus::NotServing as i32);
        assert_eq!(said(&service, "").await, not_serving, "no leader is known");
        assert_eq!(said(&service, CLIENT_SERVICE).await, not_serving);
        shutdown.begin();
        reports.await.expect("no panic");
    }
}
