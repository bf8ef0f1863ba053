#!/usr/bin/env python3
"""One large gzip-compressed request through the gateway (BENCHMARKS.md, issue 24, "Hash on
arrival and streaming inflate").

A StartWorkflowExecution carrying one `--mib` MiB payload of random (incompressible) bytes,
gzip-compressed once at zlib's default level 6 (what tonic and gRPC core send unless told
otherwise), is sent through a gateway with encryption, compression and offload to s3s-fs (the
configuration of tests/features, threshold 256 KiB) by a raw HTTP/2 client (tests/h2raw.py), so
the client's own compression is not in the timing. The same compressed bytes go to every
gateway build in `--gateway-bin`, alternating, a fresh gateway and a fresh s3s-fs per run (so
the gateway's VmHWM is that request's peak RSS and every run uploads the object); the Temporal
dev server answers every run after the first from its request-id deduplication.

`--config auth`: the gateway checks a static token (`[proxy.auth]`) and nothing else (no codec,
no offload): the ingress still reads and inflates the whole request and forwards it
uncompressed, so its peak is the ingress's own; the dev server refuses the 48 MiB history
blob (any answer is accepted; the status is recorded).

Reported per run: wall time from the first byte sent to the gateway's answer, the gateway's
VmHWM and its RSS before the request, its CPU time over the request.

    PGW_GATEWAY_BIN=... ~/.cache/payload-gateway/venv/bin/python scripts/bench-ingress-gzip.py \\
        --gateway-bin before=/path/a,after=/path/b [--rounds 3] [--mib 48]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import h2raw  # noqa: E402
import rig  # noqa: E402
from temporalio.api.common.v1 import Payload, Payloads, WorkflowType  # noqa: E402
from temporalio.api.taskqueue.v1 import TaskQueue  # noqa: E402
from temporalio.api.workflowservice.v1 import StartWorkflowExecutionRequest  # noqa: E402

PATH = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution"


def vm_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gzip_level6(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--threshold", type=int, default=256 * 1024)
    ap.add_argument("--gateway-bin", required=True, help="label=path,...")
    ap.add_argument("--config", choices=["offload", "auth"], default="offload")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    bins = dict(kv.split("=", 1) for kv in args.gateway_bin.split(",") if kv)
    rig.install_cleanup_handlers()
    from features import gateway_config, s3_env, BUCKET  # noqa: E402

    request = StartWorkflowExecutionRequest(
        namespace="default", workflow_id=f"big-{uuid.uuid4().hex[:8]}", workflow_type=WorkflowType(name="Nobody"),
        task_queue=TaskQueue(name=f"none-{uuid.uuid4().hex[:6]}"), request_id=str(uuid.uuid4()),
        input=Payloads(payloads=[Payload(metadata={"encoding": b"binary/plain"},
                                         data=random.Random(7).randbytes(args.mib << 20))]),
    ).SerializeToString()
    t0 = time.perf_counter()
    compressed = gzip_level6(request)
    print(f"message {len(request)} bytes, gzip level 6 {len(compressed)} bytes "
          f"(compressed in {time.perf_counter() - t0:.1f} s, outside the timing)", flush=True)
    body = h2raw.frame(compressed, compressed=True)
    del request

    work = Path(tempfile.mkdtemp(prefix="pgw-ingress-"))
    started: list = []
    results: list[dict] = []
    try:
        server = rig.TemporalServer(work / "temporal").start()
        started.append(server)
        n = 0
        for r in range(args.rounds):
            order = list(bins.items()) if r % 2 == 0 else list(reversed(bins.items()))
            for label, path in order:
                n += 1
                s3 = rig.S3Server(work / f"s3-{n}")
                s3.make_bucket(BUCKET)
                s3.start()
                started.append(s3)
                os.environ["PGW_GATEWAY_BIN"] = path
                env = {**s3_env(s3), "PGW_B_TOKEN": "bench-token"}
                gw = rig.Gateway(work / f"gw{n}", server.address, name=f"gw-{label}", extra_env=env)
                if args.config == "offload":
                    gw.configure(gateway_config(gw, s3, threshold=args.threshold))
                else:
                    gw.configure({**gw.listener_sections(),
                                  "proxy.auth": {"tokens": [{"env": "PGW_B_TOKEN", "namespaces": ["*"]}]},
                                  "encryption": {"enabled": False}, "compression": {"enabled": False},
                                  "storage": {"enabled": False}})
                gw.start()
                started.append(gw)
                try:
                    pid = gw.proc.pid
                    rss0 = vm_kib(pid, "VmRSS")
                    c0 = cpu_secs(pid)
                    t0 = time.perf_counter()
                    reply = h2raw.call(gw.address, PATH, body, encoding="gzip", timeout=300,
                                       metadata=(("authorization", "Bearer bench-token"),))
                    wall = time.perf_counter() - t0
                    if args.config == "offload":
                        assert reply.grpc_status == 0, f"{label}: {reply} {reply.reset}"
                    assert reply.grpc_status is not None, f"{label}: no answer, reset {reply.reset}"
                    objects = [p for p in (s3.root / BUCKET).rglob("*") if p.is_file()]
                    row = {"round": r + 1, "build": label, "wall_s": wall, "gw_cpu_s": cpu_secs(pid) - c0,
                           "gw_rss_before_mib": rss0 / 1024, "gw_hwm_mib": vm_kib(pid, "VmHWM") / 1024,
                           "objects": len(objects), "status": reply.code, "message": (reply.grpc_message or "")[:160], "binary": path}
                finally:
                    gw.stop()
                    started.remove(gw)
                    s3.stop()
                    started.remove(s3)
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for p in reversed(started):
            try:
                p.stop()
            except Exception:
                pass
    if args.out:
        out = REPO / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"mib": args.mib, "config": args.config, "compressed_bytes": len(compressed),
                                   "runs": results}, indent=1))
    print("\n| build | wall s (runs) | median | gateway peak RSS MiB (runs) | RSS before MiB | gateway CPU s (runs) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in bins:
        rs = [x for x in results if x["build"] == label]
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in rs)
        hwm = ", ".join(f"{x['gw_hwm_mib']:.0f}" for x in rs)
        cpu = ", ".join(f"{x['gw_cpu_s']:.2f}" for x in rs)
        median = statistics.median(x["wall_s"] for x in rs)
        before = statistics.median(x["gw_rss_before_mib"] for x in rs)
        print(f"| {label} | {walls} | {median:.2f} | {hwm} | {before:.0f} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
