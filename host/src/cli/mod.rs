//! The command line: parse, call the library, print. Every flag of `serve`
//! can also come from an environment variable (`RAFT_HOST_*`) or a TOML
//! config file (`--config`); a flag beats the environment, which beats the
//! file, which beats the default.

mod bench;
mod bench_deploy;
mod bench_guest;
mod certs;
mod client;
mod demo;
mod endpoint;
mod guest_tools;
mod members;
mod modules;
mod new;
mod run;
mod serve;
mod snapshot;
mod watch;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "raft-host", version, about = "A Raft host whose state machines are WebAssembly components")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text` for people, `json` (one
    /// object a line, with the request's spans) for a log pipeline.
    #[arg(long, global = true, env = "RAFT_HOST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// See [`Cli::log_format`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one member of a cluster; peers and clients use the same port.
    Serve(Box<serve::ServeArgs>),
    /// Runs a local cluster (three members by default) with the built-in
    /// state machines, data in a temporary directory, and prints how to
    /// talk to it. Stops on Ctrl-C.
    Dev(serve::DevArgs),
    /// Replicates a command and prints the state machine's answer.
    Write(client::WriteArgs),
    /// Answers a query and prints the state machine's answer.
    Read(client::ReadArgs),
    /// Prints a member's view of the cluster.
    Status(client::StatusArgs),
    /// Prints a state machine's changes (a key prefix or range) as they
    /// commit, from now or from a log index; follows the cluster across
    /// member failures and resumes without a gap or a repeat.
    Watch(watch::WatchArgs),
    /// Every member's status or health in one table (with --cluster, every
    /// member the cluster lists).
    Endpoint(endpoint::EndpointArgs),
    /// Uploads a state machine module (a WebAssembly component) to a running
    /// cluster through the log, and activates it once every live member has
    /// compiled it; every replica switches at the same log index.
    Deploy(modules::DeployArgs),
    /// Lists every state machine's versions: hash, size, where it was
    /// deployed and last activated, and which one is active.
    Modules(modules::ModulesArgs),
    /// Switches a state machine to one of its stored versions (a rollback
    /// is an activation of the older hash).
    Activate(modules::ActivateArgs),
    /// Lists the members, or adds a learner, promotes one to voter, or
    /// removes a member, one change at a time through the log.
    Members(members::MembersArgs),
    /// Hands leadership to another voter once it holds the whole log.
    TransferLeader(members::TransferLeaderArgs),
    /// Takes a member offline for maintenance: it keeps following the log
    /// but neither votes nor campaigns (a leader hands over first).
    /// Survives restarts.
    Offline(members::MaintenanceArgs),
    /// Brings a member back from maintenance.
    Online(members::MaintenanceArgs),
    /// Closed-loop clients against a running cluster: throughput, errors
    /// and latency percentiles (with --disk, the disk's fdatasync too).
    Bench(bench::BenchArgs),
    /// Hot deploys under write load: time until a 1 MB and a 30 MB module
    /// are active on every member, and write latency during the switch
    /// against steady state.
    BenchDeploy(bench_deploy::BenchDeployArgs),
    /// What a state machine module costs: size, first compile, load from
    /// the compiled cache, and apply calls/s next to the built-in Rust kv.
    BenchGuest(bench_guest::BenchGuestArgs),
    /// Runs a cluster of the consensus core in this process (in-memory log,
    /// in-memory network): elects a leader, writes, crashes the leader,
    /// re-elects, restarts the old leader and checks every replica converged.
    Demo(DemoArgs),
    /// Creates a ready-to-build guest project (source, tests, build steps,
    /// README) from the templates kept in the repository.
    New(new::NewArgs),
    /// Writes C bindings (a header, their source and the world's type
    /// object, from wit-bindgen's C generator) for the state-machine world,
    /// for guests in C or C++.
    Bindings(guest_tools::BindingsArgs),
    /// Wraps a core WebAssembly module (clang's output for wasm32-wasi,
    /// linked with the bindings) into a state-machine component, checked
    /// against the world.
    Componentize(guest_tools::ComponentizeArgs),
    /// Applies commands and answers queries (one JSON object a line:
    /// {"apply": C}, {"query": Q}, {"migrate": PREVIOUS}) with a module, on
    /// a temporary store through the same runtime as a member; prints each
    /// answer or error with the fuel it used, then the state digest.
    Run(run::RunArgs),
    /// Checks that a WebAssembly component fits the raft:host/state-machine
    /// world and compiles under the host's limits, as a deploy would, and
    /// prints its hash and size. Without a path, checks the built-in kv guest.
    Validate(ValidateArgs),
    /// Backs a cluster up to a file, says what a backup holds, and builds a
    /// new cluster's data directories from one (after losing quorum, or to
    /// copy a cluster).
    Snapshot(snapshot::SnapshotArgs),
    /// Prints a completion script for a shell: `source <(raft-host
    /// completions bash)`, or save it where the shell looks (for zsh a file
    /// `_raft-host` on $fpath, for fish ~/.config/fish/completions/).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Makes a cluster's certificates without openssl: its CA, a member's
    /// certificate (id and addresses), a client's (name and role).
    Certs(certs::CertsArgs),
}

#[derive(Args)]
pub struct ValidateArgs {
    /// The component (.wasm) to check.
    path: Option<PathBuf>,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Members in the cluster (1 to 7).
    #[arg(long, env = "RAFT_DEMO_NODES", default_value_t = 3)]
    nodes: u64,
    /// Writes to commit in total (half before the crash, half after).
    #[arg(long, env = "RAFT_DEMO_WRITES", default_value_t = 10_000)]
    writes: u64,
    /// Seed of the election timeouts; the same seed replays the same run.
    #[arg(long, env = "RAFT_DEMO_SEED", default_value_t = 1)]
    seed: u64,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(*args),
        Command::Dev(args) => serve::dev(args),
        Command::Write(args) => client::write(args),
        Command::Read(args) => client::read(args),
        Command::Status(args) => client::status(args),
        Command::Watch(args) => watch::watch(args),
        Command::Endpoint(args) => endpoint::endpoint(args),
        Command::Deploy(args) => modules::deploy(args),
        Command::Modules(args) => modules::modules(args),
        Command::Activate(args) => modules::activate(args),
        Command::Members(args) => members::members(args),
        Command::TransferLeader(args) => members::transfer_leader(args),
        Command::Offline(args) => members::set_offline(args, true),
        Command::Online(args) => members::set_offline(args, false),
        Command::Bench(args) => bench::bench(args),
        Command::BenchDeploy(args) => bench_deploy::bench_deploy(args),
        Command::BenchGuest(args) => bench_guest::bench_guest(args),
        Command::Demo(args) => demo::demo(&args),
        Command::Validate(args) => demo::validate(&args),
        Command::Run(args) => run::run(args),
        Command::New(args) => new::new(args),
        Command::Bindings(args) => guest_tools::bindings(args),
        Command::Componentize(args) => guest_tools::componentize(args),
        Command::Certs(args) => certs::certs(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "raft-host", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// A tokio runtime for a command.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// A tokio runtime with `workers` worker threads (tokio's default, one per
/// core, when `None`).
fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    Ok(builder.enable_all().build()?)
}
