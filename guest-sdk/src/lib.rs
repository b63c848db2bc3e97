//! Write raft-host state machines in Rust.
//!
//! Implement [`StateMachine`] on a type, call [`export!`] once, and build the
//! crate for `wasm32-wasip2` as a `cdylib`: the result is a component that
//! raft-host can deploy. State lives in the host's replicated store, reached
//! through [`kv`]; [`context`] tells which log entry is being applied and
//! gives deterministic time and randomness. Never keep state in statics: the
//! host may re-create the instance between any two calls.
//!
//! ```no_run
//! use raft_guest::{kv, StateMachine};
//!
//! struct Counter;
//!
//! impl StateMachine for Counter {
//!     fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
//!         let by: i64 = raft_guest::json::decode(command)?;
//!         let now = kv::get_json::<i64>(b"count")?.unwrap_or(0) + by;
//!         kv::set_json(b"count", &now)?;
//!         raft_guest::json::encode(&now)
//!     }
//!     fn query(_: &[u8]) -> Result<Vec<u8>, String> {
//!         raft_guest::json::encode(&kv::get_json::<i64>(b"count")?.unwrap_or(0))
//!     }
//! }
//!
//! raft_guest::export!(Counter);
//! ```

// The generated bindings name this crate by its public path, which must also
// resolve from inside it.
extern crate self as raft_guest;

/// The bindings generated from `wit/raft-host.wit`. Guest code uses the
/// wrappers in this crate instead.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "state-machine",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_state_machine",
        default_bindings_module: "raft_guest::bindings",
        runtime_path: "raft_guest::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// A replicated state machine. `apply` and `migrate` may write through
/// [`kv`]; `query` may only read.
pub trait StateMachine {
    /// Applies a committed command; the result is the client's reply. An
    /// `Err` reply discards this command's writes.
    fn apply(command: &[u8]) -> Result<Vec<u8>, String>;

    /// Answers a read.
    fn query(request: &[u8]) -> Result<Vec<u8>, String>;

    /// Runs once when this version is activated over `previous` (the older
    /// version's content hash). The default keeps the data as it is.
    fn migrate(previous: &str) -> Result<(), String> {
        let _ = previous;
        Ok(())
    }
}

/// Exports a [`StateMachine`] implementation as the component's `apply`,
/// `query` and `migrate`.
#[macro_export]
macro_rules! export {
    ($machine:ty) => {
        const _: () = {
            struct RaftGuestExports;

            impl $crate::bindings::Guest for RaftGuestExports {
                fn apply(
                    command: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    <$machine as $crate::StateMachine>::apply(&command)
                }
                fn query(
                    request: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    <$machine as $crate::StateMachine>::query(&request)
                }
                fn migrate(previous: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    <$machine as $crate::StateMachine>::migrate(&previous)
                }
            }

    $crate::bindings::__export_state_machine!(RaftGuestExports with_types_in $crate::bindings);
        };
    };
}

/// The state machine's replicated key-value store. Built for anything but
/// WebAssembly (`cargo test` on the machine), it is [`testing::TestHost`]'s
/// store in memory.
pub mod kv {
    use crate::bindings::raft::host::kv as raw;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    pub use raw::KvError;

    #[cfg(not(target_arch = "wasm32"))]
    use crate::testing::kv as backend;
    #[cfg(target_arch = "wasm32")]
    use raw as backend;

    /// The value of `key`.
    pub fn get(key: &[u8]) -> Option<Vec<u8>> {
        backend::get(key)
    }

    /// Writes `value` under `key` (only inside `apply` and `migrate`).
    pub fn set(key: &[u8], value: &[u8]) -> Result<(), String> {
        backend::set(key, value).map_err(describe)
    }

    /// Removes `key`.
    pub fn delete(key: &[u8]) -> Result<(), String> {
        backend::delete(key).map_err(describe)
    }

    /// Pairs with `start <= key < end` (to the last key when `end` is `None`),
    /// in key order, at most `limit`.
    pub fn scan(start: &[u8], end: Option<&[u8]>, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        backend::scan(start, end, limit).into_iter().map(|p| (p.key, p.value)).collect()
    }

