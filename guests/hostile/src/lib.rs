//! Test fixture: misbehaves on command, to prove the host survives it.
//! Commands (plain text): `loop`, `alloc` (grow memory without bound),
//! `recurse`, `trap` (panic), `write-then-fail`, `write-then-trap`, `ok`,
//! `leak` (keeps 1 MiB more in its memory on every call, as a garbage
//! collector that falls behind does: only an old instance runs out)
//! (writes `ok` = `yes`), `print` (200 KB to stdout), `entropy` (replies with time and random numbers);
//! and what makes the host work for it: `flood` (4 MiB values under new keys
//! until stopped), `fill` (12 values of 1 MiB), `scan-all` (a scan asking for
//! every pair there is), `scan-big` (a scan over `fill`'s values), `read-loop`
//! (reads a 1 MiB value 100 times), `huge-reply` and `huge-error` (8 MiB);
//! query `read` (value of `ok`), `write` (tries to write from a query).

use raft_guest::{StateMachine, context, kv};
use std::cell::RefCell;
use std::hint::black_box;

thread_local! {
    /// What `leak` keeps between calls: it lives as long as the instance.
    static LEAKED: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

struct Hostile;

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    // black_box keeps the optimizer from turning this into a loop.
    black_box(recurse(black_box(depth + 1))) + 1
}

impl StateMachine for Hostile {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        match command {
            b"loop" => loop {
                black_box(());
            },
            b"alloc" => {
                // Reserve without touching: memory grows fast and cheaply, so
                // the memory ceiling (not the fuel budget) stops it.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(Vec::with_capacity(16 << 20));
                    black_box(&hoard);
                }
            }
            b"recurse" => Ok(recurse(0).to_le_bytes().to_vec()),
            b"trap" => panic!("the guest panicked on purpose"),
            b"write-then-fail" => {
                kv::set(b"ghost", b"should not exist")?;
                Err("failed after writing".into())
            }
            b"write-then-trap" => {
                kv::set(b"ghost", b"should not exist")?;
                panic!("trapped after writing")
            }
            b"print" => {
                // About 200 KB through WASI stdout and stderr: the host
                // must accept it all, on every replica alike.
                for line in 0..2_000 {
                    println!("line {line} {}", "x".repeat(90));
                }
                eprintln!("done printing");
                Ok(b"printed".to_vec())
            }
            b"leak" => {
                LEAKED.with(|leaked| leaked.borrow_mut().push(black_box(vec![1u8; 1 << 20])));
                kv::set(b"leak", b"held")?;
                Ok(b"leaked".to_vec())
            }
            b"ok" => {
                kv::set(b"ok", b"yes")?;
                Ok(b"fine".to_vec())
            }
            b"flood" => {
                let value = vec![7u8; 4 << 20];
                for i in 0..100_000u32 {
                    kv::set(format!("flood-{i}").as_bytes(), &value)?;
                }
                Ok(b"flooded".to_vec())
            }
            b"fill" => {
                let value = vec![1u8; 1 << 20];
                for i in 0..12u32 {
                    kv::set(format!("big-{i:02}").as_bytes(), &value)?;
                }
                Ok(b"filled".to_vec())
            }
            b"scan-all" => Ok(kv::scan(b"", None, u32::MAX).len().to_string().into_bytes()),
            b"scan-big" => Ok(kv::scan(b"big-", Some(b"big."), 100).len().to_string().into_bytes()),
            b"read-loop" => {
                let mut total = 0usize;
                for _ in 0..100 {
                    total += kv::get(b"big-00").map_or(0, |v| v.len());
                }
                Ok(total.to_string().into_bytes())
            }
            b"huge-reply" => Ok(vec![b'r'; 8 << 20]),
            b"huge-error" => Err("e".repeat(8 << 20)),
            b"entropy" => {
                let entry = context::entry();
                let reply = format!(
                    "index={} term={} now={} random={},{}",
                    entry.index,
                    entry.term,
                    context::now_ms(),
                    context::random_u64(),
                    context::random_u64()
                );
                kv::set(format!("entropy/{}", entry.index).as_bytes(), reply.as_bytes())?;
                Ok(reply.into_bytes())
            }
            other => Err(format!("unknown command {:?}", String::from_utf8_lossy(other))),
        }
    }

    fn query(request: &[u8]) -> Result<Vec<u8>, String> {
        match request {
            b"read" => Ok(kv::get(b"ok").unwrap_or_default()),
            b"write" => kv::set(b"sneaky", b"write").map(|()| b"wrote".to_vec()),
            other => Err(format!("unknown query {:?}", String::from_utf8_lossy(other))),
        }
    }
}

raft_guest::export!(Hostile);
