// {{name}}: a raft-host state machine in JavaScript, built into a component
// by componentize-qjs (QuickJS). Commands and queries are JSON:
//
// - command {"op":"add","key":K,"by":N} adds N to counter K and answers its
//   new value (a signed 64-bit integer; an add that overflows is refused)
// - query {"op":"get","key":K} answers it
//
// Every replica applies the same commands in the same order. Keep all state
// in kv, never in module variables: the host may re-create the instance
// between any two calls. Throwing a string (or an Error) refuses a command
// and discards its writes. Date.now() is the entry's timestamp; for random
// numbers use randomU64() from raft:host/context, not Math.random().

import { get, set } from 'raft:host/kv@0.1.0';
import { utf8Decode, utf8Encode } from './utf8.js';

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

function decode(bytes) {
  let message;
  try {
    message = JSON.parse(utf8Decode(bytes));
  } catch (error) {
    throw `invalid JSON: ${typeof error === 'string' ? error : error.message}`;
  }
  if (message === null || typeof message !== 'object' || typeof message.op !== 'string') {
    throw 'invalid JSON: expected an object with an "op"';
  }
  return message;
}

function counter(key) {
  // An absent key is null.
  const stored = get(utf8Encode(key));
  return stored == null ? 0n : BigInt(utf8Decode(stored));
}

export function apply(command) {
  const message = decode(command);
  // JSON numbers are doubles: only exact integers are taken.
  if (message.op !== 'add' || typeof message.key !== 'string' || !Number.isSafeInteger(message.by)) {
    throw 'expected {"op":"add","key":K,"by":N}';
  }
  const value = counter(message.key) + BigInt(message.by);
  if (value < I64_MIN || value > I64_MAX) {
    throw `adding ${message.by} overflows`;
  }
  set(utf8Encode(message.key), utf8Encode(value.toString()));
  return utf8Encode(value.toString());
}

export function query(request) {
  const message = decode(request);
  if (message.op !== 'get' || typeof message.key !== 'string') {
    throw 'expected {"op":"get","key":K}';
  }
  return utf8Encode(counter(message.key).toString());
}

export function migrate(previous) {
  // Runs once when this version replaces another (`previous` is its hash):
  // convert the stored data here if the format changed.
}
