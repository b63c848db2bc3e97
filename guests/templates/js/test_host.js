// A host in memory, so `node --test` runs the state machine on this machine:
// no cluster, no component build. It stands in for the imports
// raft:host/kv@0.1.0 and raft:host/context@0.1.0 (a module loader hook maps
// them here) with a member's rules and the shapes componentize-qjs gives:
//
// - each apply is a transaction: its writes count only if it returns;
// - a query cannot write (set and delete throw, as the host's read-only
//   error does);
// - a missing key is null; scan answers [{ key, value }] in key order;
// - keys above 4 KiB, values above 4 MiB and scans of more than 10,000
//   pairs are refused, as a member refuses them;
// - a thrown string or Error refuses the call with its message; anything
//   else thrown (a number, an import's error left uncaught) traps it;
// - every apply is an entry: index 1, 2, ..., stamped with the clock you
//   set (setTimeMs; it never goes back), which Date.now() reads during a
//   call, and random numbers drawn from the entry (deterministic, though not
//   the host's sequence).
//
// Node.js 18.19 or 20.6 and later (module.register).

import { register } from 'node:module';

const KEY_BYTES_MAX = 4 << 10;
const VALUE_BYTES_MAX = 4 << 20;
const SCAN_PAIRS_MAX = 10_000;
const GLOBAL = Symbol.for('raft-host test host');

// Runs in the loader's thread: maps the two imports to modules whose
// functions call the host of the main thread.
const HOOKS = `
const IMPORTS = {
  'raft:host/kv@0.1.0': ['get', 'set', 'delete', 'scan'],
  'raft:host/context@0.1.0': ['entry', 'randomU64', 'log'],
};
export async function resolve(specifier, context, next) {
  if (specifier in IMPORTS) {
    return { url: 'raft-test-host:' + specifier, shortCircuit: true };
  }
  return next(specifier, context);
}
export async function load(url, context, next) {
  const names = IMPORTS[url.slice('raft-test-host:'.length)];
  if (!url.startsWith('raft-test-host:') || names === undefined) {
    return next(url, context);
  }
  const host = "globalThis[Symbol.for('raft-host test host')]";
  const lines = names.map((name) =>
    'const _' + name + ' = (...args) => ' + host + '.' + name + '(...args); export { _' + name + ' as ' + name + ' };');
  lines.push('export default { ' + names.map((name) => JSON.stringify(name) + ': _' + name).join(', ') + ' };');
  return { format: 'module', source: lines.join('\\n'), shortCircuit: true };
}
`;

/** A call the state machine refused (it threw a string or an Error). */
export class Refused extends Error {}

/** A call that trapped: a member would re-create the instance. */
export class Trapped extends Error {}

/** An import's error, shaped as componentize-qjs throws it. */
class ImportError extends Error {
  constructor(payload) {
    super('[object Object] (see error.payload)');
    this.payload = payload;
  }
}

/** Bytes as a string that sorts like the bytes (one char per byte). */
function keyOf(bytes) {
  let key = '';
  for (let start = 0; start < bytes.length; start += 4096) {
    key += String.fromCharCode(...bytes.subarray(start, start + 4096));
  }
  return key;
}
const bytesOf = (key) => Uint8Array.from(key, (c) => c.charCodeAt(0));
const asBytes = (data) => (typeof data === 'string' ? new TextEncoder().encode(data) : Uint8Array.from(data));
const realDateNow = Date.now;

export class TestHost {
  /** Loads the state machine at `url` (a file URL) over a new host. */
  static async load(url) {
    if (globalThis[GLOBAL] === undefined) {
      register('data:text/javascript,' + encodeURIComponent(HOOKS));
    }
    const host = new TestHost();
    globalThis[GLOBAL] = host;
    host.machine = await import(url);
    return host;
  }

  constructor() {
    /** Committed state: key (one char per byte) -> Uint8Array. */
    this.committed = new Map();
    /** The writes of the apply in progress (null: a read-only call). */
    this.current = null;
    this.index = 0;
    this.timeMs = 1_700_000_000_000;
    this.stampMs = this.timeMs;
    this.draws = 0n;
    /** Why the call in progress must trap, whatever the guest catches. */
    this.trap = null;
    /** What the state machine logged: [level, message]. */
    this.logs = [];
  }

