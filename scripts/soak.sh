#!/usr/bin/env bash
# Soak: N workflows with blobs drawn log-uniformly from 1 B to 20 MB through a gateway with
# encryption, compression and offload to s3s-fs; every result is verified by SHA-256 and the
# server's histories are checked for plaintext (tests/test_reliability.py::test_soak,
# engine in tests/soak.py). Prints workflows, bytes, errors and duration, and the gateway's
# memory: peak (VmHWM) against 3 x the largest total of workflow input in flight at once
# + 64 MiB, and VmRSS every second for 30 s after the load against storage.cache_bytes + 64 MiB
# (the second bound is asserted).
#
#   scripts/soak.sh                 # 1,000 workflows
#   scripts/soak.sh 10000           # the full soak (about 12 GB of workflow input)
#
# Env: PGW_SOAK_CONCURRENCY (8), PGW_SOAK_SEED (1), PGW_SOAK_MAX_BYTES (cap on the total input,
# bytes; default none), PGW_PROFILE (cargo profile to build and run: release, the default, or
# ci), PGW_GATEWAY_BIN (default target/$PGW_PROFILE/payload-gateway, built first).
# Without this script, `pytest tests/test_reliability.py -k soak` runs the CI size: 60 workflows,
# at most 200 MB of input.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGW_SOAK_WORKFLOWS="${1:-${PGW_SOAK_WORKFLOWS:-1000}}"
TOOLS_DIR="${PGW_TOOLS_DIR:-$HOME/.cache/payload-gateway}"
PY="${PGW_PYTHON:-$TOOLS_DIR/venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  bash scripts/setup.sh
fi
PROFILE="${PGW_PROFILE:-release}"
if [[ -z "${PGW_GATEWAY_BIN:-}" ]]; then
  cargo build --profile "$PROFILE" -p payload-gateway
  export PGW_GATEWAY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE/payload-gateway"
fi
timeout_s=$(( 600 + PGW_SOAK_WORKFLOWS * 3 ))
exec "$PY" -m pytest tests/test_reliability.py -k test_soak -p no:cacheprovider -q -s --timeout="$timeout_s"
