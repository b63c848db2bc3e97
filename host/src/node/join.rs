//! Joining a running cluster (`raft-host serve --join ADDR,...`).
//!
//! The new member starts with no configuration, so it neither campaigns nor
//! counts anywhere. It asks the cluster (through any of its seeds, which
//! may be down; the client follows the leader) to add it as a learner, learns the members'
//! addresses from the answer, and is then caught up by the leader, from the
//! log or by snapshot. Once it keeps pace with the cluster it asks to be
//! promoted to voter (unless told to stay a learner), so the cluster never
//! counts on a voter that is far behind.
//!
//! Keeping pace is measured in rounds (Raft thesis §4.2.1): a round sets
//! its target at the cluster's commit index and ends when this member has
//! applied that far; a round shorter than [`Pacing::round`] means the
//! member is caught up. A fixed distance in entries cannot say it: under a
//! steady write rate a member that keeps up perfectly is still behind by
//! what the last round trips carried, which on a busy cluster is more than
//! any small constant, and such a member would never be promoted.
//!
//! The leader has the last word (`promote` is refused while the learner's
//! log is too far behind its own, as it sees it); that refusal is not
//! final, and the member goes back to catching up and asks again.

use super::config::NodeConfig;
use super::members::Members;
use super::shutdown::ShutdownSignal;
use crate::client::{ClientError, ClusterClient};
use crate::wire::client_pb::{MembersResponse, MembershipChange};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;
use tracing::Instrument as _;

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
            let mut cluster = ThroughSeeds { config: &config, through: &through };
            // The span names the member in the catching-up lines (`dev`
            // runs several in one process).
            let span = tracing::info_span!("join", node = config.id);
            catch_up_and_promote(&mut cluster, Pacing::MEMBER).instrument(span).await?;
            tracing::info!(node = config.id, "promoted to voter");
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

/// How often the join looks, and how short a catch-up round must be.
#[derive(Clone, Copy, Debug)]
struct Pacing {
    /// Between two looks at this member's applied index.
    poll: Duration,
    /// A round at most this long means this member keeps pace. About an
    /// election timeout of the defaults: a new voter that needed longer to
    /// reach what was committed when it looked could hold up commits.
    round: Duration,
    /// Between a refused promotion and the next round.
    refused_pause: Duration,
    /// Between two "still catching up" log lines.
    report_every: Duration,
}

impl Pacing {
    const MEMBER: Pacing = Pacing {
        poll: Duration::from_millis(100),
        round: Duration::from_secs(1),
        refused_pause: RETRY_PAUSE,
        report_every: Duration::from_secs(10),
    };
}

/// What the join asks of the cluster and of this member while catching up.
trait CatchUpCalls {
    /// The cluster's commit index, as a member reachable through the seeds says.
    async fn cluster_commit(&mut self) -> Result<u64, ClientError>;
    /// How far this member has applied.
    async fn own_applied(&mut self) -> Result<u64, ClientError>;
    /// Asks for this member's promotion, retrying what retrying can mend.
    async fn promote(&mut self) -> Result<(), ClientError>;
}

/// The calls of a real member: the cluster through its seeds, itself at
/// its advertised address.
struct ThroughSeeds<'a> {
    config: &'a NodeConfig,
    through: &'a [String],
}

impl CatchUpCalls for ThroughSeeds<'_> {
    async fn cluster_commit(&mut self) -> Result<u64, ClientError> {
        let mut client = ClusterClient::with_transport(self.through.to_vec(), self.config.transport.clone())?;
        Ok(client.status().await?.commit_index)
    }

    async fn own_applied(&mut self) -> Result<u64, ClientError> {
        Ok(ClusterClient::status_at(&self.config.advertise, &self.config.transport).await?.applied_index)
    }

    async fn promote(&mut self) -> Result<(), ClientError> {
        change_until_done(self.config, self.through, MembershipChange::Promote, "").await.map(drop)
    }
}

