"""Tests of app.py on this machine, with `python3 -m unittest`: no cluster,
no component build. A host in memory stands in for the imports, with a
member's rules: an apply's writes are kept only if it does not raise, and a
query cannot write."""

import sys
import types
import unittest


class Err(Exception):
    """componentize-py's Err: raising it refuses the call."""


class Host:
    """The kv import in memory."""

    def __init__(self):
        self.committed = {}
        self.current = None  # an apply's writes; None: read-only

    def get(self, key: bytes):
        if self.current is not None and key in self.current:
            return self.current[key]
        return self.committed.get(key)

    def set(self, key: bytes, value: bytes):
        if self.current is None:
            raise Err("kv is read-only here")
        self.current[key] = value

    def delete(self, key: bytes):
        if self.current is None:
            raise Err("kv is read-only here")
        self.current[key] = None


HOST = Host()
world = types.ModuleType("wit_world")
world.WitWorld = object
world.imports = types.ModuleType("wit_world.imports")
world.imports.kv = HOST
types_module = types.ModuleType("componentize_py_types")
types_module.Err = Err
sys.modules.update({"wit_world": world, "wit_world.imports": world.imports, "componentize_py_types": types_module})

import app  # noqa: E402  (after the stand-ins)


def apply(command: bytes) -> bytes:
    HOST.current = {}
    try:
        answer = app.WitWorld().apply(command)
    except BaseException:
        HOST.current = None
        raise
    for key, value in HOST.current.items():
        if value is None:
            HOST.committed.pop(key, None)
        else:
            HOST.committed[key] = value
    HOST.current = None
    return answer


def query(request: bytes) -> bytes:
    return app.WitWorld().query(request)


class AppTest(unittest.TestCase):
    def setUp(self):
        HOST.committed.clear()

    def test_adds_answer_the_new_value_and_queries_see_it(self):
        self.assertEqual(apply(b'{"op":"add","key":"a","by":2}'), b"2")
        self.assertEqual(apply(b'{"op":"add","key":"a","by":3}'), b"5")
        self.assertEqual(query(b'{"op":"get","key":"a"}'), b"5")
        self.assertEqual(query(b'{"op":"get","key":"b"}'), b"0")

    def test_a_refused_command_changes_nothing(self):
        HOST.committed[b"a"] = str(2**63 - 1).encode()
        with self.assertRaises(Err):
            apply(b'{"op":"add","key":"a","by":1}')
        with self.assertRaises(Err):
            apply(b"not json")
        self.assertEqual(HOST.committed, {b"a": str(2**63 - 1).encode()})


if __name__ == "__main__":
    unittest.main()
