#!/usr/bin/env bash
# The single test command (README and CI): installs the tools the tests talk to, builds the
# gateway, runs the Rust tests, then the end-to-end pytest suite in tests/.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -k transparency # extra arguments go to pytest
#
# Env: PGW_TOOLS_DIR (tool cache, default ~/.cache/payload-gateway), PGW_GATEWAY_BIN (gateway
# binary to test, default target/release/payload-gateway), PGW_SKIP_CARGO_TEST=1 (skip the Rust
# tests, for quick iterations on the suite).
#
# The Rust tests run with --release on purpose: the suite needs the release binary anyway, so
# the test build reuses the release dependency artifacts instead of compiling the whole
# dependency tree a second time in the debug profile (on 2 cores that second tree costs more
# than the release optimizations slow down the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/.."

stage_start=$SECONDS
stage() {
  echo "test.sh: [$((SECONDS - stage_start))s] $*" >&2
}

# CI may run with a bare environment: make sure HOME is set (setup.sh and cargo rely on it).
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
TOOLS_DIR="${PGW_TOOLS_DIR:-$HOME/.cache/payload-gateway}"
export PGW_TOOLS_DIR="$TOOLS_DIR"

stage "setup"
bash scripts/setup.sh

stage "cargo build --release -p payload-gateway"
cargo build --release -p payload-gateway

if [[ "${PGW_SKIP_CARGO_TEST:-0}" != "1" ]]; then
  stage "cargo test --workspace --release"
  cargo test --workspace --release
fi

export PGW_GATEWAY_BIN="${PGW_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/payload-gateway}"
stage "pytest (gateway: $PGW_GATEWAY_BIN)"
status=0
"$TOOLS_DIR/venv/bin/python" -m pytest tests -p no:cacheprovider -ra --timeout=300 --durations=20 "$@" || status=$?
stage "done (exit $status)"
exit "$status"
