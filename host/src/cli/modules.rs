//! `raft-host deploy`, `modules` and `activate`: state machine versions of a
//! running cluster.

use super::client::Target;
use anyhow::Context;
use clap::Args;
use raft_host::client::ClusterClient;
use raft_host::wire::client_pb::{DeployProgress, ModuleVersionInfo};
use serde_json::json;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    target: Target,
    /// The state machine to deploy for; a new name adds a state machine.
    #[arg(long)]
    name: String,
    /// Only upload and compile it on every member; switch later with
    /// `raft-host activate`.
    #[arg(long)]
    no_activate: bool,
    /// The component (.wasm).
    path: PathBuf,
}

#[derive(Args)]
pub struct ModulesArgs {
    #[command(flatten)]
    target: Target,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Option<ModulesAction>,
}

#[derive(clap::Subcommand)]
enum ModulesAction {
    /// Removes a version a state machine does not run, through the log; its
    /// bytes go once no state machine lists it.
    Remove {
        #[arg(long)]
        name: String,
        /// The version's hash, or a unique prefix of at least 8 hex digits.
        #[arg(long)]
        hash: String,
    },
}

#[derive(Args)]
pub struct ActivateArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    name: String,
    /// The version's hash (as `raft-host modules` lists it; a unique prefix
    /// of at least 8 hex digits is enough).
    #[arg(long)]
    hash: String,
}

pub fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let module = std::fs::read(&args.path).with_context(|| format!("cannot read {}", args.path.display()))?;
    let runtime = super::runtime()?;
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let last = runtime.block_on(async {
        let mut client = args.target.client()?;
        client
            .deploy(&args.name, &module, !args.no_activate, |progress| report(progress, terminal))
            .await
            .context("deploy failed")
    })?;
    if terminal {
        eprintln!();
    }
    let hash = &last.module_hash;
    match last.phase.as_str() {
        "activated" => println!(
            "{}: module {hash} ({} bytes) active at index {} after {:.1?}",
            args.name,
            module.len(),
            last.index,
            started.elapsed()
        ),
        _ => println!(
            "{}: module {hash} ({} bytes) stored and compiled on every live member; activate it with `raft-host activate --name {} --hash {hash}`",
            args.name,
            module.len(),
            args.name
        ),
    }
    if !last.detail.is_empty() {
        println!("{}", last.detail);
    }
    Ok(())
}

/// A progress line on a terminal, rewritten in place.
fn report(progress: &DeployProgress, terminal: bool) {
    if !terminal {
        return;
    }
    let line = match progress.phase.as_str() {
        "received" => format!("uploaded {} bytes; validating", progress.total),
        "validated" => format!("valid; module {}", progress.module_hash.get(..16).unwrap_or_default()),
        "replicating" => {
            let width = 30;
            let filled = (progress.done * width).checked_div(progress.total).unwrap_or(width) as usize;
            format!(
                "replicating [{}{}] {}/{} KiB",
                "#".repeat(filled),
                " ".repeat(width as usize - filled),
                progress.done >> 10,
                progress.total >> 10
            )
        }
        "compiling" => format!("compiled on {} of {} members", progress.done, progress.total),
        other => other.to_string(),
    };
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "\r\x1b[2K{line}");
    let _ = stderr.flush();
}

pub fn modules(args: ModulesArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    if let Some(ModulesAction::Remove { name, hash }) = &args.action {
        let (hash, index) = runtime.block_on(async {
            let mut client = args.target.client()?;
            let hash = full_hash(&mut client, name, hash).await?;
            let index = client.remove_module(name, &hash).await.context("remove failed")?;
            anyhow::Ok((hash, index))
        })?;
        println!("{name}: version {hash} removed at index {index}");
        return Ok(());
    }
    let versions = runtime.block_on(async { args.target.client()?.modules().await.context("modules failed") })?;
    if args.json {
        let list: Vec<_> = versions.versions.iter().map(version_json).collect();
        println!("{}", json!({ "versions": list }));
        return Ok(());
    }
    println!("{:<16} {:<16} {:>10} {:>8} {:>10}  active", "state machine", "module", "bytes", "deployed", "activated");
    for v in &versions.versions {
        let deployed =
            if v.built_in && v.deploy_index == 0 { "built-in".to_string() } else { v.deploy_index.to_string() };
        println!(
            "{:<16} {:<16} {:>10} {:>8} {:>10}  {}",
            v.state_machine,
            v.module_hash.get(..16).unwrap_or(&v.module_hash),
            v.size_bytes,
            deployed,
            if v.activated_index == 0 { "-".to_string() } else { v.activated_index.to_string() },
            if v.active { "*" } else { "" }
        );
    }
    Ok(())
}

fn version_json(v: &ModuleVersionInfo) -> serde_json::Value {
    json!({
        "state_machine": v.state_machine,
        "module_hash": v.module_hash,
        "size_bytes": v.size_bytes,
        "deploy_index": v.deploy_index,
        "activated_index": v.activated_index,
        "active": v.active,
        "built_in": v.built_in,
    })
}

pub fn activate(args: ActivateArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let (hash, response) = runtime.block_on(async {
        let mut client = args.target.client()?;
        let hash = full_hash(&mut client, &args.name, &args.hash).await?;
        let response = client.activate(&args.name, &hash).await.context("activate failed")?;
        anyhow::Ok((hash, response))
    })?;
    let previous = if response.previous_hash.is_empty() { "nothing".to_string() } else { response.previous_hash };
    println!("{}: module {hash} active at index {} (was {previous})", args.name, response.index);
    if !response.unreachable.is_empty() {
        println!("members {:?} did not answer; they switch when they catch up", response.unreachable);
    }
    Ok(())
}

/// `hash` whole: as given, or the one version of `name` it is a prefix of.
async fn full_hash(client: &mut ClusterClient, name: &str, hash: &str) -> anyhow::Result<String> {
    if hash.len() == 64 {
        return Ok(hash.to_string());
    }
    let versions = client.modules().await.context("listing versions failed")?;
    resolve_prefix(name, hash, &versions.versions)
}

/// The one version of `name` whose hash starts with `prefix`.
fn resolve_prefix(name: &str, prefix: &str, versions: &[ModuleVersionInfo]) -> anyhow::Result<String> {
    let prefix = prefix.to_ascii_lowercase();
    if prefix.len() < 8 {
        anyhow::bail!("give at least 8 hex digits of the hash");
    }
    let matching: Vec<&ModuleVersionInfo> =
        versions.iter().filter(|v| v.state_machine == name && v.module_hash.starts_with(&prefix)).collect();
    match matching.as_slice() {
        [one] => Ok(one.module_hash.clone()),
        [] => anyhow::bail!("no version of {name:?} has a hash starting with {prefix} (see `raft-host modules`)"),
        _ => anyhow::bail!("several versions of {name:?} start with {prefix}; give more digits"),
    }
}