    /// Reads a JSON value.
    pub fn get_json<T: DeserializeOwned>(key: &[u8]) -> Result<Option<T>, String> {
        get(key).map(|bytes| crate::json::decode(&bytes)).transpose()
    }

    /// Writes a value as JSON.
    pub fn set_json<T: Serialize>(key: &[u8], value: &T) -> Result<(), String> {
        set(key, &crate::json::encode(value)?)
    }

    fn describe(error: KvError) -> String {
        match error {
            KvError::ReadOnly => "kv is read-only here (writes are allowed in apply and migrate)".to_string(),
            KvError::TooLarge(why) => why,
        }
    }
}

/// The log entry being applied, deterministic time and randomness, and logs.
/// Built for anything but WebAssembly, [`testing::TestHost`] sets them.
pub mod context {
    use crate::bindings::raft::host::context as raw;

    pub use raw::{EntryInfo, Level};

    #[cfg(not(target_arch = "wasm32"))]
    use crate::testing::context as backend;
    #[cfg(target_arch = "wasm32")]
    use raw as backend;

    /// The entry being applied (in `query`, the last applied entry).
    pub fn entry() -> EntryInfo {
        backend::entry()
    }

    /// Milliseconds since the Unix epoch, stamped by the leader into the entry.
    pub fn now_ms() -> u64 {
        backend::entry().timestamp_ms
    }

    /// The next number of a sequence seeded by the entry: identical on every
    /// replica.
    pub fn random_u64() -> u64 {
        backend::random_u64()
    }

    /// Writes a line to the host's log.
    pub fn log(level: Level, message: &str) {
        backend::log(level, message)
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// JSON commands and replies (human-writable; what the CLI sends).
pub mod json {
    use serde::{Deserialize, Serialize};

    /// Decodes a JSON command, with an error message fit for a client.
    /// `T` may borrow from `bytes` (`&str`, or `Cow<str>` with
    /// `#[serde(borrow)]`), which saves copying large fields.
    pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))
    }

    /// Encodes a JSON reply.
    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| format!("cannot encode reply: {e}"))
    }
}

/// A compact binary codec (postcard) for programs that talk to the state
/// machine and care about size and speed more than readability. Postcard is
/// not self-describing: use plain `#[derive(Serialize, Deserialize)]` types
/// (externally tagged enums), not `#[serde(tag = "...")]`, which only JSON
/// can decode.
pub mod binary {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// Decodes a binary command.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("invalid binary command: {e}"))
    }

    /// Encodes a binary reply.
    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
        postcard::to_allocvec(value).map_err(|e| format!("cannot encode reply: {e}"))
    }
}

pub use serde;

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Command {
        Put { key: String, value: String },
        Delete { key: String },
    }

    #[test]
    fn json_and_binary_codecs_round_trip_and_explain_errors() {
        let put = Command::Put { key: "a".into(), value: "1".into() };
        let bytes = super::json::encode(&put).expect("encode");
        assert_eq!(bytes, br#"{"op":"put","key":"a","value":"1"}"#);
        assert_eq!(super::json::decode::<Command>(&bytes).expect("decode"), put);
        let err = super::json::decode::<Command>(br#"{"op":"nope"}"#).expect_err("unknown op");
        assert!(err.starts_with("invalid JSON"), "{err}");
        // A field may borrow the command's bytes instead of copying them.
        #[derive(Deserialize)]
        struct Borrowed<'a> {
            key: &'a str,
        }
        let command = br#"{"key":"abc"}"#;
        let borrowed: Borrowed = super::json::decode(command).expect("decode");
        assert_eq!((borrowed.key, borrowed.key.as_ptr()), ("abc", command[8..].as_ptr()));
        // Binary commands use a plain (externally tagged) enum.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        enum Binary {
            Put { key: String, value: u64 },
            Delete { key: String },
        }
        for command in [Binary::Put { key: "k".into(), value: 7 }, Binary::Delete { key: "k".into() }] {
            let compact = super::binary::encode(&command).expect("encode");
            assert!(compact.len() < super::json::encode(&command).expect("encode").len());
            assert_eq!(super::binary::decode::<Binary>(&compact).expect("decode"), command);
        }
        let err = super::binary::decode::<Binary>(&[0xff, 0xff]).expect_err("garbage");
        assert!(err.starts_with("invalid binary command"), "{err}");
    }
}
