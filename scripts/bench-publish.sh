#!/usr/bin/env bash
# Acknowledged publishes per second, durable (history on: each ack waits for the group-committed
# write to disk) against plain (history off), on loopback.
#
# Builds the server and plaza-bench (release), then runs six cases, each against a FRESH server
# (new ports, new data directory) started with a config that has a `durable` namespace
# (history_size = 1000) and a `plain` one (no history), both with client_publish:
#
#   durable-1x1024       1 publisher keeping 1024 publishes in flight (the server's per-connection
#                        maximum), one channel
#   durable-100x16-one   100 publishers, 16 in flight each, all on one channel
#   durable-100x16-each  100 publishers, 16 in flight each, one channel each
#   plain-...            the same three with history off
#
# The JSON line of each case goes to stdout; the per-case tables, progress lines and a final
# markdown summary table go to stderr.
#
#   scripts/bench-publish.sh                        # native WebSocket publishers
#   VIA=api scripts/bench-publish.sh                # through POST /api/publish instead
#   scripts/bench-publish.sh --payload-bytes 1000   # extra flags go to every plaza-bench run
#
# Environment: SKIP_BUILD=1 reuses the binaries in target/release; N_DURABLE and N_PLAIN are the
# publications per case (default 200000 and 500000: a few seconds each on 2 cores); CASE_TIMEOUT the deadline of each case in seconds
# (default 40); VIA native|api.
# Exit status: 0 when every case was clean, 2 when one finished with problems (see "problems" in
# its JSON), 1 when a server could not be started or plaza-bench could not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLAZA="$ROOT/target/release/plaza"
BENCH="$ROOT/target/release/plaza-bench"
N_DURABLE="${N_DURABLE:-200000}"
N_PLAIN="${N_PLAIN:-500000}"
CASE_TIMEOUT="${CASE_TIMEOUT:-40}"
VIA="${VIA:-native}"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p plaza-server -p plaza-bench) >&2
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/plaza-bench-publish.XXXXXX")"
KEY="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
SERVER_PID=""

cat >"$TMP/plaza.toml" <<'EOF'
ping_interval_secs = 0

[namespaces.durable]
history_size = 1000
client_publish = true

[namespaces.plain]
client_publish = true
EOF

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        local t0
        t0="$(date +%s.%N)"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do # up to 10 s
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "bench-publish: server did not stop after SIGTERM, killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
        echo "bench-publish: server stopped $(awk -v a="$t0" -v b="$(date +%s.%N)" \
            'BEGIN { printf "%.2f", b - a }') s after SIGTERM" >&2
    fi
    SERVER_PID=""
}
cleanup() {
    stop_server
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The key goes through the environment (not the command line, which `ps` shows).
export PLAZA_BACKEND_KEY="$KEY"

# Starts a fresh server on two new free ports with a new data directory; sets SERVER_PID,
# WS_PORT, API_PORT. Returns 1 when it does not come up.
start_server() {
    local name="$1"
    read -r WS_PORT API_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
')
    "$PLAZA" serve --config "$TMP/plaza.toml" \
        --listen "127.0.0.1:$WS_PORT" --backend-listen "127.0.0.1:$API_PORT" \
        --data-dir "$TMP/data-$name" >"$TMP/server-$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 150); do # up to 30 s
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "bench-publish: the server exited during start-up:" >&2
            tail -n 30 "$TMP/server-$name.log" >&2
            SERVER_PID=""
            return 1
        fi
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
            "http://127.0.0.1:$API_PORT/healthz" || true)"
        if [[ "$code" == 200 ]]; then
            echo "bench-publish: [$name] server pid $SERVER_PID on 127.0.0.1:$WS_PORT" \
                "(backend $API_PORT), data dir $TMP/data-$name" >&2
            return 0
        fi
        sleep 0.2
    done
    echo "bench-publish: the server did not answer /healthz within 30 s:" >&2
    tail -n 30 "$TMP/server-$name.log" >&2
    return 1
}

