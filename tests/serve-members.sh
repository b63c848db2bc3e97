# Sourced by the benchmark scripts (compare-etcd.sh, restart-bench.sh).
#
# Sets RAFT_HOST_BIN, building raft-host here in release when it is not
# given, and defines start_members CLUSTER FIRST_PORT DIR [SERVE FLAGS...]:
# three `raft-host serve` members of CLUSTER, plaintext, on 127.0.0.1 ports
# FIRST_PORT to FIRST_PORT+2, with their data and logs under
# DIR/member-N(.log); their process ids are appended to the array `pids`.

if [ -z "${RAFT_HOST_BIN:-}" ]; then
    cargo build --release --bin raft-host >&2
    RAFT_HOST_BIN="${CARGO_TARGET_DIR:-target}/release/raft-host"
fi

start_members() {
    local cluster="$1" first_port="$2" dir="$3" id peer
    shift 3
    for id in 1 2 3; do
        local peers=()
        for peer in 1 2 3; do
            [ "$peer" = "$id" ] || peers+=(--peer "$peer=127.0.0.1:$((first_port + peer - 1))")
        done
        "$RAFT_HOST_BIN" serve --id "$id" --cluster "$cluster" --listen "127.0.0.1:$((first_port + id - 1))" \
            --data-dir "$dir/member-$id" --plaintext true "${peers[@]}" "$@" >>"$dir/member-$id.log" 2>&1 &
        pids+=("$!")
    done
}
