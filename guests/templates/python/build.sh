#!/usr/bin/env bash
# Builds {{name}}.wasm from app.py with the pinned componentize-py
# (requirements.txt), installed into a virtualenv on first use: .venv here,
# or the one RAFT_GUEST_PYTHON_VENV names.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${RAFT_GUEST_PYTHON_VENV:-$here/.venv}"
if [[ ! -x "$venv/bin/componentize-py" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi
"$venv/bin/componentize-py" --wit-path "$here/wit" --world state-machine componentize \
    --python-path "$here" app -o "$here/{{name}}.wasm"
echo "built $here/{{name}}.wasm"