worst=0
note_rc() {
    local rc="$1"
    if [[ "$rc" == 1 || ( "$rc" != 0 && "$rc" != 2 ) ]]; then
        worst=1
    elif [[ "$rc" == 2 && "$worst" == 0 ]]; then
        worst=2
    fi
}

# run_case NAME NAMESPACE CHANNELS(one|per-publisher) PUBLISHERS WINDOW PUBLICATIONS [flags...]
run_case() {
    local name="$1" ns="$2" channels="$3" publishers="$4" window="$5" n="$6"
    shift 6
    echo "bench-publish: === $name: $ns, $publishers publishers, window $window, $n publications ===" >&2
    if ! start_server "$name"; then
        note_rc 1
        return
    fi
    local rc=0
    "$BENCH" publish --via "$VIA" \
        --ws "ws://127.0.0.1:$WS_PORT/plaza/ws" \
        --api "http://127.0.0.1:$API_PORT" \
        --channel "$ns:bench" --channels "$channels" \
        --publishers "$publishers" --window "$window" --publications "$n" \
        --server-pid "$SERVER_PID" --timeout-secs "$CASE_TIMEOUT" --label "$name" \
        "$@" >"$TMP/result-$name.json" || rc=$?
    stop_server
    if [[ "$rc" == 2 ]]; then
        echo "bench-publish: [$name] finished with problems (see \"problems\" in the JSON)" >&2
    elif [[ "$rc" != 0 ]]; then
        echo "bench-publish: [$name] plaza-bench failed ($rc); server log tail:" >&2
        tail -n 30 "$TMP/server-$name.log" >&2
    fi
    note_rc "$rc"
    cat "$TMP/result-$name.json" >>"$TMP/results.jsonl"
    cat "$TMP/result-$name.json"
}

: >"$TMP/results.jsonl"
for ns in durable plain; do
    n="$N_DURABLE"
    [[ "$ns" == plain ]] && n="$N_PLAIN"
    run_case "$ns-1x1024" "$ns" one 1 1024 "$n" "$@"
    run_case "$ns-100x16-one" "$ns" one 100 16 "$n" "$@"
    run_case "$ns-100x16-each" "$ns" per-publisher 100 16 "$n" "$@"
done

python3 - "$TMP/results.jsonl" "$VIA" >&2 <<'EOF'
import json, sys

rows = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        r = json.loads(line)
        rows[r.get("label")] = r

def fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"

print()
print(f"Acknowledged publishes via {sys.argv[2]} (fresh server each):")
print()
print("| case | acked/s | p50 ack µs | p99 ack µs | max ack µs | server µs/ack | server cores "
      "| bench cores | problems |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
CASES = ["1x1024", "100x16-one", "100x16-each"]
for name in [f"{ns}-{c}" for ns in ("durable", "plain") for c in CASES]:
    r = rows.get(name)
    if r is None:
        print(f"| {name} | (no result) | | | | | | | |")
        continue
    s = r.get("server") or {}
    lat = r["latency"]
    print(f"| {name} | {fmt(r['acked_per_sec'])} | {fmt(lat['p50_us'])} | {fmt(lat['p99_us'])} "
          f"| {fmt(lat['max_us'])} | {fmt(s.get('cpu_us_per_ack'), 2)} "
          f"| {fmt(s.get('cores_publish'), 2)} | {fmt(r['bench']['cores_publish'], 2)} "
          f"| {'; '.join(r['problems']) or 'none'} |")
print()
for d, p in [(f"durable-{c}", f"plain-{c}") for c in CASES]:
    if d in rows and p in rows and rows[p]["acked_per_sec"] > 0:
        ratio = rows[d]["acked_per_sec"] / rows[p]["acked_per_sec"]
        print(f"- durable/plain, {d.split('-', 1)[1]}: {ratio:.2f} "
              f"({fmt(rows[d]['acked_per_sec'])} / {fmt(rows[p]['acked_per_sec'])} acked/s)")
EOF
exit "$worst"
