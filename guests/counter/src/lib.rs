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

/// The counter's logic, run on the machine by `cargo test` against
/// `raft_guest::testing::TestHost` (no cluster, no WebAssembly build).
#[cfg(test)]
mod tests {
    use super::Counter;
    use raft_guest::testing::TestHost;

    #[test]
    fn adds_answer_the_new_value_and_a_get_sees_it() {
        let mut host = TestHost::<Counter>::new();
        assert_eq!(host.apply(br#"{"op":"add","by":5}"#), Ok(b"5".to_vec()));
        assert_eq!(host.apply(br#"{"op":"add","by":-7}"#), Ok(b"-2".to_vec()));
        assert_eq!(host.query(br#"{"op":"get"}"#), Ok(b"-2".to_vec()));
        assert_eq!(host.get(b"count"), Some(b"-2".to_vec()), "the state is the JSON number");
    }

    #[test]
    fn an_overflow_or_a_malformed_command_is_refused_and_changes_nothing() {
        let mut host = TestHost::<Counter>::new();
        host.insert(b"count", i64::MAX.to_string().as_bytes());
        let refused = host.apply(br#"{"op":"add","by":1}"#).expect_err("overflow");
        assert!(refused.contains("overflows"), "{refused}");
        assert!(host.apply(br#"{"op":"add"}"#).expect_err("no by").starts_with("invalid JSON"));
        assert_eq!(host.get(b"count"), Some(i64::MAX.to_string().into_bytes()), "nothing written");
        assert!(host.query(br#"{"op":"add","by":1}"#).is_err(), "a query is not a command");
    }
}
