#!/usr/bin/env bash
# Plaza against its peers, on the same workloads in the same run, on loopback.
#
# Peers: NATS (nats-server's WebSocket listener), Socket.IO 4 (bench/peers/socketio-server.js),
# Snorky 0.1.0a4 (bench/peers/snorky_server.py), High-templar 3.1 (bench/peers/hightemplar_app.py,
# with the mock app bench/peers/mock_app.py and a private RabbitMQ node). Whatever is missing is
# installed first: apt `nats-server rabbitmq-server` (services are kept from starting; also
# `nodejs npm python3-venv` where missing), npm
# `socket.io` into bench/peers/node_modules, pip venvs in bench/.venv/{snorky,hightemplar}.
#
# Every server is started fresh, on its own free loopback ports, for every run, and stopped by
# PID afterwards. Each run is `plaza-bench SCENARIO --peer PEER ... --server-pid PID`; its JSON
# line goes to bench/results/<date>.json (all runs, with the machine), and a markdown table with
# ratios against Plaza goes to stdout and bench/results/<date>.md. Progress and each run's human
# table go to stderr.
#
#   scripts/bench-peers.sh                        # fanout 1000 x 2000, conns 10000, chat 50 x 20
#   scripts/bench-peers.sh --big                  # also fanout 5000 x 2000
#   PEERS=plaza,nats scripts/bench-peers.sh       # some peers only
#   SCENARIOS=fanout scripts/bench-peers.sh       # some scenarios only (fanout, conns, chat)
#
# Slow peers get fewer publications so that a run stays under a minute or two: a peer's
# publications are min(PUBS, MAX_DELIVERIES_<PEER> / subscribers); the table says how many each
# run used. Deliveries/s does not depend on it.
#
# Environment: SKIP_BUILD=1 (reuse target/release), SKIP_INSTALL=1, PUBS (2000), WINDOW (16),
# CONNS (10000), CHAT_ROOMS (50), CHAT_MEMBERS (20), CHAT_SECS (20), MAX_DELIVERIES_SOCKETIO
# (4000000), MAX_DELIVERIES_SNORKY (400000), MAX_DELIVERIES_HIGHTEMPLAR (200000), RUN_TIMEOUT
# (300 s per run), PYTHON (python3), PIN (1: the server under test and its helpers run on the
# first half of the CPUs, the load generator on the other half, so the two never compete for a
# core; 0: no pinning, both share every core), SERVER_CPUS and BENCH_CPUS (taskset lists, to
# override the split).
# Exit status: 0 when every run was clean, 2 when a run finished with problems or a peer could
# not be run (see the table and the JSON), 1 when nothing could be run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLAZA="$ROOT/target/release/plaza"
BENCH="$ROOT/target/release/plaza-bench"
PEERS_DIR="$ROOT/bench/peers"
VENV_DIR="$ROOT/bench/.venv"
RESULTS_DIR="$ROOT/bench/results"
PYTHON="${PYTHON:-python3}"
PEERS="${PEERS:-plaza,nats,socketio,snorky,hightemplar}"
SCENARIOS="${SCENARIOS:-fanout,conns,chat}"
PUBS="${PUBS:-2000}"
WINDOW="${WINDOW:-16}"
CONNS="${CONNS:-10000}"
CHAT_ROOMS="${CHAT_ROOMS:-50}"
CHAT_MEMBERS="${CHAT_MEMBERS:-20}"
CHAT_SECS="${CHAT_SECS:-20}"
RUN_TIMEOUT="${RUN_TIMEOUT:-300}"
PIN="${PIN:-1}"
BIG=0
for arg in "$@"; do
    case "$arg" in
    --big) BIG=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "bench-peers: unknown argument $arg" >&2
        exit 1
        ;;
    esac
done

log() { echo "bench-peers: $*" >&2; }

