#!/usr/bin/env bash
# The single test command (README and CI): installs the tools the tests talk to, builds the
# gateway, runs the Rust tests, then the end-to-end pytest suite in tests/.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -k transparency # extra arguments go to pytest
#
# Env: PGW_TOOLS_DIR (tool cache, default ~/.cache/payload-gateway), PGW_GATEWAY_BIN (gateway
# binary to test, default target/ci/payload-gateway), PGW_SKIP_CARGO_TEST=1 (skip the Rust
# tests, for quick iterations on the suite).
#
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

# One cargo invocation builds the test binaries and, for the integration tests, the gateway
# binary itself, so dependencies compile once (with dev-dependency features unified). The `ci`
# profile is release without LTO: see Cargo.toml.
if [[ "${PGW_SKIP_CARGO_TEST:-0}" != "1" ]]; then
  stage "cargo test --workspace --profile ci"
  cargo test --workspace --profile ci
else
  stage "cargo build --profile ci -p payload-gateway"
  cargo build --profile ci -p payload-gateway
fi

export PGW_GATEWAY_BIN="${PGW_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/ci/payload-gateway}"
stage "pytest (gateway: $PGW_GATEWAY_BIN)"
status=0
"$TOOLS_DIR/venv/bin/python" -m pytest tests -p no:cacheprovider -ra --timeout=300 --durations=20 "$@" || status=$?
stage "done (exit $status)"
exit "$status"
