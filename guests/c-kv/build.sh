#!/usr/bin/env bash
# Builds the C kv guest into a component: OUT_DIR/c_kv.wasm. Bindings come
# from `raft-host bindings` (wit-bindgen's C generator), the component from
# `raft-host componentize`; RAFT_HOST names the binary (default: on PATH).
# Skips the build when nothing it depends on changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
raft_host="${RAFT_HOST:-raft-host}"
mkdir -p "$out"
wit="$here/../../wit"
stamp="$out/c_kv.stamp"
inputs="$(cat "$here"/*.c "$here"/*.h "$here/build.sh" "$wit"/*.wit | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/c_kv.wasm" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi
"$here/toolchain.sh"
work="$out/c-kv"
mkdir -p "$work"
"$raft_host" bindings --lang c --wit "$wit" --out "$work" >/dev/null
# A reactor (no main: the host calls the exports); nothing of the C library
# beyond malloc and strings, so the module imports no WASI.
clang-19 --target=wasm32-wasi -std=c11 -Os -Wall -Wextra -Werror -mexec-model=reactor -I"$work" \
    -o "$work/c_kv.core.wasm" "$here/kv.c" "$here/json.c" "$work/state_machine.c" \
    "$work/state_machine_component_type.o" -Wl,--strip-all
"$raft_host" componentize "$work/c_kv.core.wasm" -o "$out/c_kv.wasm.partial" >/dev/null
mv "$out/c_kv.wasm.partial" "$out/c_kv.wasm"
echo "$inputs" > "$stamp"
