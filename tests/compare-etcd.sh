#!/usr/bin/env bash
# Side by side, in one run on this machine: a 3-member etcd (Debian's
# etcd-server, installed here if missing) and a 3-member raft-host (three
# `raft-host serve` processes, as etcd's three, each with one worker thread
# since the three share the machine's cores), both on loopback with fsync
# on, driven by the same
# closed-loop load generator (`raft-host bench`, with `--etcd` for etcd):
# 256-byte puts over shared connections, at several client counts. Prints a
# Markdown table of writes/s, latency and CPU per write (members plus the
# load generator).
#
# Settings (environment):
#   RAFT_COMPARE_SECS      seconds per run (default 10)
#   RAFT_COMPARE_CLIENTS   client counts (default "1 64 256")
#   RAFT_COMPARE_PATHS     raft-host client paths (default "batched unary")
#   RAFT_COMPARE_WORKERS   worker threads of each raft-host member (default 1)
#   RAFT_HOST_BIN          a raft-host binary (default: built here, release)
#   RAFT_COMPARE_JSON      a file to write every run's JSON line to
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${RAFT_COMPARE_SECS:-10}"
clients_list="${RAFT_COMPARE_CLIENTS:-1 64 256}"
paths="${RAFT_COMPARE_PATHS:-batched unary}"
workers="${RAFT_COMPARE_WORKERS:-1}"

if ! command -v etcd >/dev/null; then
    echo "installing Debian's etcd-server" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q etcd-server >&2
fi
source tests/serve-members.sh

work="$(mktemp -d -t raft-compare-etcd.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# A free port range: the kernel's own pick for the first, then the next ones.
base="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
[ "$base" -gt 60000 ] && base=$((base - 1000))
etcd_client() { echo $((base + $1)); }
etcd_peer() { echo $((base + 10 + $1)); }
raft_port=$((base + 20))

initial=""
for i in 1 2 3; do initial+="e$i=http://127.0.0.1:$(etcd_peer "$i"),"; done
initial="${initial%,}"
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$work/etcd-$i" \
        --listen-client-urls "http://127.0.0.1:$(etcd_client "$i")" \
        --advertise-client-urls "http://127.0.0.1:$(etcd_client "$i")" \
        --listen-peer-urls "http://127.0.0.1:$(etcd_peer "$i")" \
        --initial-advertise-peer-urls "http://127.0.0.1:$(etcd_peer "$i")" \
        --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token compare \
        --logger zap --log-level error >"$work/etcd-$i.log" 2>&1 &
    pids+=("$!")
done
etcd_endpoints="127.0.0.1:$(etcd_client 1),127.0.0.1:$(etcd_client 2),127.0.0.1:$(etcd_client 3)"

start_members compare "$raft_port" "$work" --worker-threads "$workers"
raft_endpoints="127.0.0.1:$raft_port,127.0.0.1:$((raft_port + 1)),127.0.0.1:$((raft_port + 2))"

# Both clusters up: etcd answers a put, raft-host a write.
deadline=$((SECONDS + 60))
until "$RAFT_HOST_BIN" bench --etcd --addr "$etcd_endpoints" --clients 1 --duration-secs 1 --json >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "etcd did not start:" >&2; cat "$work"/etcd-*.log >&2; exit 1; }
    sleep 0.5
done
until "$RAFT_HOST_BIN" write --addr "$raft_endpoints" '{"op":"put","key":"warmup","value":"1"}' >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "raft-host did not start:" >&2; cat "$work"/member-*.log >&2; exit 1; }
    sleep 0.5
done

runs="$work/runs.jsonl"
: >"$runs"
for clients in $clients_list; do
    connections=$((clients < 8 ? clients : 8))
    common=(--clients "$clients" --connections "$connections" --duration-secs "$secs" --json)
    echo "etcd, $clients clients" >&2
    "$RAFT_HOST_BIN" bench --etcd --addr "$etcd_endpoints" "${common[@]}" >>"$runs"
    for path in $paths; do
        echo "raft-host $path, $clients clients" >&2
        "$RAFT_HOST_BIN" bench --addr "$raft_endpoints" --path "$path" "${common[@]}" >>"$runs"
    done
done
[ -n "${RAFT_COMPARE_JSON:-}" ] && cp "$runs" "$RAFT_COMPARE_JSON"

python3 - "$runs" <<'EOF'
import json, sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]

def cpu_per_write(run):
    members = sum(p["cpu_us_per_op"] for p in run["processes_cpu"])
    return members, run.get("bench_cpu_us_per_op") or 0.0

print("| clients | system | writes/s | p50 ms | p99 ms | CPU µs/write (members + load) | errors |")
print("|---:|---|---:|---:|---:|---:|---:|")
for run in runs:
    name = "etcd" if run["path"] == "etcd" else f"raft-host ({run['path']})"
    members, load = cpu_per_write(run)
    latency = run["write_latency"]
    print(
        f"| {run['clients']} | {name} | {run['writes_per_sec']:,.0f} | {latency['p50_us'] / 1000:.1f} | "
        f"{latency['p99_us'] / 1000:.1f} | {members + load:.0f} ({members:.0f} + {load:.0f}) | {run['errors']} |"
    )
by_clients = {}
for run in runs:
    by_clients.setdefault(run["clients"], {})[run["path"]] = run
print()
for clients, found in by_clients.items():
    etcd = found.get("etcd")
    for path, run in found.items():
        if path == "etcd" or not etcd or not etcd["writes_per_sec"]:
            continue
        print(
            f"{clients} clients, {path}: {run['writes_per_sec'] / etcd['writes_per_sec']:.1f}x etcd's writes/s, "
            f"p99 {run['write_latency']['p99_us'] / max(etcd['write_latency']['p99_us'], 1):.2f}x etcd's"
        )
EOF