# Which cores the servers and the load generator run on.
SERVER_ON=()
BENCH_ON=()
NCPU="$(nproc)"
cpu_range() { if [[ "$1" == "$2" ]]; then echo "$1"; else echo "$1-$2"; fi; }
if [[ "$PIN" == 1 && "$NCPU" -ge 2 ]]; then
    SERVER_CPUS="${SERVER_CPUS:-$(cpu_range 0 $((NCPU / 2 - 1)))}"
    BENCH_CPUS="${BENCH_CPUS:-$(cpu_range $((NCPU / 2)) $((NCPU - 1)))}"
    SERVER_ON=(taskset -c "$SERVER_CPUS")
    BENCH_ON=(taskset -c "$BENCH_CPUS")
    export BENCH_PINNING="servers on CPUs $SERVER_CPUS, load generator on CPUs $BENCH_CPUS"
else
    export BENCH_PINNING="not pinned: servers and load generator share all $NCPU CPUs"
fi
log "$BENCH_PINNING"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit $(ulimit -n)"

STARTED_AT="$(date +%s)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/plaza-bench-peers.XXXXXX")"
RUNS="$TMP/runs.jsonl"
: >"$RUNS"
PIDS=()      # every process this script started and has not stopped yet
SERVER_PID=""
EPMD_PID=""

# Stops one process: SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
    local pid="$1"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop after SIGTERM, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    local keep=()
    for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

