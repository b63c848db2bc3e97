//! `raft-host members`, `transfer-leader`, `offline` and `online`: changing
//! who is in the cluster and who leads it, and maintenance.

use super::client::Target;
use anyhow::Context;
use clap::{Args, Subcommand};
use raft_host::wire::client_pb::{MembersResponse, MembershipChange};
use serde_json::json;

#[derive(Args)]
pub struct MembersArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: MembersAction,
}

#[derive(Subcommand)]
enum MembersAction {
    /// Lists the members (voters and learners) and their addresses.
    List,
    /// Adds a learner: it receives the log (or a snapshot) and catches up
    /// without voting. Start it first with `raft-host serve --id ID --join ...`
    /// or with plain `serve` and no peers.
    Add {
        /// The new member's id.
        id: u64,
        /// Where the others reach it (host:port).
        address: String,
    },
    /// Makes a caught-up learner a voter.
    Promote { id: u64 },
    /// Removes a voter or a learner (the leader included: it hands over
    /// leadership first).
    Remove { id: u64 },
}

pub fn members(args: MembersArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let response = runtime.block_on(async {
        let mut client = args.target.client()?;
        let response = match args.action {
            MembersAction::List => client.members().await,
            MembersAction::Add { id, ref address } => {
                client.change_membership(MembershipChange::AddLearner, id, address).await
            }
            MembersAction::Promote { id } => client.change_membership(MembershipChange::Promote, id, "").await,
            MembersAction::Remove { id } => client.change_membership(MembershipChange::Remove, id, "").await,
        };
        response.context("membership request failed")
    })?;
    print_members(&response, args.json);
    Ok(())
}

fn print_members(response: &MembersResponse, as_json: bool) {
    if as_json {
        let members: Vec<_> =
            response.members.iter().map(|m| json!({"id": m.id, "address": m.address, "kind": m.kind})).collect();
        println!("{}", json!({"members": members, "index": (response.index > 0).then_some(response.index)}));
        return;
    }
    if response.index > 0 {
        println!("applied at index {}", response.index);
    }
    for m in &response.members {
        println!("{} {} {}", m.id, m.address, m.kind);
    }
}

#[derive(Args)]
pub struct TransferLeaderArgs {
    #[command(flatten)]
    target: Target,
    /// The voter to hand leadership to.
    #[arg(long)]
    to: u64,
}

pub fn transfer_leader(args: TransferLeaderArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let response = runtime
        .block_on(async { args.target.client()?.transfer_leader(args.to).await.context("leader transfer failed") })?;
    println!("member {} leads term {}", response.leader_id, response.term);
    Ok(())
}

#[derive(Args)]
pub struct MaintenanceArgs {
    /// The member to change (host:port; only the first address is used).
    #[command(flatten)]
    target: Target,
}

/// Takes the member at `--addr` offline (or back online).
pub fn set_offline(args: MaintenanceArgs, offline: bool) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    runtime.block_on(async {
        args.target.client()?.set_offline(0, offline).await.context("maintenance request failed")
    })?;
    if offline {
        println!("offline: the member follows the log but neither votes nor campaigns (`raft-host online` undoes it)");
    } else {
        println!("online: the member votes and campaigns again");
    }
    Ok(())
}
