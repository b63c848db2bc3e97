//! A linearizability checker for histories of registers, in the manner of
//! Wing and Gong as refined by Lowe and used by porcupine and Knossos.
//!
//! A history is what clients saw: for each operation its invocation time, its
//! completion time (or none, when its outcome stayed unknown), and what it
//! returned. The history is linearizable if every operation can be given one
//! instant between its invocation and its completion such that, taken in that
//! order, the operations are those of one register. An operation whose
//! outcome is unknown may take effect at any instant after its invocation,
//! or never (which is the same as at the very end: nothing observes it).
//!
//! Registers are independent, so each key is checked alone (P-compositionality),
//! which keeps every search small.

use std::collections::{BTreeMap, HashSet};

/// What one operation did to its key's register, and what it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOp {
    /// Wrote `value`; it answers the value it replaced.
    Put { value: String, previous: Option<Option<String>> },
    /// Read the register.
    Get { value: Option<String> },
    /// Wrote `new` if the register held `expected`; it answers whether it
    /// did, and if not, what the register held.
    Cas { expected: Option<String>, new: String, outcome: Option<CasOutcome> },
}

/// A compare-and-set's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    Swapped,
    Refused { current: Option<String> },
}

/// One operation of a history on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub key: String,
    pub op: RegisterOp,
    /// When it was invoked and when its answer came (`None`: unknown), on
    /// one clock shared by every client of the history.
    pub invoked: u64,
    pub completed: Option<u64>,
    /// Who issued it, for reports.
    pub client: usize,
}

/// A key whose history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    /// The operations on that key, in invocation order.
    pub operations: Vec<Operation>,
    /// How many of them the deepest search managed to linearize.
    pub linearized_at_most: usize,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "key {:?}: no order of its {} operations is a register's (at most {} could be placed):",
            self.key,
            self.operations.len(),
            self.linearized_at_most
        )?;
        for op in &self.operations {
            let done = op.completed.map_or("unknown".to_string(), |t| t.to_string());
            writeln!(f, "  client {} [{} .. {}] {:?}", op.client, op.invoked, done, op.op)?;
        }
        Ok(())
    }
}

/// Checks every key of `history`; the first key that is not linearizable.
pub fn check(history: &[Operation]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, mut operations) in by_key {
        operations.sort_by_key(|op| op.invoked);
        if let Err(linearized_at_most) = check_register(&operations) {
            return Err(Violation { key: key.to_string(), operations, linearized_at_most });
        }
    }
    Ok(())
}

/// The register after `op` when it held `state`, if `op`'s answer fits.
fn step(state: &Option<String>, op: &RegisterOp) -> Option<Option<String>> {
    match op {
        RegisterOp::Put { value, previous } => match previous {
            Some(previous) if previous != state => None,
            _ => Some(Some(value.clone())),
        },
        RegisterOp::Get { value } => (value == state).then(|| state.clone()),
        RegisterOp::Cas { expected, new, outcome } => match outcome {
            Some(CasOutcome::Swapped) => (state == expected).then(|| Some(new.clone())),
            Some(CasOutcome::Refused { current }) => (state != expected && current == state).then(|| state.clone()),
            // Unknown: it swapped if it could; "never applied" is the same
            // as applied last, which the search may choose.
            None if state == expected => Some(Some(new.clone())),
            None => Some(state.clone()),
        },
    }
}

/// An event of the search's list: an operation's call or its return.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// Position of the matching event (the return of a call, the call of a return).
    partner: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Lowe's search with a cache of (linearized set, state) pairs already
