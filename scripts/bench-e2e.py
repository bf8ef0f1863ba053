#!/usr/bin/env python3
"""End-to-end benchmark (BENCHMARKS.md, section "End to end").

The same small workflow load with the official Python SDK, three ways, against one Temporal
dev server started here on a free loopback port:

  direct       client + worker straight to the server, no codec;
  sdk-codec    straight to the server with an in-process zstd + AES-256-GCM PayloadCodec
               (tests/sdk_codec.py, the gateway's wire format);
  gateway      client + worker through the gateway (zstd + AES-256-GCM, default settings).

Each mode runs N workflows (default 200; one activity each, ~1 KiB JSON-like input, the
result echoed back), `--concurrency` in flight at a time, bounded by `--timeout` seconds.
Reported: workflows per second (wall clock), CPU seconds of this Python process (the SDK
client + worker, from /proc/self/stat) per workflow, and of the gateway process in gateway mode.
Rounds alternate the modes so drift on a shared machine hits all of them.

    ~/.cache/payload-gateway/venv/bin/python scripts/bench-e2e.py [--workflows 200] [--rounds 2]

Needs the release gateway (cargo build --release -p payload-gateway; PGW_GATEWAY_BIN overrides)
and the venv from scripts/setup.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import rig  # noqa: E402
from sdk_codec import SdkCodec  # noqa: E402
from temporalio import activity, workflow  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.converter import DataConverter  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

KEY = bytes(range(32))


@activity.defn
async def enrich(order: dict) -> dict:
    return {**order, "checked": True}


@workflow.defn
class OrderWorkflow:
    @workflow.run
    async def run(self, order: dict) -> dict:
        return await workflow.execute_activity(enrich, order, start_to_close_timeout=timedelta(seconds=30))


def order(i: int) -> dict:
    rnd = random.Random(i)
    words = ["alpha", "delivery", "invoice", "pending", "shipped", "customer", "warehouse", "express"]
    return {
        "id": uuid.UUID(int=rnd.getrandbits(128)).hex,
        "lines": [{"sku": f"SKU-{rnd.randrange(10**6):06d}", "qty": rnd.randrange(1, 9),
                   "price": round(rnd.random() * 100, 2), "note": " ".join(rnd.choices(words, k=3))}
                  for _ in range(8)],
    }


def cpu_secs(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_mode(address: str, converter: DataConverter, n: int, concurrency: int, timeout: float,
                   gw_pid: int | None) -> dict:
    client = await Client.connect(address, data_converter=converter)
    tq = f"bench-e2e-{uuid.uuid4().hex[:8]}"
    inputs = [order(i) for i in range(n)]
    async with Worker(client, task_queue=tq, workflows=[OrderWorkflow], activities=[enrich],
                      workflow_runner=UnsandboxedWorkflowRunner(), max_concurrent_workflow_tasks=concurrency,
                      max_concurrent_activities=concurrency):
        # one warm-up workflow (connections, codec, caches)
        await client.execute_workflow(OrderWorkflow.run, inputs[0], id=f"{tq}-warm", task_queue=tq)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                out = await client.execute_workflow(OrderWorkflow.run, inputs[i], id=f"{tq}-{i}", task_queue=tq)
                assert out == {**inputs[i], "checked": True}

        cpu0, gw0, t0 = cpu_secs(), (cpu_secs(gw_pid) if gw_pid else 0.0), time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
        wall = time.monotonic() - t0
        cpu, gw = cpu_secs() - cpu0, (cpu_secs(gw_pid) - gw0 if gw_pid else None)
        # after the timed part: task timeouts in the histories (lost or late tasks)
        timeouts = 0
        for i in range(n):
            hist = await client.get_workflow_handle(f"{tq}-{i}").fetch_history()
            timeouts += sum(1 for e in hist.events if "TIMED_OUT" in EventType.Name(e.event_type))
    return {"wf_per_s": n / wall, "wall_s": wall, "sdk_cpu_ms_per_wf": 1e3 * cpu / n,
            "gw_cpu_ms_per_wf": (1e3 * gw / n) if gw is not None else None, "task_timeouts": timeouts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflows", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound per mode and round, seconds")
    ap.add_argument("--modes", default="direct,sdk-codec,gateway", help="comma-separated subset")
    ap.add_argument("--out", default="benches/results/e2e.json")
    args = ap.parse_args()
    rig.install_cleanup_handlers()
    work = Path(tempfile.mkdtemp(prefix="pgw-e2e-"))
    server = rig.TemporalServer(work / "temporal").start()
    gw = rig.Gateway(work / "gw", server.address, extra_env={"PGW_E2E_KEY": base64.b64encode(KEY).decode()})
    gw.config = {
        "proxy": {"listen": f"127.0.0.1:{gw.port}", "upstream": server.address},
        "codec_server": {"listen": f"127.0.0.1:{gw.codec_port}"},
        "admin": {"listen": f"127.0.0.1:{gw.admin_port}"},
        "encryption": {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_E2E_KEY"}]},
        "compression": {"enabled": True},
    }
    gw.config_path.write_text(rig.render_toml(gw.config))
    gw.start()
    plain = DataConverter.default
    codec = dataclasses.replace(DataConverter.default, payload_codec=SdkCodec({"k1": KEY}, active="k1"))
    modes = {
        "direct": (server.address, plain, None),
        "sdk-codec": (server.address, codec, None),
        "gateway": (gw.address, plain, gw.proc.pid),
    }
    modes = {m: modes[m] for m in args.modes.split(",")}
    failures: list[str] = []
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for r in range(args.rounds):
            order_ = list(modes) if r % 2 == 0 else list(reversed(modes))
            for m in order_:
                addr, conv, pid = modes[m]
                try:
                    res = asyncio.run(run_mode(addr, conv, args.workflows, args.concurrency, args.timeout, pid))
                except Exception as e:  # keep the other modes' figures; report the failure
                    failures.append(f"round {r + 1} {m}: {type(e).__name__}: {e}")
                    print(f"round {r + 1} {m:10} FAILED: {e}", file=sys.stderr, flush=True)
                    continue
                results[m].append(res)
                print(f"round {r + 1} {m:10} {res['wf_per_s']:6.1f} wf/s  SDK CPU {res['sdk_cpu_ms_per_wf']:5.2f} ms/wf"
                      + f"  task timeouts {res['task_timeouts']}"
                      + (f"  gateway CPU {res['gw_cpu_ms_per_wf']:5.2f} ms/wf" if res["gw_cpu_ms_per_wf"] is not None else ""),
                      file=sys.stderr, flush=True)
    finally:
        gw.stop()
        server.stop()
    base = statistics.median(x["wf_per_s"] for x in results[next(iter(results))])
    print(f"\n| mode | workflows/s (median of {args.rounds}) | vs direct | SDK process CPU / workflow | gateway CPU / workflow |")
    print("| --- | --- | --- | --- | --- |")
    for f in failures:
        print(f"failed: {f}")
    for m, rs in results.items():
        if not rs:
            continue
        wps = statistics.median(x["wf_per_s"] for x in rs)
        cpu = statistics.median(x["sdk_cpu_ms_per_wf"] for x in rs)
        g = [x["gw_cpu_ms_per_wf"] for x in rs if x["gw_cpu_ms_per_wf"] is not None]
        print(f"| {m} | {wps:.1f} | {100 * wps / base:.0f} % | {cpu:.2f} ms | {statistics.median(g):.2f} ms |" if g
              else f"| {m} | {wps:.1f} | {100 * wps / base:.0f} % | {cpu:.2f} ms | — |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workflows": args.workflows, "concurrency": args.concurrency,
                                          "results": results, "failures": failures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
