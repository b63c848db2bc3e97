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
inputs="$(cat "$here/counter.js" "$here/package.json" "$here/package-lock.json" "$wit"/*.wit | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/js_counter.wasm" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi
cd "$here"
if [[ ! -x node_modules/.bin/componentize-js ]]; then
    # `npm ci` refuses this lock file (npm leaves out other platforms'
    # optional binaries); `install` with it installs the same versions.
    npm install --no-audit --no-fund --no-save --loglevel=error
fi
# http and fetch-event would import wasi:http, which the host does not
# provide; stdio, clocks and random stay and are served by its virtual WASI.
node_modules/.bin/componentize-js counter.js --wit "$wit" --world-name state-machine \
    --disable http --disable fetch-event -o "$out/js_counter.wasm.partial"
mv "$out/js_counter.wasm.partial" "$out/js_counter.wasm"
echo "$inputs" > "$stamp"
