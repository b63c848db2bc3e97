//! `raft-host run`: a module's answers to commands and queries, one JSON
//! object a line, through the same runtime (limits, fuel, deterministic
//! WASI) and the same store as a member, in a temporary directory: a guest
//! author's loop with no cluster.

use anyhow::{Context, bail};
use clap::Args;
use raft_host::runtime::{EntryInfo, Limits, Machine, Runtime};
use raft_host::storage::{ApplyBatch, Identity, Store, StoreOptions};
use serde_json::{Value, json};
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct RunArgs {
    /// The component (.wasm); without one, the built-in kv guest.
    path: Option<PathBuf>,
    /// The state machine's name (its key space, as a deploy would name it).
    #[arg(long = "sm", default_value = "kv")]
    state_machine: String,
    /// Read the lines from this file instead of stdin.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Milliseconds since the Unix epoch the first entry is stamped with
    /// (each next one 1 ms later, unless a line sets `time_ms`).
    #[arg(long, default_value_t = 1_700_000_000_000)]
    time_ms: u64,
}

/// One input line: `{"apply": C}`, `{"query": Q}` or `{"migrate": PREVIOUS}`;
/// a string is sent as its UTF-8 bytes, any other JSON value as its compact
/// text (so `{"apply": {"op":"put","key":"a","value":"1"}}` works as is).
/// `"time_ms"` stamps this entry.
enum Call {
    Apply(Vec<u8>),
    Query(Vec<u8>),
    Migrate(String),
}

fn bytes_of(value: &Value) -> Vec<u8> {
    match value {
        Value::String(text) => text.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

fn parse(line: &str) -> anyhow::Result<(Call, Option<u64>)> {
    let value: Value = serde_json::from_str(line).context("not a JSON object")?;
    let Some(object) = value.as_object() else { bail!("not a JSON object") };
    let time = object.get("time_ms").map(|t| t.as_u64().context("time_ms is not a whole number")).transpose()?;
    let call = match (object.get("apply"), object.get("query"), object.get("migrate")) {
        (Some(command), None, None) => Call::Apply(bytes_of(command)),
        (None, Some(request), None) => Call::Query(bytes_of(request)),
        (None, None, Some(Value::String(previous))) => Call::Migrate(previous.clone()),
        _ => bail!(r#"expected exactly one of "apply", "query" or "migrate" (a string)"#),
    };
    if let Some(key) = object.keys().find(|k| !["apply", "query", "migrate", "time_ms"].contains(&k.as_str())) {
        bail!("unknown field {key:?}");
    }
    Ok((call, time))
}

/// A reply as the line prints it: text when it is UTF-8 (JSON when it parses).
fn shown(reply: &[u8]) -> Value {
    match std::str::from_utf8(reply) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())),
        Err(_) => json!({ "hex": raft_host::wire::hex(reply) }),
    }
}

/// The next log entry: one index on, stamped `time` or 1 ms after the last
/// (the clock never goes back).
fn next_entry(index: &mut u64, clock: &mut u64, time: Option<u64>) -> EntryInfo {
    *index += 1;
    *clock = time.unwrap_or(*clock + 1).max(*clock);
    EntryInfo { index: *index, term: 1, timestamp_ms: *clock }
}

/// Makes an entry's writes durable with its position, as a member does.
fn commit(store: &Store, entry: EntryInfo, writes: Vec<raft_host::storage::StateWrite>) -> anyhow::Result<()> {
    let batch = ApplyBatch {
        applied_index: entry.index,
        applied_term: entry.term,
        clock_ms: entry.timestamp_ms,
        writes,
        ..ApplyBatch::default()
    };
    Ok(store.apply(&batch)?)
}

/// Runs `raft-host run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (name, bytes) = match &args.path {
        Some(path) => {
            (path.display().to_string(), std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => ("built-in kv guest".to_string(), raft_guests::KV.to_vec()),
    };
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    // Applies are never synced (a member's are not either); only the log
    // is, and there is none here.
    let store = Store::open(dir.path(), &Identity::new("raft-host-run", 1), &StoreOptions::default())?;
    let runtime = Arc::new(Runtime::new(Limits::default())?);
    let module = runtime.load(&bytes).with_context(|| format!("{name} cannot be deployed"))?;
    let mut machine = Machine::new(runtime, module, args.state_machine.clone(), store.clone());
    let input: Box<dyn std::io::BufRead> = match &args.input {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut out = std::io::stdout().lock();
    let (mut index, mut clock) = (0u64, args.time_ms);
    for (number, line) in input.lines().enumerate() {
        let line = line.context("reading the input")?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (call, time) = match parse(&line) {
            Ok(parsed) => parsed,
            Err(error) => {
                writeln!(out, "{}", json!({ "line": number + 1, "input_error": format!("{error:#}") }))?;
                continue;
            }
        };
        let mut report = json!({ "line": number + 1 });
        let outcome = match call {
            Call::Query(request) => {
                let at = EntryInfo { index, term: 1, timestamp_ms: clock };
                report["query_at"] = json!(index);
                machine.query(at, &request)?.map(|reply| shown(&reply))
            }
            Call::Apply(command) => {
                let entry = next_entry(&mut index, &mut clock, time);
                let (outcomes, writes) = machine.apply_batch(&[(entry, &command)])?;
                let outcome = outcomes.into_iter().next().context("one outcome per command")?;
                commit(&store, entry, writes)?;
                report["index"] = json!(index);
                outcome.map(|reply| shown(&reply))
            }
            Call::Migrate(previous) => {
                let entry = next_entry(&mut index, &mut clock, time);
                let (outcome, writes) = machine.migrate(entry, &previous)?;
                commit(&store, entry, if outcome.is_ok() { writes } else { Vec::new() })?;
                report["index"] = json!(index);
                outcome.map(|()| Value::Null)
            }
        };
        match outcome {
            Ok(reply) => report["ok"] = reply,
            Err(error) => report["error"] = json!(error.to_string()),
        }
        report["fuel"] = json!(machine.last_fuel_used());
        writeln!(out, "{report}")?;
    }
    let keys =
        store.state_machines_with_state()?.into_iter().find(|(n, _)| *n == args.state_machine).map_or(0, |(_, k)| k);
    let digest = raft_host::wire::hex(&store.state_digest(&args.state_machine)?);
    writeln!(out, "{}", json!({ "applied": index, "keys": keys, "state_digest": digest }))?;
    Ok(())
}
