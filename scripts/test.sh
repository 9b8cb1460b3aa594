#!/usr/bin/env bash
# Runs every check and test of Plaza: formatting, lints, the Rust unit and end-to-end tests, and
# the Python end-to-end tests (PyPI `websockets`, in a venv this script creates).
#
#   ./scripts/test.sh
#
# Works on a fresh Debian 12 machine with the Rust toolchain and python3; installs what else it
# needs (rabbitmq-server for the High-templar tests, which run against a private node;
# redis-server and nats-server for the scale-out tests, which start their own). Nothing is skipped
# silently: a missing prerequisite fails the run with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages (CI runs as root on a fresh machine). The package lists are updated
# once per run, before the first install.
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || fail "need Debian packages $* but apt-get is not available"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  step "apt-get install $*"
  if [ "$APT_UPDATED" -eq 0 ]; then
    $sudo apt-get update -qq >&2 || fail "apt-get update failed"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2 \
    || fail "apt-get install $* failed"
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv

# Services the tests need run privately on their own loopback ports; each start_* function pushes
# its stop function here, and everything pushed is stopped at exit (by PID), pass or fail.
STOP_AT_EXIT=()
stop_services() {
  local i
  for ((i = ${#STOP_AT_EXIT[@]} - 1; i >= 0; i--)); do "${STOP_AT_EXIT[$i]}" || true; done
}
trap stop_services EXIT

# A free loopback TCP port.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# RabbitMQ (High-templar triggers): a private node in a temp dir, its own epmd, AMQP on a free
# loopback port, no plugins. Exports PLAZA_TEST_AMQP_URL.
RABBITMQ_DIR=""
RABBITMQ_PID=""
EPMD_PID=""
start_rabbitmq() {
  local server=/usr/lib/rabbitmq/bin/rabbitmq-server
  [ -x "$server" ] || apt_install rabbitmq-server
  [ -x "$server" ] || fail "rabbitmq-server is not installed at $server"
  command -v epmd >/dev/null 2>&1 || fail "epmd (Erlang) is missing although rabbitmq-server is installed"
  RABBITMQ_DIR=$(mktemp -d "${TMPDIR:-/tmp}/plaza-rabbitmq.XXXXXX")
  STOP_AT_EXIT+=(stop_rabbitmq)
  local port dist epmd_port node
  port=$(free_port); dist=$(free_port); epmd_port=$(free_port)
  node="plaza$$@localhost"
  step "starting a private RabbitMQ node on 127.0.0.1:$port ($RABBITMQ_DIR)"
  echo '[].' >"$RABBITMQ_DIR/enabled_plugins"
  printf 'listeners.tcp.default = 127.0.0.1:%s\ndefault_user = plaza\ndefault_pass = plaza\nloopback_users = none\n' \
    "$port" >"$RABBITMQ_DIR/rabbitmq.conf"
  epmd -port "$epmd_port" -address 127.0.0.1 >"$RABBITMQ_DIR/epmd.log" 2>&1 &
  EPMD_PID=$!
  env HOME="$RABBITMQ_DIR" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist" ERL_EPMD_PORT="$epmd_port" \
    ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_MNESIA_BASE="$RABBITMQ_DIR/mnesia" \
    RABBITMQ_LOG_BASE="$RABBITMQ_DIR/log" RABBITMQ_PID_FILE="$RABBITMQ_DIR/rabbitmq.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RABBITMQ_DIR/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$RABBITMQ_DIR/rabbitmq" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$server" >"$RABBITMQ_DIR/server.log" 2>&1 &
  RABBITMQ_PID=$!
  local deadline=$((SECONDS + 90))
  until python3 -c "import socket,sys; s=socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', $port)); s.send(b'AMQP\x00\x00\x09\x01'); sys.exit(0 if s.recv(8) else 1)" 2>/dev/null; do
    if ! kill -0 "$RABBITMQ_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$RABBITMQ_DIR/server.log" >&2 || true
      fail "the private RabbitMQ node did not start (log: $RABBITMQ_DIR/server.log)"
    fi
    sleep 0.5
  done
  export PLAZA_TEST_AMQP_URL="amqp://plaza:plaza@127.0.0.1:$port/%2f"
  step "RabbitMQ answers on 127.0.0.1:$port"
}
stop_rabbitmq() {
  local pids=("$RABBITMQ_PID")
  [ -f "$RABBITMQ_DIR/rabbitmq.pid" ] && pids+=("$(cat "$RABBITMQ_DIR/rabbitmq.pid")")
  local pid
  for pid in "${pids[@]}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 1 40); do
    local alive=0
    for pid in "${pids[@]}"; do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.25
  done
  for pid in "${pids[@]}"; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; done
  [ -n "$EPMD_PID" ] && kill -TERM "$EPMD_PID" 2>/dev/null
  [ -n "$RABBITMQ_DIR" ] && rm -rf "$RABBITMQ_DIR"
  RABBITMQ_PID="" EPMD_PID="" RABBITMQ_DIR=""
}

# Redis (scale-out tests): each multi-node test starts its own private redis-server on a free
# loopback port in a temp dir (it restarts it mid-test), from PLAZA_TEST_REDIS_SERVER. Here:
# install it, and prove it starts and answers before any test relies on it.
check_redis() {
  local server
  server=$(command -v redis-server || true)
  [ -n "$server" ] || { apt_install redis-server; server=$(command -v redis-server || true); }
  [ -n "$server" ] || fail "redis-server is not installed"
  local dir port pid
  dir=$(mktemp -d "${TMPDIR:-/tmp}/plaza-redis.XXXXXX")
  port=$(free_port)
  "$server" --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$dir" \
    >"$dir/redis.log" 2>&1 &
  pid=$!
  local deadline=$((SECONDS + 20))
  until python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1', $port), 1); s.sendall(b'PING\r\n'); sys.exit(0 if s.recv(16).startswith(b'+PONG') else 1)" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      tail -n 20 "$dir/redis.log" >&2 || true
      fail "redis-server did not start (log above)"
    fi
    sleep 0.2
  done
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  export PLAZA_TEST_REDIS_SERVER="$server"
  step "redis-server answers ($server); the scale-out tests start their own"
}

# NATS (scale-out tests): each multi-node test starts its own private nats-server with JetStream
# on a free loopback port, its store in a temp dir (it restarts it mid-test), from
# PLAZA_TEST_NATS_SERVER. Here: install it, and prove it starts and answers before any test relies
# on it. Debian installs it in /usr/sbin, which is not on every PATH.
find_nats() { command -v nats-server || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } || true; }
check_nats() {
  local server
  server=$(find_nats)
  [ -n "$server" ] || { apt_install nats-server; server=$(find_nats); }
  [ -n "$server" ] || fail "nats-server is not installed"
  local dir port pid
  dir=$(mktemp -d "${TMPDIR:-/tmp}/plaza-nats.XXXXXX")
  port=$(free_port)
  "$server" -js -sd "$dir" -a 127.0.0.1 -p "$port" >"$dir/nats.log" 2>&1 &
  pid=$!
  local deadline=$((SECONDS + 20))
  until python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1', $port), 1); s.settimeout(1); sys.exit(0 if s.makefile('rb').readline().startswith(b'INFO ') else 1)" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      tail -n 20 "$dir/nats.log" >&2 || true
      fail "nats-server -js did not start (log above)"
    fi
    sleep 0.2
  done
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  export PLAZA_TEST_NATS_SERVER="$server"
  step "nats-server -js answers ($server); the scale-out tests start their own"
}

command -v cargo >/dev/null 2>&1 || fail "cargo is not installed (see https://rustup.rs)"

step "cargo fmt --check"
cargo fmt --all -- --check || fail "formatting: run 'cargo fmt --all'"

step "cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

step "build"
cargo build --workspace --all-targets --all-features --quiet
export PLAZA_BIN="$ROOT/target/debug/plaza"
[ -x "$PLAZA_BIN" ] || fail "target/debug/plaza was not built"

start_rabbitmq
check_redis
check_nats

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast --failure-output final
else
  cargo test --workspace --all-features --no-fail-fast
fi

step "Python end-to-end tests (websockets)"
VENV="$ROOT/target/test-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" 2>/dev/null || {
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV" || fail "cannot create a Python venv"
  }
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt \
  || fail "pip install -r tests/python/requirements.txt failed"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python
