//! `raft-host certs`: a cluster's CA, member and client certificates, made
//! without openssl (see README, "Security").

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use raft_host::raft::NodeId;
use raft_host::wire::ClientRole;
use raft_host::wire::certs::{self, CertPaths};
use std::path::PathBuf;

#[derive(Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Creates the cluster's CA (ca.pem, ca.key) in --dir; it never
    /// replaces one.
    Ca {
        #[command(flatten)]
        place: Place,
        /// The cluster it is the CA of (what `serve --cluster` says).
        #[arg(long, default_value = "raft-host")]
        cluster: String,
    },
    /// Issues member ID's certificate (member-ID.pem, .key), for the host
    /// names and addresses it is reached at.
    Member {
        #[command(flatten)]
        place: Place,
        #[arg(long)]
        id: NodeId,
        /// A host name or IP address the member is reached at; repeat for each.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// Issues a client certificate (client-NAME.pem, .key) with a role.
    Client {
        #[command(flatten)]
        place: Place,
        /// The client's name (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// What it may do: reader (reads, status), writer (and writes), admin
        /// (and deploys, membership, leadership, maintenance).
        #[arg(long, value_enum)]
        role: RoleArg,
    },
}

#[derive(Args)]
struct Place {
    /// The directory of the cluster's certificates.
    #[arg(long, env = "RAFT_HOST_CERTS_DIR", default_value = "certs")]
    dir: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Reader,
    Writer,
    Admin,
}

pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    let made = match args.what {
        What::Ca { place, cluster } => certs::create_ca(&place.dir, &cluster, place.days).context("creating the CA")?,
        What::Member { place, id, hosts } => {
            certs::issue_member(&place.dir, id, &hosts, place.days).context("issuing a member certificate")?
        }
        What::Client { place, name, role } => {
            let role = match role {
                RoleArg::Reader => ClientRole::Reader,
                RoleArg::Writer => ClientRole::Writer,
                RoleArg::Admin => ClientRole::Admin,
            };
            certs::issue_client(&place.dir, &name, role, place.days).context("issuing a client certificate")?
        }
    };
    let CertPaths { cert, key } = made;
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}