stop_all() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    if [[ -n "$EPMD_PID" ]]; then
        kill -TERM "$EPMD_PID" 2>/dev/null || true
        EPMD_PID=""
    fi
}
cleanup() {
    stop_all
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports, all distinct: `read -r A B < <(free_ports 2)`.
free_ports() {
    "$PYTHON" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
' "$1"
}

# Waits (up to $3 seconds, default 30) until 127.0.0.1:$1 accepts connections, while $2 lives.
wait_port() {
    local port="$1" pid="$2" secs="${3:-30}" i
    for ((i = 0; i < secs * 5; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# ------------------------------------------------------------------------------------------------
# Installing what is missing.

SKIPPED=() # "peer: why"
skip_peer() {
    log "skipping $1: $2"
    SKIPPED+=("$1: $2")
    PEERS="$(echo ",$PEERS," | sed "s/,$1,/,/; s/^,//; s/,$//")"
}
has_peer() { [[ ",$PEERS," == *",$1,"* ]]; }

install_apt() {
    local need=()
    if has_peer nats && ! command -v nats-server >/dev/null; then need+=(nats-server); fi
    if has_peer hightemplar && [[ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
        need+=(rabbitmq-server)
    fi
    if has_peer socketio && ! command -v npm >/dev/null; then need+=(nodejs npm); fi
    if { has_peer snorky || has_peer hightemplar; } &&
        ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        need+=(python3-venv)
    fi
    [[ ${#need[@]} -gt 0 ]] || return 0
    log "apt-get install ${need[*]}"
    # Keep the packages' services from starting (RabbitMQ would listen on every interface):
    # the standard policy-rc.d hook, only if the machine has none, removed afterwards.
    local policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
    fi
    local ok=1
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; } \
        >"$TMP/apt.log" 2>&1 || ok=0
    [[ -z "$policy" ]] || rm -f "$policy"
    if [[ "$ok" != 1 ]]; then
        tail -n 20 "$TMP/apt.log" >&2
        command -v nats-server >/dev/null || skip_peer nats "apt-get install nats-server failed"
        [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] ||
            skip_peer hightemplar "apt-get install rabbitmq-server failed"
    fi
}

install_npm() {
    has_peer socketio || return 0
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        skip_peer socketio "node and npm are not installed"
        return 0
    fi
    if [[ ! -f "$PEERS_DIR/node_modules/socket.io/package.json" ]]; then
        log "npm ci in bench/peers"
        (cd "$PEERS_DIR" && npm ci --no-audit --no-fund --loglevel=error) >"$TMP/npm.log" 2>&1 ||
            { tail -n 20 "$TMP/npm.log" >&2; skip_peer socketio "npm ci failed"; }
    fi
}

# make_venv NAME PIP-ARGS...: bench/.venv/NAME with the packages, unless it is already there.
make_venv() {
    local name="$1"
    shift
    local dir="$VENV_DIR/$name"
    if [[ -f "$dir/.complete" ]]; then
        return 0
    fi
    log "pip venv bench/.venv/$name: $*"
    rm -rf "$dir"
    { "$PYTHON" -m venv "$dir" && "$dir/bin/pip" install -q "$@" && touch "$dir/.complete"; } \
        >"$TMP/pip-$name.log" 2>&1 || { tail -n 20 "$TMP/pip-$name.log" >&2; return 1; }
}

install_pip() {
    if has_peer snorky; then
        make_venv snorky --pre 'snorky==0.1.0a4' 'tornado<5' || skip_peer snorky "pip install failed"
    fi
    if has_peer hightemplar; then
        make_venv hightemplar 'high-templar==3.1.0' || skip_peer hightemplar "pip install failed"
    fi
}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    install_apt
    install_npm
    install_pip
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release -p plaza-server -p plaza-bench"
    (cd "$ROOT" && cargo build --release -p plaza-server -p plaza-bench) >&2
fi

# ------------------------------------------------------------------------------------------------
# Starting the servers. Each start_* sets SERVER_PID and TARGET (plaza-bench arguments).

KEY="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export PLAZA_BACKEND_KEY="$KEY"

start_plaza() {
    local ws api
    read -r ws api < <(free_ports 2)
    rm -rf "$TMP/plaza-data"
    cat >"$TMP/plaza.toml" <<'EOF'
[namespaces.chat]
client_publish = true
EOF
    ${SERVER_ON[@]+"${SERVER_ON[@]}"} "$PLAZA" serve --config "$TMP/plaza.toml" --listen "127.0.0.1:$ws" \
        --backend-listen "127.0.0.1:$api" --data-dir "$TMP/plaza-data" >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$api" "$SERVER_PID" && wait_port "$ws" "$SERVER_PID" || return 1
    TARGET=(--peer plaza --ws "ws://127.0.0.1:$ws/plaza/ws" --api "http://127.0.0.1:$api")
}

start_nats() {
    local client ws
    read -r client ws < <(free_ports 2)
    cat >"$TMP/nats.conf" <<EOF
listen: "127.0.0.1:$client"
websocket {
  listen: "127.0.0.1:$ws"
  no_tls: true
}
EOF
    ${SERVER_ON[@]+"${SERVER_ON[@]}"} nats-server -c "$TMP/nats.conf" >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$ws" "$SERVER_PID" || return 1
    TARGET=(--peer nats --ws "ws://127.0.0.1:$ws/")
}

start_socketio() {
    local port
    read -r port < <(free_ports 1)
    PORT="$port" ${SERVER_ON[@]+"${SERVER_ON[@]}"} node "$PEERS_DIR/socketio-server.js" >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$port" "$SERVER_PID" || return 1
    TARGET=(--peer socketio --ws "ws://127.0.0.1:$port/socket.io/?EIO=4&transport=websocket")
}

start_snorky() {
    local ws api
    read -r ws api < <(free_ports 2)
    SNORKY_KEY="$KEY" ${SERVER_ON[@]+"${SERVER_ON[@]}"} "$VENV_DIR/snorky/bin/python" "$PEERS_DIR/snorky_server.py" "$ws" "$api" \
        >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$ws" "$SERVER_PID" && wait_port "$api" "$SERVER_PID" || return 1
    TARGET=(--peer snorky --ws "ws://127.0.0.1:$ws/ws" --api "http://127.0.0.1:$api")
}

RABBIT_PID=""
AMQP_PORT=""
MOCK_PID=""
MOCK_PORT=""
# A private RabbitMQ node (no plugins, loopback only) and the mock app, for High-templar.
start_rabbitmq() {
    local dist epmd d="$TMP/rabbitmq"
    read -r AMQP_PORT dist epmd MOCK_PORT < <(free_ports 4)
    rm -rf "$d"
    mkdir -p "$d"
    echo '[].' >"$d/enabled_plugins"
    printf 'listeners.tcp.default = 127.0.0.1:%s\ndefault_user = bench\ndefault_pass = bench\n' \
        "$AMQP_PORT" >"$d/rabbitmq.conf"
    ${SERVER_ON[@]+"${SERVER_ON[@]}"} env HOME="$d" RABBITMQ_NODENAME="plazabench$$@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$dist" ERL_EPMD_PORT="$epmd" \
        ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_CONFIG_FILE="$d/rabbitmq" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        /usr/lib/rabbitmq/bin/rabbitmq-server >"$d/out.log" 2>&1 &
    RABBIT_PID=$!
    PIDS+=("$RABBIT_PID")
    log "RabbitMQ starting on 127.0.0.1:$AMQP_PORT (pid $RABBIT_PID)"
    if ! wait_port "$AMQP_PORT" "$RABBIT_PID" 90; then
        tail -n 20 "$d/out.log" >&2
        return 1
    fi
    # The Erlang VM is the wrapper's child; epmd was started by the node and detached: find it
    # by its port, to stop it at the end.
    local beam
    beam="$(pgrep -P "$RABBIT_PID" | head -n1 || true)"
    [[ -z "$beam" ]] || PIDS+=("$beam")
    EPMD_PID="$(ss -ltnpH "sport = :$epmd" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 |
        cut -d= -f2 || true)"
    ${SERVER_ON[@]+"${SERVER_ON[@]}"} "$VENV_DIR/hightemplar/bin/python" "$PEERS_DIR/mock_app.py" \
        "$MOCK_PORT" \
        >"$TMP/mock.log" 2>&1 &
    MOCK_PID=$!
    PIDS+=("$MOCK_PID")
    wait_port "$MOCK_PORT" "$MOCK_PID" || return 1
}

start_hightemplar() {
    if [[ -z "$RABBIT_PID" ]] || ! kill -0 "$RABBIT_PID" 2>/dev/null; then
        start_rabbitmq || return 1
    fi
    local port
    read -r port < <(free_ports 1)
    (cd "$PEERS_DIR" && exec ${SERVER_ON[@]+"${SERVER_ON[@]}"} env HT_API_URL="http://127.0.0.1:$MOCK_PORT/api/" \
        HT_AMQP_HOST="127.0.0.1:$AMQP_PORT" HT_AMQP_USER=bench HT_AMQP_PASS=bench \
        "$VENV_DIR/hightemplar/bin/python" hightemplar_app.py "$port") >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$port" "$SERVER_PID" || return 1
    TARGET=(--peer hightemplar --ws "ws://127.0.0.1:$port/ws/" --amqp "127.0.0.1:$AMQP_PORT"
        --amqp-login bench:bench)
    # HT declares its exchange when its first connection arrives: open one and wait for it.
    "$PYTHON" - "$port" <<'EOF' >&2 || true
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"GET /ws/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
s.recv(4096)
time.sleep(1.0)
s.close()
EOF
}

# ------------------------------------------------------------------------------------------------
# Running.

RC=0
publications_for() { # PEER SUBSCRIBERS
    local max
    case "$1" in
    socketio) max="${MAX_DELIVERIES_SOCKETIO:-4000000}" ;;
    snorky) max="${MAX_DELIVERIES_SNORKY:-400000}" ;;
    hightemplar) max="${MAX_DELIVERIES_HIGHTEMPLAR:-200000}" ;;
    *) max=0 ;;
    esac
    if [[ "$max" == 0 ]]; then
        echo "$PUBS"
    else
        local n=$((max / $2))
        ((n < 10)) && n=10
        ((n > PUBS)) && n="$PUBS"
        echo "$n"
    fi
}

# run_one PEER LABEL SCENARIO ARGS...: a fresh server, one plaza-bench run, the server stopped.
run_one() {
    local peer="$1" label="$2" scenario="$3"
    shift 3
    log "=== $label: $peer ($(($(date +%s) - STARTED_AT)) s into the run)"
    TARGET=()
    SERVER_PID=""
    if ! "start_$peer"; then
        log "$peer did not start:"
        tail -n 20 "$TMP/server.log" >&2 || true
        stop_pid "$SERVER_PID"
        echo "{\"label\":\"$label\",\"peer\":\"$peer\",\"error\":\"the server did not start\"}" >>"$RUNS"
        RC=2
        return 0
    fi
    local rc=0 out="$TMP/out.json"
    : >"$out"
    timeout -k 10 "$((RUN_TIMEOUT + 60))" ${BENCH_ON[@]+"${BENCH_ON[@]}"} "$BENCH" "$scenario" \
        "${TARGET[@]}" \
        --server-pid "$SERVER_PID" --timeout-secs "$RUN_TIMEOUT" --progress-secs 5 "$@" \
        >"$out" || rc=$?
    stop_pid "$SERVER_PID"
    if [[ -s "$out" ]]; then
        "$PYTHON" -c '
import json, sys
run = json.loads(open(sys.argv[1]).read())
run["label"] = sys.argv[2]
run["exit_status"] = int(sys.argv[3])
print(json.dumps(run))' "$out" "$label" "$rc" >>"$RUNS"
    else
        echo "{\"label\":\"$label\",\"peer\":\"$peer\",\"error\":\"plaza-bench exit status $rc\"}" >>"$RUNS"
        tail -n 20 "$TMP/server.log" >&2 || true
    fi
    [[ "$rc" == 0 ]] || RC=2
}

IFS=, read -r -a PEER_LIST <<<"$PEERS"
IFS=, read -r -a SCENARIO_LIST <<<"$SCENARIOS"
FANOUT_SIZES=(1000)
[[ "$BIG" != 1 ]] || FANOUT_SIZES+=(5000)

for scenario in "${SCENARIO_LIST[@]}"; do
    case "$scenario" in
    fanout)
        for subs in "${FANOUT_SIZES[@]}"; do
            for peer in "${PEER_LIST[@]}"; do
                pubs="$(publications_for "$peer" "$subs")"
                run_one "$peer" "fanout $subs" fanout --subscribers "$subs" \
                    --publications "$pubs" --window "$WINDOW" --channel bench
            done
        done
        ;;
    conns)
        for peer in "${PEER_LIST[@]}"; do
            run_one "$peer" "conns $CONNS" conns --connections "$CONNS"
        done
        ;;
    chat)
        for peer in "${PEER_LIST[@]}"; do
            run_one "$peer" "chat ${CHAT_ROOMS}x$CHAT_MEMBERS" chat --rooms "$CHAT_ROOMS" \
                --members "$CHAT_MEMBERS" --secs "$CHAT_SECS"
        done
        ;;
    *)
        log "unknown scenario $scenario"
        RC=2
        ;;
    esac
done
stop_all

# ------------------------------------------------------------------------------------------------
# The results file and the table.

mkdir -p "$RESULTS_DIR"
STAMP="$(date -u +%Y-%m-%dT%H%M%SZ)"
"$PYTHON" "$ROOT/bench/report.py" "$RUNS" "$RESULTS_DIR/$STAMP.json" \
    "$RESULTS_DIR/$STAMP.md" "$(($(date +%s) - STARTED_AT))" "${SKIPPED[@]+"${SKIPPED[@]}"}"
log "results: bench/results/$STAMP.json, table: bench/results/$STAMP.md"
exit "$RC"
