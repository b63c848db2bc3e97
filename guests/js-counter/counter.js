// The counter state machine in JavaScript, built into a component by
// componentize-qjs (QuickJS): the same commands, answers and stored state as the Rust
// counter (guests/counter), so either can replace the other in a running
// cluster.
//
// - command {"op":"add","by":N} -> the new value (an add that overflows a
//   signed 64-bit integer is refused)
// - query {"op":"get"}          -> the value
//
// State lives in the host's store (raft:host/kv), never in JavaScript
// variables: the host may re-create the instance between any two calls.

import { get, set } from 'raft:host/kv@0.1.0';
import { utf8Decode, utf8Encode } from './utf8.js';

const KEY = utf8Encode('count');
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

function current() {
  // An absent key is null with QuickJS (undefined with componentize-js).
  const stored = get(KEY);
  if (stored == null) {
    return 0n;
  }
  return BigInt(utf8Decode(stored));
}

function encode(value) {
  return utf8Encode(value.toString());
}

export function apply(command) {
  const message = decode(command);
  if (message.op !== 'add') {
    throw `invalid JSON: unknown variant \`${message.op}\`, expected \`add\``;
  }
  const unknown = Object.keys(message).find((name) => name !== 'op' && name !== 'by');
  if (unknown !== undefined) {
    throw `invalid JSON: unknown field \`${unknown}\``;
  }
  // JSON numbers are doubles in JavaScript: only exact integers are taken.
  if (!Number.isSafeInteger(message.by)) {
    throw 'invalid JSON: "by" must be an integer of at most 53 bits';
  }
  const by = BigInt(message.by);
  const now = current();
  const next = now + by;
  if (next < I64_MIN || next > I64_MAX) {
    throw `adding ${by} to ${now} overflows`;
  }
  set(KEY, encode(next));
  return encode(next);
}

export function query(request) {
  const message = decode(request);
  if (message.op !== 'get') {
    throw `invalid JSON: unknown variant \`${message.op}\`, expected \`get\``;
  }
  return encode(current());
}

export function migrate(previous) {
  // The stored format is the Rust counter's: nothing to convert.
}
