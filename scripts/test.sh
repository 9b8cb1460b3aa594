#!/usr/bin/env bash
# Runs every check and test of Plaza: formatting, lints, the Rust unit and end-to-end tests, and
# the Python end-to-end tests (PyPI `websockets`, in a venv this script creates).
#
#   ./scripts/test.sh
#
# Works on a fresh Debian 12 machine with the Rust toolchain and python3; installs what else it
# needs. Nothing is skipped silently: a missing prerequisite fails the run with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages (CI runs as root on a fresh machine).
apt_install() {
  command -v apt-get >/dev/null 2>&1 || fail "need Debian packages $* but apt-get is not available"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  step "apt-get install $*"
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2 \
    || fail "apt-get install $* failed"
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
command -v cargo >/dev/null 2>&1 || fail "cargo is not installed (see https://rustup.rs)"

step "cargo fmt --check"
cargo fmt --all -- --check || fail "formatting: run 'cargo fmt --all'"

step "cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

step "build"
cargo build --workspace --all-targets --all-features --quiet
export PLAZA_BIN="$ROOT/target/debug/plaza"
[ -x "$PLAZA_BIN" ] || fail "target/debug/plaza was not built"

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