/// Catches up, then asks to be promoted; a leader that finds this member
/// still behind (it refuses with FAILED_PRECONDITION, the only refusal of
/// a promotion that time mends) sends it back to catching up. Any other
/// refusal ends the join.
async fn catch_up_and_promote(calls: &mut impl CatchUpCalls, pacing: Pacing) -> Result<(), ClientError> {
    loop {
        wait_until_caught_up(calls, pacing).await;
        match calls.promote().await {
            Ok(()) => return Ok(()),
            Err(ClientError::Refused { code: Code::FailedPrecondition, message }) => {
                tracing::info!(reason = %message, "the leader does not count this member as caught up yet; catching up");
                tokio::time::sleep(pacing.refused_pause).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Returns once a catch-up round takes at most `pacing.round`.
async fn wait_until_caught_up(calls: &mut impl CatchUpCalls, pacing: Pacing) {
    let mut reported = Instant::now();
    loop {
        let round_began = Instant::now();
        let target = loop {
            match calls.cluster_commit().await {
                Ok(commit) => break commit,
                Err(error) => {
                    if report_due(&mut reported, pacing) {
                        tracing::warn!(%error, "catching up: no seed says how far the cluster has committed");
                    }
                    tokio::time::sleep(pacing.poll).await;
                }
            }
        };
        loop {
            let applied = calls.own_applied().await.unwrap_or(0);
            if applied >= target {
                break;
            }
            if report_due(&mut reported, pacing) {
                tracing::info!(applied, target, "catching up");
            }
            tokio::time::sleep(pacing.poll).await;
        }
        if round_began.elapsed() <= pacing.round {
            return;
        }
    }
}

/// Whether a "still catching up" line is due; if so, the next one is
/// `pacing.report_every` from now.
fn report_due(reported: &mut Instant, pacing: Pacing) -> bool {
    let due = reported.elapsed() >= pacing.report_every;
    if due {
        *reported = Instant::now();
    }
    due
}

fn addresses(response: &MembersResponse) -> BTreeMap<u64, String> {
    response.members.iter().map(|m| (m.id, m.address.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Fast enough for a unit test, with rounds long enough to tell apart.
    const QUICK: Pacing = Pacing {
        poll: Duration::from_millis(1),
        round: Duration::from_millis(200),
        refused_pause: Duration::from_millis(1),
        report_every: Duration::from_millis(5),
    };

    /// A cluster whose commit index moves on by `step` at every look (at
    /// it or at this member), and a member `lag` entries behind it.
    struct Cluster {
        commit: u64,
        step: u64,
        lag: u64,
        /// Looks at the cluster that find no seed answering first.
        unanswered: u32,
        /// This member's applied index stays here, whatever the cluster does,
        /// until `frees_at` (if given).
        stuck_at: Option<u64>,
        frees_at: Option<Instant>,
        promote_answers: VecDeque<Result<(), ClientError>>,
        promotes: u32,
        rounds: u32,
    }

    impl Cluster {
        fn steady(step: u64, lag: u64) -> Cluster {
            Cluster {
                commit: 1_000,
                step,
                lag,
                unanswered: 0,
                stuck_at: None,
                frees_at: None,
                promote_answers: VecDeque::new(),
                promotes: 0,
                rounds: 0,
            }
        }
    }

    impl CatchUpCalls for Cluster {
        async fn cluster_commit(&mut self) -> Result<u64, ClientError> {
            if self.unanswered > 0 {
                self.unanswered -= 1;
                return Err(ClientError::NoAddress);
            }
            self.rounds += 1;
            self.commit += self.step;
            Ok(self.commit)
        }

        async fn own_applied(&mut self) -> Result<u64, ClientError> {
            if self.frees_at.is_some_and(|at| Instant::now() >= at) {
                self.stuck_at = None;
            }
            self.commit += self.step;
            Ok(self.stuck_at.unwrap_or(self.commit - self.lag))
        }

        async fn promote(&mut self) -> Result<(), ClientError> {
            self.promotes += 1;
            self.promote_answers.pop_front().unwrap_or(Ok(()))
        }
    }

    fn refused(code: Code) -> ClientError {
        ClientError::Refused { code, message: "learner 4 is behind".into() }
    }

    #[tokio::test]
    async fn a_member_that_keeps_pace_is_promoted_however_far_behind_the_newest_commit_it_trails() {
        // 200 entries behind at every look: it reaches each round's target
        // four looks later, as a member on a busy cluster does.
        let mut cluster = Cluster::steady(50, 200);
        cluster.unanswered = 3;
        catch_up_and_promote(&mut cluster, QUICK).await.expect("promoted");
        assert_eq!(cluster.promotes, 1);
    }

    #[tokio::test]
    async fn a_member_that_does_not_move_is_never_promoted() {
        let mut cluster = Cluster::steady(50, 0);
        cluster.stuck_at = Some(900);
        let waited = tokio::time::timeout(Duration::from_millis(300), catch_up_and_promote(&mut cluster, QUICK)).await;
        assert!(waited.is_err(), "a member stuck behind asked to be promoted");
        assert_eq!(cluster.promotes, 0);
    }

    #[tokio::test]
    async fn a_round_longer_than_the_limit_starts_another() {
        // Each look moves the cluster on faster than this member: a round
        // ends, but slowly; the first round that is short enough counts.
        let slow = Pacing { round: Duration::from_millis(20), ..QUICK };
        let mut cluster = Cluster::steady(1, 0);
        cluster.stuck_at = Some(0);
        cluster.frees_at = Some(Instant::now() + Duration::from_millis(60));
        catch_up_and_promote(&mut cluster, slow).await.expect("promoted once it keeps pace");
        assert!(cluster.rounds >= 2, "the long first round was not taken as caught up ({} rounds)", cluster.rounds);
    }

    #[tokio::test]
    async fn a_leader_that_finds_the_member_behind_sends_it_back_to_catching_up() {
        let mut cluster = Cluster::steady(50, 0);
        cluster.promote_answers =
            VecDeque::from([Err(refused(Code::FailedPrecondition)), Err(refused(Code::FailedPrecondition)), Ok(())]);
        catch_up_and_promote(&mut cluster, QUICK).await.expect("promoted on the third request");
        assert_eq!(cluster.promotes, 3);
        assert!(cluster.rounds >= 3, "each refusal is followed by a new round ({} rounds)", cluster.rounds);
    }

    #[tokio::test]
    async fn a_refusal_that_time_cannot_mend_ends_the_join() {
        let mut cluster = Cluster::steady(50, 0);
        cluster.promote_answers = VecDeque::from([Err(refused(Code::PermissionDenied))]);
        let error = catch_up_and_promote(&mut cluster, QUICK).await.expect_err("refused");
        assert_eq!(error.code(), Some(Code::PermissionDenied));
        assert_eq!(cluster.promotes, 1);
    }
}
