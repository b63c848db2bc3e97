//! A bank. Balances are whole units (u64); a transfer never makes a balance
//! negative and never creates or destroys money.
//!
//! - `{"op":"open","account":A}` → `{"balance":0}` (error if it exists)
//! - `{"op":"deposit","account":A,"amount":N}` → `{"balance":B}`
//! - `{"op":"transfer","from":A,"to":B,"amount":N}` → `{"from":BA,"to":BB}`
//! - query `{"op":"balance","account":A}` → `{"balance":B}`
//! - query `{"op":"total"}` → `{"total":T,"accounts":N}`

use raft_guest::{StateMachine, json, kv};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Open { account: String },
    Deposit { account: String, amount: u64 },
    Transfer { from: String, to: String, amount: u64 },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Query {
    Balance { account: String },
    Total,
}

fn key(account: &str) -> Vec<u8> {
    format!("acct/{account}").into_bytes()
}

fn balance(account: &str) -> Result<u64, String> {
    kv::get_json::<u64>(&key(account))?.ok_or_else(|| format!("no account {account:?}"))
}

#[derive(Serialize)]
struct Balance {
    balance: u64,
}

#[derive(Serialize)]
struct Transferred {
    from: u64,
    to: u64,
}

#[derive(Serialize)]
struct Total {
    total: u64,
    accounts: u64,
}

struct Bank;

impl StateMachine for Bank {
    fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
        match json::decode(command)? {
            Command::Open { account } => {
                if account.is_empty() || account.len() > 128 {
                    return Err("account names are 1 to 128 bytes".into());
                }
                if kv::get(&key(&account)).is_some() {
                    return Err(format!("account {account:?} already exists"));
                }
                kv::set_json(&key(&account), &0u64)?;
                json::encode(&Balance { balance: 0 })
            }
            Command::Deposit { account, amount } => {
                let now = balance(&account)?.checked_add(amount).ok_or("balance would overflow")?;
                kv::set_json(&key(&account), &now)?;
                json::encode(&Balance { balance: now })
            }
            Command::Transfer { from, to, amount } => {
                if from == to {
                    return Err("cannot transfer to the same account".into());
                }
                let (from_balance, to_balance) = (balance(&from)?, balance(&to)?);
                let from_after = from_balance
                    .checked_sub(amount)
                    .ok_or_else(|| format!("insufficient funds: {from:?} has {from_balance}, needs {amount}"))?;
                let to_after = to_balance.checked_add(amount).ok_or("balance would overflow")?;
                kv::set_json(&key(&from), &from_after)?;
                kv::set_json(&key(&to), &to_after)?;
                json::encode(&Transferred { from: from_after, to: to_after })
            }
        }
    }

    fn query(request: &[u8]) -> Result<Vec<u8>, String> {
        match json::decode(request)? {
            Query::Balance { account } => json::encode(&Balance { balance: balance(&account)? }),
            Query::Total => {
                let (mut total, mut accounts) = (0u64, 0u64);
                let mut start = b"acct/".to_vec();
                loop {
                    let page = kv::scan(&start, Some(b"acct0"), 1000);
                    for (_, value) in &page {
                        let balance: u64 = json::decode(value)?;
                        total = total.checked_add(balance).ok_or("total overflows")?;
                        accounts += 1;
                    }
                    match page.last() {
                        Some((last, _)) if page.len() == 1000 => {
                            start = last.clone();
                            start.push(0);
                        }
                        _ => break,
                    }
                }
                json::encode(&Total { total, accounts })
            }
        }
    }
}

raft_guest::export!(Bank);
