#!/usr/bin/env bash
# Builds the C++ kv guest into a component: OUT_DIR/cpp_kv.wasm, with
# clang++ 19 and libc++ for wasm32-wasi (the toolchain of ../c-kv), the C
# bindings from `raft-host bindings` and `raft-host componentize`; RAFT_HOST
# names the binary (default: on PATH). Skips the build when nothing it
# depends on changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
raft_host="${RAFT_HOST:-raft-host}"
mkdir -p "$out"
wit="$here/../../wit"
stamp="$out/cpp_kv.stamp"
inputs="$(cat "$here/kv.cpp" "$here/build.sh" "$wit"/*.wit | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/cpp_kv.wasm" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi
"$here/../c-kv/toolchain.sh"
work="$out/cpp-kv"
mkdir -p "$work"
"$raft_host" bindings --lang c --wit "$wit" --out "$work" >/dev/null
clang-19 --target=wasm32-wasi -std=c11 -Os -c -I"$work" -o "$work/bindings.o" "$work/state_machine.c"
# No exceptions (wasm32-wasi's libc++ has none); a reactor, as for C.
clang++-19 --target=wasm32-wasi -std=c++23 -Os -fno-exceptions -Wall -Wextra -Werror -mexec-model=reactor \
    -I"$work" -o "$work/cpp_kv.core.wasm" "$here/kv.cpp" "$work/bindings.o" \
    "$work/state_machine_component_type.o" -Wl,--strip-all
"$raft_host" componentize "$work/cpp_kv.core.wasm" -o "$out/cpp_kv.wasm.partial" >/dev/null
mv "$out/cpp_kv.wasm.partial" "$out/cpp_kv.wasm"
echo "$inputs" > "$stamp"
