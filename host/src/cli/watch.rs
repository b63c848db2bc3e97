//! `raft-host watch`: prints a state machine's changes as they commit.

use super::client::{ConsistencyArg, Target};
use anyhow::bail;
use clap::Args;
use raft_host::client::{ClientError, Consistency, WatchSpec};
use raft_host::wire::client_pb::Change;
use serde_json::json;
use std::io::Write as _;

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    target: Target,
    /// The state machine whose keys to watch.
    #[arg(long = "sm", env = "RAFT_HOST_SM", default_value = "kv")]
    state_machine: String,
    /// Keys that start with this (default: every key).
    #[arg(long, conflicts_with_all = ["start", "end"])]
    prefix: Option<String>,
    /// Keys from this one on (with --end, up to it, not included).
    #[arg(long)]
    start: Option<String>,
    /// Keys before this one.
    #[arg(long)]
    end: Option<String>,
    /// The first log index to print changes of (default: from now). To
    /// resume, give the last printed index + 1 (or the covered index + 1
    /// that --progress prints).
    #[arg(long)]
    from_index: Option<u64>,
    /// Print each change's previous value too.
    #[arg(long)]
    previous: bool,
    /// What "now" is without --from-index.
    #[arg(long, value_enum, default_value = "linearizable")]
    consistency: ConsistencyArg,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Also print how far the watch got when no change came (JSON:
    /// {"covered_index": N}).
    #[arg(long)]
    progress: bool,
    /// Stop after this many changes.
    #[arg(long)]
    count: Option<u64>,
}

/// Runs `raft-host watch`.
pub fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let consistency = match args.consistency {
        ConsistencyArg::Linearizable => Consistency::Linearizable,
        ConsistencyArg::Stale => Consistency::Stale,
        ConsistencyArg::Lease => bail!("a watch starts linearizable or stale, not lease"),
    };
    let spec = WatchSpec {
        state_machine: args.state_machine.clone(),
        prefix: args.prefix.clone().unwrap_or_default().into_bytes(),
        range_start: args.start.clone().unwrap_or_default().into_bytes(),
        range_end: args.end.clone().unwrap_or_default().into_bytes(),
        from_index: args.from_index.unwrap_or(0),
        previous_values: args.previous,
        consistency,
    };
    super::runtime()?.block_on(async {
        let mut client = args.target.client()?;
        let mut watch = client.watch(spec)?;
        let mut printed = 0u64;
        let mut announced = false;
        let stdout = std::io::stdout();
        loop {
            let batch = match watch.next().await {
                Ok(batch) => batch,
                Err(ClientError::Compacted { floor, message }) => {
                    bail!("{message}\n(the member holds changes from index {} on)", floor + 1)
                }
                Err(error) => return Err(error.into()),
            };
            let mut out = stdout.lock();
            if !announced && let Some(start) = watch.start_index() {
                announced = true;
                if !args.json {
                    eprintln!("watching {:?} from index {start}", args.state_machine);
                }
            }
            for change in &batch.changes {
                if args.json {
                    writeln!(out, "{}", change_json(change, args.previous))?;
                } else {
                    writeln!(out, "{}", change_text(change, args.previous))?;
                }
                printed += 1;
                if args.count.is_some_and(|count| printed >= count) {
                    out.flush()?;
                    return Ok(());
                }
            }
            if batch.changes.is_empty() && args.progress {
                if args.json {
                    writeln!(out, "{}", json!({ "covered_index": batch.covered_index }))?;
                } else {
                    writeln!(out, "# covered through index {}", batch.covered_index)?;
                }
            }
            out.flush()?;
        }
    })
}

/// Bytes as text when they are UTF-8, else as hex with a `0x` in front.
fn shown(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => format!("0x{}", raft_host::wire::hex(bytes)),
    }
}

fn change_text(change: &Change, previous: bool) -> String {
    let mut line = if change.deleted {
        format!("{} delete {}", change.index, shown(&change.key))
    } else {
        format!("{} put {} {}", change.index, shown(&change.key), shown(&change.value))
    };
    if previous {
        match &change.previous {
            Some(value) => line.push_str(&format!(" (was {})", shown(value))),
            None => line.push_str(" (new)"),
        }
    }
    line
}

fn change_json(change: &Change, previous: bool) -> serde_json::Value {
    let mut object = json!({
        "index": change.index,
        "type": if change.deleted { "delete" } else { "put" },
        "key": shown(&change.key),
    });
    if !change.deleted {
        object["value"] = json!(shown(&change.value));
    }
    if previous {
        object["previous"] = change.previous.as_deref().map_or(serde_json::Value::Null, |v| json!(shown(v)));
    }
    object
}
