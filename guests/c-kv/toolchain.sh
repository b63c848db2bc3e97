#!/usr/bin/env bash
# Makes sure the C and C++ guest toolchain is here: clang 19 and wasm-ld
# with Debian's wasm32-wasi sysroot (wasi-libc, compiler-rt's builtins,
# libc++). Installs the Debian packages when one is missing and this runs as
# root with apt-get; otherwise says what to install.
set -euo pipefail
packages=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32 libc++-19-dev-wasm32 libc++abi-19-dev-wasm32)
present() {
    command -v clang-19 >/dev/null && command -v clang++-19 >/dev/null && command -v wasm-ld-19 >/dev/null &&
        [[ -f /usr/include/wasm32-wasi/stdlib.h ]] &&
        [[ -f /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a ]] &&
        [[ -f /usr/lib/llvm-19/lib/wasm32-wasi/libc++.a ]]
}
if present; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "the C/C++ guest toolchain is missing: install ${packages[*]} (Debian 12)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be stale or absent on a fresh machine: refresh them
# only when the install fails without.
if ! apt-get install -y -q "${packages[@]}" >/dev/null; then
    apt-get update -q >/dev/null
    apt-get install -y -q "${packages[@]}" >/dev/null
fi
present || { echo "installed ${packages[*]}, but the toolchain is still incomplete" >&2; exit 1; }
