"""The kv state machine in Python: the same JSON commands and answers as the
Rust kv guest (guests/kv), built into a component by componentize-py.

- {"op":"put","key":K,"value":V}                    -> {"previous":V_or_null}
  with "return_previous":false                      -> {}
- {"op":"delete","key":K}                           -> {"deleted":true_or_false}
- {"op":"cas","key":K,"expected":V_or_null,"value":V}
                                                    -> {"ok":true} or {"ok":false,"current":V_or_null}
- query {"op":"get","key":K}                        -> {"value":V_or_null}
- query {"op":"range","start":K,"end":K_or_null,"limit":N}
                                                    -> {"items":[{"key":K,"value":V},...]}

Two more show what the sandbox lets a guest observe:
- {"op":"clock","key":K} stores and answers {"time_ms":T,"random":R}, with T
  from time.time() and R from os.urandom: both come from the entry being
  applied (the host's virtual WASI), so every replica and every replay
  computes the same answer.
- query {"op":"sandbox"} tries to read the environment, read, list and write
  files, and open a socket, and answers what happened to each: nothing
  ambient is there (no variables, no files, no network).

State lives in the host's store (wit_world.imports.kv), never in Python
objects: the host may re-create the instance between any two calls.
"""

import json
import os
import time

import wit_world
from componentize_py_types import Err
from wit_world.imports import kv

RANGE_LIMIT_MAX = 10_000


def encode(value) -> bytes:
    # Compact and unescaped, like serde_json, so answers match the Rust guest.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise Err(f"invalid JSON: {error}")
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise Err('invalid JSON: expected an object with an "op"')
    return value


def fields(message: dict, required: dict, optional: dict = {}) -> list:
    """The fields of `message` in the order of `required`, type-checked; unknown fields are refused."""
    allowed = set(required) | set(optional) | {"op"}
    unknown = [name for name in message if name not in allowed]
    if unknown:
        raise Err(f"invalid JSON: unknown field `{unknown[0]}`")
    values = []
    for name, kind in list(required.items()) + list(optional.items()):
        if name not in message:
            if name in optional:
                values.append(None)
                continue
            raise Err(f"invalid JSON: missing field `{name}`")
        value = message[name]
        if not kind(value):
            raise Err(f"invalid JSON: field `{name}` has the wrong type")
        values.append(value)
    return values


def text(value) -> bool:
    return isinstance(value, str)


def boolean(value) -> bool:
    return isinstance(value, bool)


def text_or_null(value) -> bool:
    return value is None or isinstance(value, str)


def count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF


def read(key: str):
    value = kv.get(key.encode())
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise Err(f"value of {json.dumps(key)} is not UTF-8")


def write(key: str, value) -> None:
    try:
        if value is None:
            kv.delete(key.encode())
        else:
            kv.set(key.encode(), value.encode())
    except Err as refused:
        reason = refused.value
        raise Err(getattr(reason, "value", None) or "kv is read-only here (writes are allowed in apply and migrate)")


def attempt(action) -> str:
    """"allowed", or the name of the exception that stopped `action`."""
    try:
        action()
        return "allowed"
    except BaseException as error:
        return type(error).__name__


def open_socket() -> None:
    import socket

    socket.create_connection(("127.0.0.1", 7001), timeout=1)


class WitWorld(wit_world.WitWorld):
    def apply(self, command: bytes) -> bytes:
        message = decode(command)
        op = message["op"]
        if op == "put":
            key, value, return_previous = fields(message, {"key": text, "value": text}, {"return_previous": boolean})
            if return_previous is False:
                write(key, value)
                return encode({})
            previous = read(key)
            write(key, value)
            return encode({"previous": previous})
        if op == "delete":
            (key,) = fields(message, {"key": text})
            existed = kv.get(key.encode()) is not None
            write(key, None)
            return encode({"deleted": existed})
        if op == "cas":
            key, expected, value = fields(message, {"key": text, "expected": text_or_null, "value": text})
            current = read(key)
            if current == expected:
                write(key, value)
                return encode({"ok": True})
            return encode({"ok": False, "current": current})
        if op == "clock":
            (key,) = fields(message, {"key": text})
            answer = encode({"time_ms": int(time.time() * 1000), "random": int.from_bytes(os.urandom(8), "little")})
            write(key, answer.decode())
            return answer
        raise Err(f"invalid JSON: unknown variant `{op}`")

    def query(self, request: bytes) -> bytes:
        message = decode(request)
        op = message["op"]
        if op == "get":
            (key,) = fields(message, {"key": text})
            return encode({"value": read(key)})
        if op == "range":
            start, limit, end = fields(message, {"start": text, "limit": count}, {"end": text_or_null})
            pairs = kv.scan(start.encode(), None if end is None else end.encode(), min(limit, RANGE_LIMIT_MAX))
            items = []
            for pair in pairs:
                try:
                    items.append({"key": pair.key.decode(), "value": pair.value.decode()})
                except UnicodeDecodeError:
                    raise Err("a key or value is not UTF-8")
            return encode({"items": items})
        if op == "sandbox":
            fields(message, {})
            return encode(
                {
                    "environ": sorted(os.environ),
                    "read_file": attempt(lambda: open("/etc/hostname").read()),
                    "list_root": attempt(lambda: os.listdir("/")),
                    "write_file": attempt(lambda: open("/tmp/raft-host-probe", "w").write("x")),
                    "socket": attempt(open_socket),
                }
            )
        raise Err(f"invalid JSON: unknown variant `{op}`")

    def migrate(self, previous: str) -> None:
        # The data format is the Rust kv guest's: nothing to convert.
        return None
