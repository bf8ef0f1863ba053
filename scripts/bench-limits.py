#!/usr/bin/env python3
"""The limit rewrite's cost per DescribeNamespace (BENCHMARKS.md, "Drop in: limits and message fit").

Starts a Temporal dev server and two gateways on it with the same config (zstd + AES-256-GCM,
offload to the filesystem driver), one with `[storage.server_limits] advertise = true` (the
default: the answer's limits are rewritten) and one with `advertise = false` (the answer is
forwarded as the server sent it: the plain path). The Python SDK's client calls
DescribeNamespace `--calls` times on one connection through each, interleaved in `--rounds`
rounds, plus straight to the server as the floor; reports the median latency per call and the
gateways' CPU per 1,000 calls (from /proc); each round starts with another way, and checks what each returned (the advertised
limits differ from the server's, the plain ones are the server's).

    ~/.cache/payload-gateway/venv/bin/python scripts/bench-limits.py [--calls 2000 --rounds 3]

Needs the gateway binary: target/$PGW_PROFILE/payload-gateway (PGW_PROFILE defaults to
`release`; `ci` uses target/ci), or PGW_GATEWAY_BIN; and the venv from scripts/setup.sh.
Everything started here is stopped on exit, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if "PGW_GATEWAY_BIN" not in os.environ:
    os.environ["PGW_GATEWAY_BIN"] = str(REPO / "target" / os.environ.get("PGW_PROFILE", "release") / "payload-gateway")
sys.path.insert(0, str(REPO / "tests"))

import rig  # noqa: E402
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest  # noqa: E402
from temporalio.client import Client  # noqa: E402

KEY = bytes(range(32))


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway(work: Path, upstream: str, name: str, advertise: bool) -> rig.Gateway:
    gw = rig.Gateway(work / name, upstream, name=name, extra_env={"PGW_BENCH_KEY": base64.b64encode(KEY).decode()})
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_BENCH_KEY"}]},
        "compression": {"enabled": True},
        "storage": {"enabled": True, "driver": "local", "threshold": 262144,
                    "drivers": [{"name": "local", "kind": "filesystem", "root": str(work / name / "payloads")}],
                    "server_limits": {"advertise": advertise}},
    })
    return gw.start()


async def measure(address: str, calls: int) -> tuple[list[float], object]:
    client = await Client.connect(address, namespace="default")
    request = DescribeNamespaceRequest(namespace="default")
    answer = await client.workflow_service.describe_namespace(request)  # warm-up
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        answer = await client.workflow_service.describe_namespace(request)
        times.append(time.perf_counter() - t0)
    return times, answer.namespace_info.limits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rig.install_cleanup_handlers()
    work = Path(tempfile.mkdtemp(prefix="pgw-limits-"))
    server = on = off = None
    try:
        # The dev server's per-namespace rate limits would refuse a tight loop of calls.
        server = rig.TemporalServer(work / "temporal", dynamic_config={
            "frontend.namespaceRPS": 100000, "frontend.globalNamespaceRPS": 100000,
            "frontend.rps": 100000}).start()
        on = gateway(work, server.address, "advertise", True)
        off = gateway(work, server.address, "plain", False)
        ways = {"direct": (server.address, None), "gateway, limits forwarded": (off.address, off),
                "gateway, limits rewritten": (on.address, on)}
        times: dict[str, list[float]] = {w: [] for w in ways}
        cpu: dict[str, float] = {w: 0.0 for w in ways}
        limits = {}
        order = list(ways)
        for r in range(args.rounds):
            # Each round in another order, so no way always follows the same one.
            for way in order[r % len(order):] + order[:r % len(order)]:
                address, gw = ways[way]
                before = cpu_secs(gw.proc.pid) if gw else 0.0
                t, limits[way] = asyncio.run(measure(address, args.calls))
                times[way] += t
                if gw:
                    cpu[way] += cpu_secs(gw.proc.pid) - before
    finally:
        for p in (on, off, server):
            if p is not None:
                p.stop()
    assert limits["gateway, limits forwarded"] == limits["direct"], limits
    assert limits["gateway, limits rewritten"].blob_size_limit_error > limits["direct"].blob_size_limit_error
    base = statistics.median(times["gateway, limits forwarded"])
    total = args.calls * args.rounds
    print(f"\nDescribeNamespace, {args.rounds} rounds x {args.calls} calls per way, one connection, sequential:\n")
    print("| way | median latency | vs limits forwarded | gateway CPU per 1,000 calls | blob limit answered |")
    print("|---|---|---|---|---|")
    for way in ways:
        med = statistics.median(times[way])
        per_k = f"{cpu[way] / total * 1000 * 1000:.0f} ms" if way != "direct" else "-"
        print(f"| {way} | {med * 1e6:.0f} µs | {med / base:.2f}x | {per_k} | {limits[way].blob_size_limit_error} |")


if __name__ == "__main__":
    main()