  /** Applies `command` (a string or bytes) as the next entry; answers text. */
  apply(command) {
    this.index += 1;
    this.stampMs = this.timeMs;
    this.draws = 0n;
    this.current = new Map();
    try {
      const reply = this.#call(() => this.machine.apply(asBytes(command)));
      for (const [key, value] of this.current) {
        if (value === null) {
          this.committed.delete(key);
        } else {
          this.committed.set(key, value);
        }
      }
      return reply;
    } finally {
      this.current = null;
    }
  }

  /** Answers `request` (a string or bytes) at the last entry; answers text. */
  query(request) {
    this.draws = 0n;
    return this.#call(() => this.machine.query(asBytes(request)));
  }

  #call(run) {
    let reply;
    this.trap = null;
    Date.now = () => this.stampMs;
    try {
      reply = run();
    } catch (error) {
      if (this.trap !== null) {
        throw new Trapped(this.trap);
      }
      if (typeof error === 'string') {
        throw new Refused(error);
      }
      if (error instanceof Error && !('payload' in error)) {
        throw new Refused(error.message);
      }
      throw new Trapped(`the state machine trapped: ${error?.message ?? error}`);
    } finally {
      Date.now = realDateNow;
    }
    if (this.trap !== null) {
      throw new Trapped(this.trap);
    }
    if (!(reply instanceof Uint8Array)) {
      throw new Trapped(`the state machine answered ${typeof reply}, not a Uint8Array`);
    }
    return new TextDecoder().decode(reply);
  }

  /** Puts a committed pair, to set state up before a test. */
  insert(key, value) {
    this.committed.set(keyOf(asBytes(key)), asBytes(value));
  }

  /** The committed value of `key` as text, or null. */
  value(key) {
    const value = this.committed.get(keyOf(asBytes(key)));
    return value === undefined ? null : new TextDecoder().decode(value);
  }

  /** Sets the clock the next entries are stamped with (milliseconds). */
  setTimeMs(timeMs) {
    this.timeMs = Math.max(this.timeMs, timeMs);
  }

  // The imports.

  get(key) {
    if (key.length > KEY_BYTES_MAX) {
      return null;
    }
    const name = keyOf(key);
    if (this.current !== null && this.current.has(name)) {
      return this.current.get(name);
    }
    return this.committed.get(name) ?? null;
  }

  set(key, value) {
    this.#write(key, Uint8Array.from(value));
  }

  delete(key) {
    this.#write(key, null);
  }

  #write(key, value) {
    if (this.current === null) {
      throw new ImportError({ tag: 'read-only' });
    }
    if (key.length > KEY_BYTES_MAX) {
      throw new ImportError({ tag: 'too-large', val: `key of ${key.length} bytes is above the limit of ${KEY_BYTES_MAX}` });
    }
    if (value !== null && value.length > VALUE_BYTES_MAX) {
      throw new ImportError({ tag: 'too-large', val: `value of ${value.length} bytes is above the limit of ${VALUE_BYTES_MAX}` });
    }
    this.current.set(keyOf(key), value);
  }

  scan(start, end, limit) {
    if (limit > SCAN_PAIRS_MAX) {
      // A member ends the call here; the guest cannot catch it.
      this.trap = `the state machine went over a host-call budget: a scan asked for ${limit} pairs, above the limit of ${SCAN_PAIRS_MAX}`;
      throw new Error(this.trap);
    }
    const merged = new Map(this.committed);
    for (const [key, value] of this.current ?? []) {
      if (value === null) {
        merged.delete(key);
      } else {
        merged.set(key, value);
      }
    }
    const [from, to] = [keyOf(start), end == null ? null : keyOf(end)];
    return [...merged.keys()]
      .filter((key) => key >= from && (to === null || key < to))
      .sort()
      .slice(0, limit)
      .map((key) => ({ key: bytesOf(key), value: merged.get(key) }));
  }

  entry() {
    return { index: this.index, term: 1, timestampMs: this.stampMs };
  }

  randomU64() {
    // splitmix64 of (entry, draw): deterministic per entry, like the host's.
    this.draws += 1n;
    let z = (BigInt(this.index) * 0x9e3779b97f4a7c15n + this.draws) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
    return Number(z ^ (z >> 31n));
  }

  log(level, message) {
    this.logs.push([level, message]);
  }
}
