//! Version 2 of the counter, for hot-deploy tests and demos: the same
//! commands and state as `counter`, but every answer says which version
//! gave it, so a client can see exactly where the switch happened.
//!
//! - command `{"op":"add","by":N}` → `{"value":N,"version":2}`
//! - query `{"op":"get"}` → `{"value":N,"version":2,"migrated_from":HASH_or_null}`
//!
//! Its migrate hook records the version it replaced, and refuses to take
//! over a negative count (to show a failed activation: the old version keeps
//! serving, on every replica).

use raft_guest::{StateMachine, json, kv};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Add { by: i64 },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Query {
    Get,
}

#[derive(Serialize)]
struct Answer {
    value: i64,
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    migrated_from: Option<Option<String>>,
}

/// The key `counter` keeps its count under; v2 keeps the same state.
const KEY: &[u8] = b"count";
const MIGRATED_FROM: &[u8] = b"v2/migrated-from";

struct CounterV2;

impl StateMachine for CounterV2 {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        let Command::Add { by } = json::decode(command)?;
        let current = kv::get_json::<i64>(KEY)?.unwrap_or(0);
        let next = current.checked_add(by).ok_or_else(|| format!("adding {by} to {current} overflows"))?;
        kv::set_json(KEY, &next)?;
        json::encode(&Answer { value: next, version: 2, migrated_from: None })
    }

    fn query(request: &[u8]) -> Result<Vec<u8>, String> {
        let Query::Get = json::decode(request)?;
        let value = kv::get_json::<i64>(KEY)?.unwrap_or(0);
        let migrated_from = kv::get_json::<String>(MIGRATED_FROM)?;
        json::encode(&Answer { value, version: 2, migrated_from: Some(migrated_from) })
    }

    fn migrate(previous: &str) -> Result<(), String> {
        let current = kv::get_json::<i64>(KEY)?.unwrap_or(0);
        if current < 0 {
            return Err(format!("version 2 does not take over a negative count ({current})"));
        }
        kv::set_json(MIGRATED_FROM, &previous.to_string())
    }
}

raft_guest::export!(CounterV2);
