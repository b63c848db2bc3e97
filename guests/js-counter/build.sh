#!/usr/bin/env bash
# Builds the JavaScript counter into a component: OUT_DIR/js_counter.wasm.
# Installs the pinned toolchain (package-lock.json) with npm on first use and
# skips the build when nothing it depends on changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
wit="$here/../../wit"
stamp="$out/js_counter.stamp"
inputs="$(cat "$here/counter.js" "$here/utf8.js" "$here/package.json" "$here/package-lock.json" "$wit"/*.wit | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/js_counter.wasm" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi
cd "$here"
if [[ ! -x node_modules/.bin/componentize-qjs ]]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
# --sync: the host runs components without the component model's async ABI.
# WASI stays imported: the host's virtual WASI serves Date.now() the entry's
# timestamp (--stub-wasi would make it trap).
node_modules/.bin/componentize-qjs --wit "$wit" --world state-machine --sync --js counter.js \
    -o "$out/js_counter.wasm.partial" >/dev/null
mv "$out/js_counter.wasm.partial" "$out/js_counter.wasm"
echo "$inputs" > "$stamp"
