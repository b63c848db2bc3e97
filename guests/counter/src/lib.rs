//! A counter. Command `{"op":"add","by":N}` replies with the new value;
//! query `{"op":"get"}` replies with the value. Values are signed 64-bit and
//! an overflowing add is refused.

use raft_guest::{StateMachine, json, kv};
use serde::Deserialize;

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

const KEY: &[u8] = b"count";

struct Counter;

impl StateMachine for Counter {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        let Command::Add { by } = json::decode(command)?;
        let current = kv::get_json::<i64>(KEY)?.unwrap_or(0);
        let next = current.checked_add(by).ok_or_else(|| format!("adding {by} to {current} overflows"))?;
        kv::set_json(KEY, &next)?;
        json::encode(&next)
    }

    fn query(request: &[u8]) -> Result<Vec<u8>, String> {
        let Query::Get = json::decode(request)?;
        json::encode(&kv::get_json::<i64>(KEY)?.unwrap_or(0))
    }
}

raft_guest::export!(Counter);
