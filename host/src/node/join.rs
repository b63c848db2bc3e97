//! Joining a running cluster (`raft-host serve --join ADDR,...`).
//!
//! The new member starts with no configuration, so it neither campaigns nor
//! counts anywhere. It asks the cluster (through any of its seeds, which
//! may be down; the client follows the leader) to add it as a learner, learns the members'
//! addresses from the answer, and is then caught up by the leader, from the
//! log or by snapshot. Once its applied index is close to the cluster's
//! commit index it asks to be promoted to voter (unless told to stay a
//! learner), so the cluster never counts on a voter that is far behind.

use super::config::NodeConfig;
use super::members::Members;
use super::shutdown::ShutdownSignal;
use crate::client::{ClientError, ClusterClient};
use crate::wire::client_pb::{MembersResponse, MembershipChange};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// A learner this close to the commit index is caught up enough to vote.
const CAUGHT_UP_ENTRIES: u64 = 100;
/// The first pause between attempts, doubled up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_secs(1);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(15);
/// How long one attempt tries the seeds before it is logged as failed.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the join until it is done or the member stops.
pub(super) async fn join(
    config: Arc<NodeConfig>,
    members: Arc<Members>,
    through: Vec<String>,
    mut stop: ShutdownSignal,
) {
    tracing::info!(node = config.id, seeds = ?through, "joining a running cluster");
    let joined = async {
        add_as_learner(&config, &members, &through).await?;
        if !config.join_as_learner {
            wait_until_caught_up(&config, &through).await;
            promote(&config, &through).await?;
        }
        Ok::<(), ClientError>(())
    };
    tokio::select! {
        outcome = joined => if let Err(error) = outcome {
            tracing::error!(node = config.id, seeds = ?through, %error, "the cluster refused this member; not asking again");
        },
        _ = stop.wait() => {}
    }
}

async fn add_as_learner(config: &NodeConfig, members: &Members, through: &[String]) -> Result<(), ClientError> {
    let response = change_until_done(config, through, MembershipChange::AddLearner, &config.advertise).await?;
    members.learn(&addresses(&response));
    tracing::info!(node = config.id, "added to the cluster as a learner; catching up");
    Ok(())
}

/// Asks the cluster, through the seeds `through`, for `change` of this member until it
/// is done: answered, or refused because it already is so (a restart in the
/// middle of joining), in which case the current members answer. A refusal
/// that no retry can change (a removed id, a certificate without the right)
/// ends it.
async fn change_until_done(
    config: &NodeConfig,
    through: &[String],
    change: MembershipChange,
    address: &str,
) -> Result<MembersResponse, ClientError> {
    let mut pause = RETRY_PAUSE;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = match ClusterClient::with_transport(through.to_vec(), config.transport.clone()) {
            Ok(mut client) => {
                client.deadline = ATTEMPT_DEADLINE;
                match client.change_membership(change, config.id, address).await {
                    Err(ClientError::Refused { code: Code::InvalidArgument, ref message })
                        if message.contains("already") =>
                    {
                        client.members().await
                    }
                    other => other,
                }
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(response) => return Ok(response),
            Err(error @ ClientError::Refused { code: Code::FailedPrecondition | Code::PermissionDenied, .. }) => {
                return Err(error);
            }
            Err(error) => {
                // The error names the seed that answered last and what it said.
                tracing::warn!(
                    node = config.id,
                    seeds = ?through,
                    ?change,
                    attempt,
                    retry_in = ?pause,
                    %error,
                    "no seed has done the membership change yet; retrying"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_PAUSE_MAX);
            }
        }
    }
}

async fn wait_until_caught_up(config: &NodeConfig, through: &[String]) {
    loop {
        let cluster = match ClusterClient::with_transport(through.to_vec(), config.transport.clone()) {
            Ok(mut client) => client.status().await,
            Err(error) => Err(error),
        };
        let own = ClusterClient::status_at(&config.advertise, &config.transport).await;
        if let (Ok(cluster), Ok(own)) = (cluster, own)
            && own.applied_index + CAUGHT_UP_ENTRIES >= cluster.commit_index
        {
            return;
        }
        tokio::time::sleep(RETRY_PAUSE / 2).await;
    }
}

async fn promote(config: &NodeConfig, through: &[String]) -> Result<(), ClientError> {
    change_until_done(config, through, MembershipChange::Promote, "").await?;
    tracing::info!(node = config.id, "promoted to voter");
    Ok(())
}

fn addresses(response: &MembersResponse) -> BTreeMap<u64, String> {
    response.members.iter().map(|m| (m.id, m.address.clone())).collect()
}
