#!/usr/bin/env python3
"""End-to-end benchmark (BENCHMARKS.md, section "End to end").

The same small workflow load with the official Python SDK, five ways, against one Temporal
dev server started here on a free loopback port. With the ~1 KiB order:

  direct       client + worker straight to the server, no codec;
  sdk-codec    straight to the server with an in-process zstd + AES-256-GCM PayloadCodec
               (tests/sdk_codec.py, the gateway's wire format);
  gateway      client + worker through the gateway (zstd + AES-256-GCM, default settings).

and, with payloads over an offload threshold (`--offload-payload-bytes`, default 64 KiB of
incompressible JSON, over `--offload-threshold`, default 16 KiB), against one s3s-fs started
here:

  gateway-offload  through a second gateway that also offloads to s3s-fs (storage on, S3 driver);
  sdk-offload      straight to the server with the SDK's own ExternalStorage + S3StorageDriver
                   (aioboto3) on s3s-fs, plus the in-process codec of sdk-codec.

Offload modes check that the history holds references only (the warm-up workflow's raw
history is smaller than one payload) and that the bucket gained at least two objects per
workflow; they also report the CPU of s3s-fs.

Each mode runs N workflows (default 200; one activity each, ~1 KiB JSON-like input, the
result echoed back), `--concurrency` in flight at a time, bounded by `--timeout` seconds.
Reported: workflows per second (wall clock), CPU seconds of this Python process (the SDK
client + worker, from /proc/self/stat) per workflow, of the gateway process in gateway modes
and of s3s-fs in offload modes.
Rounds alternate the modes so drift on a shared machine hits all of them. The table compares
the ~1 KiB modes with direct and the offload pair with sdk-offload; the exit status is 1 when
a mode failed.

    ~/.cache/payload-gateway/venv/bin/python scripts/bench-e2e.py [--workflows 200] [--rounds 2]

Needs the gateway binary: target/$PGW_PROFILE/payload-gateway (PGW_PROFILE defaults to
`release`; `ci` uses target/ci), or PGW_GATEWAY_BIN; the venv and s3s-fs from scripts/setup.sh.
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
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Awaitable, Callable, NamedTuple, Optional

REPO = Path(__file__).resolve().parent.parent
if "PGW_GATEWAY_BIN" not in os.environ:
    os.environ["PGW_GATEWAY_BIN"] = str(REPO / "target" / os.environ.get("PGW_PROFILE", "release") / "payload-gateway")
sys.path.insert(0, str(REPO / "tests"))

import rig  # noqa: E402
from sdk_codec import SdkCodec  # noqa: E402
from temporalio import activity, workflow  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.converter import DataConverter, ExternalStorage  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

KEY = bytes(range(32))
# Short bucket name and workflow ids: s3s-fs keeps an object's attributes in a file named after
# base64(bucket) and base64(key), and the SDK's S3 driver puts the workflow type, id and run id
# into the key, so long ids exceed the file-name limit (255 bytes) and the store fails.
BUCKET = "pgw"


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


def big_order(i: int, size: int) -> dict:
    """`order(i)` with an incompressible attachment (base64 of random bytes) to about `size`
    bytes of JSON, so it stays over the offload threshold after compression."""
    base = order(i)
    room = max(0, size - len(json.dumps(base)) - 20)
    blob = random.Random(-1 - i).randbytes(room * 3 // 4)
    return {**base, "attachment": base64.b64encode(blob).decode()}


class Mode(NamedTuple):
    address: str
    converter: Callable[[AsyncExitStack], Awaitable[DataConverter]]
    pids: dict[str, int]  # other processes whose CPU is reported: "gw", "s3"
    payload_bytes: Optional[int] = None  # None: the ~1 KiB order; else big_order of that size
    s3: Optional["rig.S3Server"] = None  # offload modes: check the history and the bucket
    server: Optional[str] = None  # offload modes: the server's address, to read raw histories


def cpu_secs(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bucket_objects(s3: "rig.S3Server") -> int:
    root = s3.root / BUCKET
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


async def sdk_offload_converter(s3: "rig.S3Server", threshold: int, stack: AsyncExitStack) -> DataConverter:
    """The in-process codec plus the SDK's ExternalStorage with its S3 driver (aioboto3) on s3s-fs,
    as tests/test_offload.py configures it."""
    import aioboto3
    from botocore.config import Config as BotoConfig
    from temporalio.contrib.aws.s3driver import S3StorageDriver
    from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client

    client = await stack.enter_async_context(aioboto3.Session().client(
        "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required")))
    storage = ExternalStorage(drivers=[S3StorageDriver(client=new_aioboto3_client(client), bucket=BUCKET)],
                              payload_size_threshold=threshold)
    return dataclasses.replace(DataConverter.default, payload_codec=SdkCodec({"k1": KEY}, active="k1"),
                               external_storage=storage)


async def run_mode(mode: Mode, n: int, concurrency: int, timeout: float) -> dict:
    async with AsyncExitStack() as stack:
        converter = await mode.converter(stack)
        return await _run_mode(mode, converter, n, concurrency, timeout)


async def _run_mode(mode: Mode, converter: DataConverter, n: int, concurrency: int, timeout: float) -> dict:
    client = await Client.connect(mode.address, data_converter=converter)
    tq = f"e2e-{uuid.uuid4().hex[:6]}"
    make = order if mode.payload_bytes is None else (lambda i: big_order(i, mode.payload_bytes))
    inputs = [make(i) for i in range(n)]
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

        objects0 = bucket_objects(mode.s3) if mode.s3 else 0
        cpu0, others0, t0 = cpu_secs(), {k: cpu_secs(p) for k, p in mode.pids.items()}, time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
        wall = time.monotonic() - t0
        cpu, others = cpu_secs() - cpu0, {k: cpu_secs(p) - others0[k] for k, p in mode.pids.items()}
        if mode.s3 is not None:
            # offloaded: the bucket grew, the history holds references, not the payloads
            grown = bucket_objects(mode.s3) - objects0
            if grown < 2 * n:
                raise AssertionError(f"offload: {grown} new objects in the bucket for {n} workflows")
            raw = await Client.connect(mode.server)  # straight, no converter: the history as stored
            hist = await raw.get_workflow_handle(f"{tq}-warm").fetch_history()
            size = sum(len(e.SerializeToString()) for e in hist.events)
            if size >= mode.payload_bytes:
                raise AssertionError(f"offload: the warm-up history is {size} bytes, payloads not offloaded")
        # after the timed part: task timeouts in the histories (lost or late tasks)
        timeouts = 0
        for i in range(n):
            hist = await client.get_workflow_handle(f"{tq}-{i}").fetch_history()
            timeouts += sum(1 for e in hist.events if "TIMED_OUT" in EventType.Name(e.event_type))
    return {"wf_per_s": n / wall, "wall_s": wall, "sdk_cpu_ms_per_wf": 1e3 * cpu / n,
            "gw_cpu_ms_per_wf": (1e3 * others["gw"] / n) if "gw" in others else None,
            "s3_cpu_ms_per_wf": (1e3 * others["s3"] / n) if "s3" in others else None, "task_timeouts": timeouts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflows", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound per mode and round, seconds")
    ap.add_argument("--modes", default="direct,sdk-codec,gateway,gateway-offload,sdk-offload",
                    help="comma-separated subset")
    ap.add_argument("--offload-payload-bytes", type=int, default=64 * 1024,
                    help="JSON size of the offload modes' workflow input")
    ap.add_argument("--offload-threshold", type=int, default=16 * 1024,
                    help="offload threshold of the gateway and of the SDK's ExternalStorage, bytes")
    ap.add_argument("--out", default="benches/results/e2e.json")
    args = ap.parse_args()
    selected = args.modes.split(",")
    known = {"direct", "sdk-codec", "gateway", "gateway-offload", "sdk-offload"}
    if not set(selected) <= known:
        ap.error(f"unknown modes {sorted(set(selected) - known)}; known: {sorted(known)}")
    rig.install_cleanup_handlers()
    work = Path(tempfile.mkdtemp(prefix="pgw-e2e-"))
    started: list = []  # stopped in reverse order, also on failure
    failures: list[str] = []
    results: dict[str, list[dict]] = {m: [] for m in selected}
    try:
        server = rig.TemporalServer(work / "temporal").start()
        started.append(server)
        key_env = {"PGW_E2E_KEY": base64.b64encode(KEY).decode()}
        encryption = {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_E2E_KEY"}]}
        gw = gw_offload = s3 = None
        if "gateway" in selected:
            gw = rig.Gateway(work / "gw", server.address, extra_env=key_env)
            gw.configure({**gw.listener_sections(codec_server=True), "encryption": encryption,
                          "compression": {"enabled": True}})
            started.append(gw.start())
        if {"gateway-offload", "sdk-offload"} & set(selected):
            s3 = rig.S3Server(work / "s3")
            s3.make_bucket(BUCKET)
            started.append(s3.start())
        if "gateway-offload" in selected:
            gw_offload = rig.Gateway(work / "gw-offload", server.address, name="gateway-offload",
                                     extra_env={**key_env, "AWS_ACCESS_KEY_ID": s3.access_key,
                                                "AWS_SECRET_ACCESS_KEY": s3.secret_key})
            gw_offload.configure({
                **gw_offload.listener_sections(codec_server=True), "encryption": encryption,
                "compression": {"enabled": True},
                "storage": {"enabled": True, "driver": "aws.s3driver", "threshold": args.offload_threshold,
                            "drivers": [{"name": "aws.s3driver", "kind": "s3", "bucket": BUCKET,
                                         "endpoint": s3.endpoint, "region": "us-east-1",
                                         "force_path_style": True, "timeout_ms": 10000}]},
            })
            started.append(gw_offload.start())

        async def plain(_stack: AsyncExitStack) -> DataConverter:
            return DataConverter.default

        async def codec(_stack: AsyncExitStack) -> DataConverter:
            return dataclasses.replace(DataConverter.default, payload_codec=SdkCodec({"k1": KEY}, active="k1"))

        async def sdk_offload(stack: AsyncExitStack) -> DataConverter:
            return await sdk_offload_converter(s3, args.offload_threshold, stack)

        big = args.offload_payload_bytes
        all_modes = {
            "direct": lambda: Mode(server.address, plain, {}),
            "sdk-codec": lambda: Mode(server.address, codec, {}),
            "gateway": lambda: Mode(gw.address, plain, {"gw": gw.proc.pid}),
            "gateway-offload": lambda: Mode(gw_offload.address, plain, {"gw": gw_offload.proc.pid, "s3": s3.proc.pid},
                                            big, s3, server.address),
            "sdk-offload": lambda: Mode(server.address, sdk_offload, {"s3": s3.proc.pid}, big, s3, server.address),
        }
        modes = {m: all_modes[m]() for m in selected}
        for r in range(args.rounds):
            order_ = list(modes) if r % 2 == 0 else list(reversed(modes))
            for m in order_:
                try:
                    res = asyncio.run(run_mode(modes[m], args.workflows, args.concurrency, args.timeout))
                except Exception as e:  # keep the other modes' figures; report the failure
                    failures.append(f"round {r + 1} {m}: {type(e).__name__}: {e}")
                    print(f"round {r + 1} {m:15} FAILED: {e}", file=sys.stderr, flush=True)
                    continue
                results[m].append(res)
                print(f"round {r + 1} {m:15} {res['wf_per_s']:6.1f} wf/s  SDK CPU {res['sdk_cpu_ms_per_wf']:5.2f} ms/wf"
                      + f"  task timeouts {res['task_timeouts']}"
                      + (f"  gateway CPU {res['gw_cpu_ms_per_wf']:5.2f} ms/wf" if res["gw_cpu_ms_per_wf"] is not None else "")
                      + (f"  s3s-fs CPU {res['s3_cpu_ms_per_wf']:5.2f} ms/wf" if res["s3_cpu_ms_per_wf"] is not None else ""),
                      file=sys.stderr, flush=True)
    finally:
        for p in reversed(started):
            p.stop()

    def ms(rs: list[dict], key: str) -> str:
        vals = [x[key] for x in rs if x[key] is not None]
        return f"{statistics.median(vals):.2f} ms" if vals else "—"

    # the ~1 KiB modes against direct, the offload pair against the SDK's own offload
    baselines = {"direct": "direct", "sdk-codec": "direct", "gateway": "direct",
                 "gateway-offload": "sdk-offload", "sdk-offload": "sdk-offload"}
    print(f"\n| mode | workflows/s (median of {args.rounds}) | vs | SDK process CPU / workflow "
          "| gateway CPU / workflow | s3s-fs CPU / workflow |")
    print("| --- | --- | --- | --- | --- | --- |")
    for f in failures:
        print(f"failed: {f}")
    for m, rs in results.items():
        if not rs:
            continue
        wps = statistics.median(x["wf_per_s"] for x in rs)
        base_rs = results.get(baselines[m]) or []
        vs = f"{100 * wps / statistics.median(x['wf_per_s'] for x in base_rs):.0f} % of {baselines[m]}" if base_rs else "—"
        print(f"| {m} | {wps:.1f} | {vs} | {ms(rs, 'sdk_cpu_ms_per_wf')} | {ms(rs, 'gw_cpu_ms_per_wf')} "
              f"| {ms(rs, 's3_cpu_ms_per_wf')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workflows": args.workflows, "concurrency": args.concurrency,
                                          "offload_payload_bytes": args.offload_payload_bytes,
                                          "offload_threshold": args.offload_threshold,
                                          "gateway_bin": os.environ["PGW_GATEWAY_BIN"],
                                          "results": results, "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
