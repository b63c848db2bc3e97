#!/usr/bin/env bash
# The slow container check (RAFT_CONTAINER_TEST=1 cargo test --test container):
# builds the image, starts the three-member compose cluster, waits until
# every member's health check passes, writes and reads through the cluster,
# and tears it down with its volumes. Needs a container engine that runs:
# docker with compose, or podman with podman-compose.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
  compose=(docker compose -f deploy/compose.yaml)
elif command -v podman >/dev/null && command -v podman-compose >/dev/null; then
  engine=podman
  compose=(podman-compose -f deploy/compose.yaml)
else
  echo "container-test: no container engine runs here (docker with a daemon, or podman with podman-compose)" >&2
  exit 2
fi
cleanup() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

"$engine" build -t raft-host:local .
"$engine" run --rm raft-host:local --version
"${compose[@]}" up -d
deadline=$((SECONDS + 180))
for member in raft-1 raft-2 raft-3; do
  until "${compose[@]}" exec -T "$member" raft-host endpoint probe --addr 127.0.0.1:7001 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "container-test: $member is not SERVING after 180 s" >&2
      "${compose[@]}" logs --tail 50 >&2
      exit 1
    fi
    sleep 2
  done
done
addr=raft-1:7001,raft-2:7001,raft-3:7001
"${compose[@]}" exec -T raft-2 raft-host write --addr "$addr" '{"op":"put","key":"container","value":"ok"}'
answer=$("${compose[@]}" exec -T raft-3 raft-host read --addr "$addr" '{"op":"get","key":"container"}')
case "$answer" in
  *'"ok"'*) ;;
  *) echo "container-test: read answered $answer" >&2; exit 1 ;;
esac
"${compose[@]}" exec -T raft-1 raft-host endpoint health --cluster --addr raft-1:7001
echo "container-test: image built, three members healthy, a write read back"
