#!/usr/bin/env bash
# How long a whole cluster takes to answer again after every member was
# killed at once: three `raft-host serve` members on loopback (fsync on), a
# load of 256-byte puts until RAFT_RESTART_ENTRIES entries are applied, then
# kill -9 of all three, a restart, and the time to the first answered
# write. Prints the figures, with what opening each store took (from its
# log line "store opened").
#
# Settings (environment):
#   RAFT_RESTART_ENTRIES   applied entries before the kill (default 1000000)
#   RAFT_RESTART_KEYS      distinct keys written (default 1000000)
#   RAFT_HOST_BIN          a raft-host binary (default: built here, release)
set -euo pipefail
cd "$(dirname "$0")/.."

entries="${RAFT_RESTART_ENTRIES:-1000000}"
keys="${RAFT_RESTART_KEYS:-1000000}"
source tests/serve-members.sh

work="$(mktemp -d -t raft-restart-bench.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

base="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
[ "$base" -gt 60000 ] && base=$((base - 1000))
addresses="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"

restart_members() {
    pids=()
    start_members restart-bench "$((base + 1))" "$work" --log-format json
}

# The first write answered after `since` (seconds of $EPOCHREALTIME), in ms.
first_write_ms() {
    local since="$1" deadline=$((SECONDS + 120))
    until "$RAFT_HOST_BIN" write --addr "$addresses" --timeout-secs 1 '{"op":"put","key":"restart-probe","value":"1"}' >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "no write answered within 120 s" >&2; tail -5 "$work"/member-*.log >&2; exit 1; }
        sleep 0.02
    done
    python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$since" "$EPOCHREALTIME"
}

restart_members
first_write_ms "$EPOCHREALTIME" >/dev/null
echo "loading $entries entries over $keys keys..." >&2
applied=0
while [ "$applied" -lt "$entries" ]; do
    "$RAFT_HOST_BIN" bench --addr "$addresses" --clients 256 --connections 8 --path batched --keys "$keys" \
        --duration-secs 10 --json >/dev/null 2>&1
    applied="$("$RAFT_HOST_BIN" status --addr "127.0.0.1:$((base + 1))" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["applied_index"])')"
    echo "  applied $applied" >&2
done
sizes="$(du -sm "$work"/member-1 "$work"/member-2 "$work"/member-3 | awk '{print $1}' | paste -sd/ -)"
resident="$(for pid in "${pids[@]}"; do awk '/VmRSS/{printf "%d ", $2/1024}' "/proc/$pid/status"; done)"

for pid in "${pids[@]}"; do kill -9 "$pid"; done
wait 2>/dev/null || true
restarted="$EPOCHREALTIME"
restart_members
first="$(first_write_ms "$restarted")"
# Each member's last "store opened" line: this restart's.
opened="$(for id in 1 2 3; do
    grep -h '"store opened"' "$work/member-$id.log" | tail -1 |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["fields"]["elapsed_ms"])'
done | paste -sd/ -)"
sleep 1
after="$(for pid in "${pids[@]}"; do awk '/VmRSS/{printf "%d ", $2/1024}' "/proc/$pid/status"; done)"

echo "applied entries before the kill: $applied ($keys keys, 256-byte values)"
echo "data directories: $sizes MiB; resident before the kill: ${resident}MiB"
echo "first write answered after the restart: $first ms (stores opened in $opened ms)"
echo "resident after the restart: ${after}MiB"