/// explored. `Err` carries the most operations ever linearized at once.
fn check_register(operations: &[Operation]) -> Result<(), usize> {
    let n = operations.len();
    // Calls before returns at equal times: overlapping, the generous reading.
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in operations.iter().enumerate() {
        order.push((op.invoked, false, i));
        order.push((op.completed.unwrap_or(u64::MAX), true, i));
    }
    order.sort();
    let mut position = vec![[0usize; 2]; n];
    for (at, &(_, is_return, op)) in order.iter().enumerate() {
        position[op][usize::from(is_return)] = at;
    }
    let mut events: Vec<Event> = order
        .iter()
        .enumerate()
        .map(|(at, &(_, is_return, op))| Event {
            op,
            is_call: !is_return,
            partner: position[op][usize::from(!is_return)],
            prev: at.checked_sub(1),
            next: (at + 1 < order.len()).then_some(at + 1),
        })
        .collect();
    let mut head = (!events.is_empty()).then_some(0);

    fn unlink(events: &mut [Event], head: &mut Option<usize>, at: usize) {
        let (prev, next) = (events[at].prev, events[at].next);
        match prev {
            Some(prev) => events[prev].next = next,
            None => *head = next,
        }
        if let Some(next) = next {
            events[next].prev = prev;
        }
    }
    fn relink(events: &mut [Event], head: &mut Option<usize>, at: usize) {
        let (prev, next) = (events[at].prev, events[at].next);
        match prev {
            Some(prev) => events[prev].next = Some(at),
            None => *head = Some(at),
        }
        if let Some(next) = next {
            events[next].prev = Some(at);
        }
    }

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: Option<String> = None;
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // (call event, state before it) for each operation placed so far.
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut deepest = 0;
    let mut cursor = head;
    loop {
        let Some(at) = cursor else {
            // Only returns can stop the walk, so an empty list is success.
            return Ok(());
        };
        let event = events[at];
        if event.is_call {
            let placed = step(&state, &operations[event.op].op).and_then(|next| {
                let mut with = linearized.clone();
                with[event.op / 64] |= 1 << (event.op % 64);
                cache.insert((with.clone(), next.clone())).then_some((with, next))
            });
            match placed {
                Some((with, next)) => {
                    stack.push((at, std::mem::replace(&mut state, next)));
                    linearized = with;
                    deepest = deepest.max(stack.len());
                    // Take the call and its return out of the list.
                    unlink(&mut events, &mut head, at);
                    unlink(&mut events, &mut head, event.partner);
                    cursor = head;
                }
                None => cursor = event.next,
            }
        } else {
            // A return whose call is not placed: undo the latest placement.
            let Some((call, before)) = stack.pop() else { return Err(deepest) };
            let (op, partner) = (events[call].op, events[call].partner);
            state = before;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut events, &mut head, partner);
            relink(&mut events, &mut head, call);
            cursor = events[call].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, invoked: u64, completed: Option<u64>, op: RegisterOp) -> Operation {
        Operation { key: "k".into(), op, invoked, completed, client }
    }
    fn put(value: &str, previous: Option<&str>) -> RegisterOp {
        RegisterOp::Put { value: value.into(), previous: Some(previous.map(String::from)) }
    }
    fn put_unknown(value: &str) -> RegisterOp {
        RegisterOp::Put { value: value.into(), previous: None }
    }
    fn get(value: Option<&str>) -> RegisterOp {
        RegisterOp::Get { value: value.map(String::from) }
    }
    fn cas(expected: Option<&str>, new: &str, outcome: Option<CasOutcome>) -> RegisterOp {
        RegisterOp::Cas { expected: expected.map(String::from), new: new.into(), outcome }
    }

    #[test]
    fn sequential_and_concurrent_histories_that_a_register_explains_pass() {
        // One after the other.
        let history = vec![
            op(0, 0, Some(1), put("a", None)),
            op(0, 2, Some(3), get(Some("a"))),
            op(1, 4, Some(5), put("b", Some("a"))),
            op(1, 6, Some(7), cas(Some("b"), "c", Some(CasOutcome::Swapped))),
            op(0, 8, Some(9), cas(Some("b"), "d", Some(CasOutcome::Refused { current: Some("c".into()) }))),
        ];
        assert_eq!(check(&history), Ok(()));
        // Overlapping: the read may fall before or after the write.
        let history =
            vec![op(0, 0, Some(10), put("a", None)), op(1, 1, Some(2), get(None)), op(2, 3, Some(4), get(Some("a")))];
        assert_eq!(check(&history), Ok(()));
        // A write whose outcome is unknown may have happened...
        let history = vec![op(0, 0, None, put_unknown("a")), op(1, 5, Some(6), get(Some("a")))];
        assert_eq!(check(&history), Ok(()));
        // ... or not.
        let history = vec![op(0, 0, None, put_unknown("a")), op(1, 5, Some(6), get(None))];
        assert_eq!(check(&history), Ok(()));
        // An unknown compare-and-set, either way.
        let unknown = cas(None, "x", None);
        assert_eq!(check(&[op(0, 0, None, unknown.clone()), op(1, 5, Some(6), get(Some("x")))]), Ok(()));
        assert_eq!(check(&[op(0, 0, None, unknown), op(1, 5, Some(6), get(None))]), Ok(()));
    }

    #[test]
    fn histories_no_register_explains_fail_naming_the_key() {
        // A stale read after a completed write.
        let stale = vec![op(0, 0, Some(1), put("a", None)), op(1, 2, Some(3), get(None))];
        let violation = check(&stale).expect_err("stale read");
        assert_eq!(violation.key, "k");
        assert!(violation.to_string().contains("no order"), "{violation}");
        // A lost write: its successor's answer claims it never happened.
        let lost = vec![op(0, 0, Some(1), put("a", None)), op(1, 2, Some(3), put("b", None))];
        assert!(check(&lost).is_err());
        // Two compare-and-sets from the same state cannot both swap.
        let double = vec![
            op(0, 0, Some(5), cas(None, "a", Some(CasOutcome::Swapped))),
            op(1, 0, Some(5), cas(None, "b", Some(CasOutcome::Swapped))),
        ];
        assert!(check(&double).is_err());
        // Reads that go back in time.
        let back =
            vec![op(0, 0, Some(10), put("a", None)), op(1, 1, Some(2), get(Some("a"))), op(2, 3, Some(4), get(None))];
        assert!(check(&back).is_err());
        // A value nobody wrote.
        assert!(check(&[op(0, 0, Some(1), get(Some("ghost")))]).is_err());
    }

    #[test]
    fn keys_are_checked_apart_and_a_long_concurrent_history_passes() {
        let mut history = Vec::new();
        let mut time = 0;
        let mut last: Option<String> = None;
        for i in 0..2_000u64 {
            let value = format!("v{i}");
            // Four clients overlap; each write reports the true previous value.
            history.push(Operation {
                key: format!("k{}", i % 7),
                op: RegisterOp::Get { value: None },
                invoked: time,
                completed: Some(time + 1),
                client: 9,
            });
            let previous = last.replace(value.clone());
            history.push(Operation {
                key: "shared".into(),
                op: RegisterOp::Put { value, previous: Some(previous) },
                invoked: time,
                completed: Some(time + 3),
                client: (i % 4) as usize,
            });
            time += 2;
        }
        assert_eq!(check(&history), Ok(()));
        // One answer changed: the checker finds it among the 4,000.
        if let RegisterOp::Put { previous, .. } = &mut history[2_001].op {
            *previous = Some(Some("v7".into()));
        }
        assert_eq!(check(&history).expect_err("a wrong previous value").key, "shared");
    }
}
