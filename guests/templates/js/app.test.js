// Tests of app.js on this machine, with `node --test`: no cluster, no
// component build. test_host.js stands in for the imports with a member's
// rules: an apply's writes count only if it returns, a query cannot write.

import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';
import { Refused, TestHost } from './test_host.js';

const host = await TestHost.load(new URL('./app.js', import.meta.url));

beforeEach(() => host.committed.clear());

test('adds answer the new value and queries see it', () => {
  assert.equal(host.apply('{"op":"add","key":"a","by":2}'), '2');
  assert.equal(host.apply('{"op":"add","key":"a","by":3}'), '5');
  assert.equal(host.query('{"op":"get","key":"a"}'), '5');
  assert.equal(host.query('{"op":"get","key":"b"}'), '0');
});

test('a refused command changes nothing', () => {
  host.insert('a', (2n ** 63n - 1n).toString());
  assert.throws(() => host.apply('{"op":"add","key":"a","by":1}'), Refused);
  assert.throws(() => host.apply('not json'), /invalid JSON/);
  assert.equal(host.value('a'), '9223372036854775807');
});
