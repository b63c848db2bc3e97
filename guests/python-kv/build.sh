#!/usr/bin/env bash
# Builds the Python kv guest into a component: OUT_DIR/python_kv.wasm.
# Installs the pinned toolchain (requirements.txt) into a virtualenv under
# OUT_DIR on first use and skips the build when nothing it depends on changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
mkdir -p "$out"
wit="$here/../../wit"
stamp="$out/python_kv.stamp"
inputs="$(cat "$here/app.py" "$here/requirements.txt" "$wit"/*.wit | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/python_kv.wasm" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi
venv="$out/python-venv"
if [[ ! -x "$venv/bin/componentize-py" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi
"$venv/bin/componentize-py" --wit-path "$wit" --world state-machine componentize \
    --python-path "$here" app -o "$out/python_kv.wasm.partial"
mv "$out/python_kv.wasm.partial" "$out/python_kv.wasm"
echo "$inputs" > "$stamp"
