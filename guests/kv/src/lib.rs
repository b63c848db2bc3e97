//! The built-in key-value state machine. Commands and queries are JSON, so
//! the CLI and any client can drive it by hand:
//!
//! - `{"op":"put","key":K,"value":V}` → `{"previous":V_or_null}`; with
//!   `"return_previous":false` → `{}` (as etcd's put without `prev_kv`:
//!   the answer, and the client's session on every member, stay small)
//! - `{"op":"delete","key":K}` → `{"deleted":true_or_false}`
//! - `{"op":"cas","key":K,"expected":V_or_null,"value":V}` →
//!   `{"ok":true}` or `{"ok":false,"current":V_or_null}`
//! - query `{"op":"get","key":K}` → `{"value":V_or_null}`
//! - query `{"op":"range","start":K,"end":K_or_null,"limit":N}` →
//!   `{"items":[{"key":K,"value":V},...]}`
//!
//! Keys and values are UTF-8 strings, stored as their bytes.

use raft_guest::{StateMachine, json, kv};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Put {
        key: String,
        value: String,
        #[serde(default = "answers_with_previous")]
        return_previous: bool,
    },
    Delete { key: String },
    Cas { key: String, expected: Option<String>, value: String },
}

/// A put, the command nearly every client sends, decoded in one pass with
/// its strings borrowed from the command where they hold no escapes.
/// `Command` is internally tagged, and serde decodes such an enum by first
/// gathering every field into a tree of its own, then decoding the variant
/// from that tree into owned strings: ~250 ns of a ~1.8 µs apply here
/// (`cargo bench --bench runtime`). Whatever this does not take (another
/// op, a bad field, malformed JSON) is decoded again as a `Command`, so
/// every command means, and every refusal reads, exactly what it did.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastPut<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow)]
    value: Cow<'a, str>,
    #[serde(default = "answers_with_previous")]
    return_previous: bool,
}

impl<'a> FastPut<'a> {
    fn decode(command: &'a [u8]) -> Option<FastPut<'a>> {
        json::decode::<FastPut>(command).ok().filter(|put| put.op == "put")
    }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Query {
    Get { key: String },
    Range { start: String, end: Option<String>, limit: u32 },
}

#[derive(Serialize)]
struct Item {
    key: String,
    value: String,
}

/// A put answers with the value it replaced unless asked not to.
fn answers_with_previous() -> bool {
    true
}

/// Most pairs one range query returns, whatever `limit` asks for.
const RANGE_LIMIT_MAX: u32 = 10_000;

fn read(key: &str) -> Result<Option<String>, String> {
    kv::get(key.as_bytes())
        .map(|bytes| String::from_utf8(bytes).map_err(|_| format!("value of {key:?} is not UTF-8")))
        .transpose()
}

struct Kv;

fn put(key: &str, value: &str, return_previous: bool) -> Result<Vec<u8>, String> {
    if !return_previous {
        kv::set(key.as_bytes(), value.as_bytes())?;
        return json::encode(&serde_json_value::object([]));
    }
    let previous = read(key)?;
    kv::set(key.as_bytes(), value.as_bytes())?;
    json::encode(&serde_json_value::object([("previous", previous)]))
}

impl StateMachine for Kv {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        if let Some(FastPut { key, value, return_previous, .. }) = FastPut::decode(command) {
            return put(&key, &value, return_previous);
        }
        match json::decode(command)? {
            Command::Put { key, value, return_previous } => put(&key, &value, return_previous),
            Command::Delete { key } => {
                let existed = kv::get(key.as_bytes()).is_some();
                kv::delete(key.as_bytes())?;
                json::encode(&Deleted { deleted: existed })
            }
            Command::Cas { key, expected, value } => {
                let current = read(&key)?;
                if current == expected {
                    kv::set(key.as_bytes(), value.as_bytes())?;
                    json::encode(&CasReply { ok: true, current: None })
                } else {
                    json::encode(&CasReply { ok: false, current: Some(current) })
                }
            }
        }
    }

    fn query(request: &[u8]) -> Result<Vec<u8>, String> {
        match json::decode(request)? {
            Query::Get { key } => json::encode(&serde_json_value::object([("value", read(&key)?)])),
            Query::Range { start, end, limit } => {
                let pairs = kv::scan(start.as_bytes(), end.as_deref().map(str::as_bytes), limit.min(RANGE_LIMIT_MAX));
                let items = pairs
                    .into_iter()
                    .map(|(k, v)| {
                        let key = String::from_utf8(k).map_err(|_| "a key is not UTF-8".to_string())?;
                        let value = String::from_utf8(v).map_err(|_| format!("value of {key:?} is not UTF-8"))?;
                        Ok(Item { key, value })
                    })
                    .collect::<Result<Vec<Item>, String>>()?;
                json::encode(&Items { items })
            }
        }
    }
}

#[derive(Serialize)]
struct Deleted {
    deleted: bool,
}

#[derive(Serialize)]
struct CasReply {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    current: Option<Option<String>>,
}

#[derive(Serialize)]
struct Items {
    items: Vec<Item>,
}

/// A one-field JSON object whose value may be null.
mod serde_json_value {
    use serde::Serialize;
    use serde::ser::SerializeMap;

    pub struct Object<const N: usize>([(&'static str, Option<String>); N]);

    pub fn object<const N: usize>(fields: [(&'static str, Option<String>); N]) -> Object<N> {
        Object(fields)
    }

    impl<const N: usize> Serialize for Object<N> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(N))?;
            for (name, value) in &self.0 {
                map.serialize_entry(name, value)?;
            }
            map.end()
        }
    }
}

raft_guest::export!(Kv);
