"""{{name}}: a raft-host state machine in Python, built into a component by
componentize-py. Commands and queries are JSON:

- {"op":"add","key":K,"by":N} adds N to counter K and answers its new value
- query {"op":"get","key":K} answers it

Every replica applies the same commands in the same order. Keep all state in
kv (wit_world.imports.kv), never in Python objects: the host may re-create
the instance between any two calls. Raising Err refuses a command and
discards its writes.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import kv


def decode(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise Err(f"invalid JSON: {error}")
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise Err('invalid JSON: expected an object with an "op"')
    return value


def counter(key: str) -> int:
    stored = kv.get(key.encode())
    return 0 if stored is None else int(stored)


class WitWorld(wit_world.WitWorld):
    def apply(self, command: bytes) -> bytes:
        message = decode(command)
        if message["op"] != "add" or not isinstance(message.get("key"), str) or type(message.get("by")) is not int:
            raise Err('expected {"op":"add","key":K,"by":N}')
        value = counter(message["key"]) + message["by"]
        if not -(2**63) <= value < 2**63:
            raise Err(f"adding {message['by']} overflows")
        kv.set(message["key"].encode(), str(value).encode())
        return str(value).encode()

    def query(self, request: bytes) -> bytes:
        message = decode(request)
        if message["op"] != "get" or not isinstance(message.get("key"), str):
            raise Err('expected {"op":"get","key":K}')
        return str(counter(message["key"])).encode()

    def migrate(self, previous: str) -> None:
        pass
