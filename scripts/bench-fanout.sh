#!/usr/bin/env bash
# Fan-out benchmark of Plaza's native protocol on loopback.
#
# Builds the server and plaza-bench (release), starts `plaza serve` on two free ports with a
# throw-away data directory and key, runs `plaza-bench fanout` against it (with --server-pid, so
# the server's CPU and memory are measured), stops the server and prints the JSON result line on
# stdout. The table and progress lines go to stderr.
#
#   scripts/bench-fanout.sh                                  # 1000 subscribers x 2000 publications
#   scripts/bench-fanout.sh --subscribers 5000 --rate 1000   # extra flags go to plaza-bench fanout
#
# Exit status: plaza-bench's (0 clean run, 2 finished with problems, 1 could not run), or 1 when
# the server could not be started.
# Environment: SKIP_BUILD=1 reuses the binaries in target/release.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLAZA="$ROOT/target/release/plaza"
BENCH="$ROOT/target/release/plaza-bench"

# 1000+ connections on each side of loopback: raise the descriptor limit as far as allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "bench-fanout: open files limit $(ulimit -n)" >&2

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p plaza-server -p plaza-bench) >&2
fi

# Two distinct free ports (both bound at once, then released).
read -r WS_PORT API_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
')

TMP="$(mktemp -d "${TMPDIR:-/tmp}/plaza-bench.XXXXXX")"
KEY="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
SERVER_PID=""

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
            echo "bench-fanout: server did not stop after SIGTERM, killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
        echo "bench-fanout: server stopped $(awk -v a="$t0" -v b="$(date +%s.%N)" \
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
"$PLAZA" serve --listen "127.0.0.1:$WS_PORT" --backend-listen "127.0.0.1:$API_PORT" \
    --data-dir "$TMP/data" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!

# Wait (at most 30 s) for GET /healthz to answer 200.
healthy=0
for _ in $(seq 1 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "bench-fanout: the server exited during start-up:" >&2
        tail -n 30 "$TMP/server.log" >&2
        exit 1
    fi
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
        "http://127.0.0.1:$API_PORT/healthz" || true)"
    if [[ "$code" == 200 ]]; then
        healthy=1
        break
    fi
    sleep 0.2
done
if [[ "$healthy" != 1 ]]; then
    echo "bench-fanout: the server did not answer /healthz within 30 s:" >&2
    tail -n 30 "$TMP/server.log" >&2
    exit 1
fi
echo "bench-fanout: server pid $SERVER_PID on 127.0.0.1:$WS_PORT (backend $API_PORT)" >&2

rc=0
"$BENCH" fanout \
    --ws "ws://127.0.0.1:$WS_PORT/plaza/ws" \
    --api "http://127.0.0.1:$API_PORT" \
    --channel bench \
    --server-pid "$SERVER_PID" \
    "$@" >"$TMP/result.json" || rc=$?

stop_server
if [[ "$rc" == 2 ]]; then
    echo "bench-fanout: the run finished with problems (see \"problems\" in the JSON)" >&2
elif [[ "$rc" != 0 ]]; then
    echo "bench-fanout: plaza-bench failed ($rc); server log tail:" >&2
    tail -n 30 "$TMP/server.log" >&2
fi
cat "$TMP/result.json"
exit "$rc"
