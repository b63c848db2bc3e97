//! {{name}}: a raft-host state machine. Commands and queries are JSON:
//! command `{"op":"add","key":K,"by":N}` adds N to counter K and replies
//! with its new value; query `{"op":"get","key":K}` replies with it.
//! Every replica applies the same commands in the same order; keep all
//! state in `kv`, never in statics.

use raft_guest::{StateMachine, json, kv};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Add { key: String, by: i64 },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Query {
    Get { key: String },
}

struct Machine;

impl StateMachine for Machine {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        let Command::Add { key, by } = json::decode(command)?;
        let current = kv::get_json::<i64>(key.as_bytes())?.unwrap_or(0);
        let next = current.checked_add(by).ok_or_else(|| format!("adding {by} to {current} overflows"))?;
        kv::set_json(key.as_bytes(), &next)?;
        json::encode(&next)
    }

    fn query(request: &[u8]) -> Result<Vec<u8>, String> {
        let Query::Get { key } = json::decode(request)?;
        json::encode(&kv::get_json::<i64>(key.as_bytes())?.unwrap_or(0))
    }
}

raft_guest::export!(Machine);

/// Run with `cargo test`: the logic on this machine, against a host in
/// memory with the same transaction rules as a member.
#[cfg(test)]
mod tests {
    use super::Machine;
    use raft_guest::testing::TestHost;

    #[test]
    fn adds_are_answered_with_the_new_value_and_queries_see_them() {
        let mut host = TestHost::<Machine>::new();
        assert_eq!(host.apply(br#"{"op":"add","key":"a","by":2}"#), Ok(b"2".to_vec()));
        assert_eq!(host.apply(br#"{"op":"add","key":"a","by":3}"#), Ok(b"5".to_vec()));
        assert_eq!(host.query(br#"{"op":"get","key":"a"}"#), Ok(b"5".to_vec()));
        assert_eq!(host.query(br#"{"op":"get","key":"b"}"#), Ok(b"0".to_vec()));
    }

    #[test]
    fn a_refused_command_changes_nothing() {
        let mut host = TestHost::<Machine>::new();
        host.insert(b"a", i64::MAX.to_string().as_bytes());
        assert!(host.apply(br#"{"op":"add","key":"a","by":1}"#).is_err());
        assert!(host.apply(br#"{"op":"nope"}"#).is_err());
        assert_eq!(host.get(b"a"), Some(i64::MAX.to_string().into_bytes()));
    }
}
