#!/usr/bin/env python3
"""Key-service calls per 1,000 RPCs with envelope encryption (BENCHMARKS.md, section
"Envelope encryption").

Starts, on free loopback ports, a Temporal dev server, the reference gRPC KMSService
(tests/kms_sidecar.py: a real key service holding the KEK, which logs every call) and the gateway
binary with one envelope key on that KEK (`kms = "grpc://side"`, zstd on, storage off). Then, per
`dek_rotation_s` value (default 3600 and 2), a fresh gateway serves `--rpcs` RPCs from the
Python SDK's raw WorkflowService client, `--concurrency` in flight, in pairs:
StartWorkflowExecution (one ~1 KiB input payload: the gateway encrypts it) and
GetWorkflowExecutionHistory of that workflow (the gateway decrypts the same payload on the way
back). Before the timed phase one pair warms up (connections, first data key); it is not counted.

Counted over the timed phase: key-service calls at the sidecar (its per-call log lines, by method:
Encrypt = wrap of a new data key, Decrypt = unwrap) and in the gateway's own
`pgw_kms_calls_total` metric (admin endpoint), reported per 1,000 RPCs with the phase's
duration (with short rotation, calls grow with time, not with RPCs).

    ~/.cache/payload-gateway/venv/bin/python scripts/bench-kms-calls.py [--rpcs 2000] [--rotations 3600,2]

Needs the gateway binary (PGW_GATEWAY_BIN, else target/release/payload-gateway) and the venv
from scripts/setup.sh. Everything started here is stopped at the end, also on error or signal
(tests/rig.py's process registry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rig  # noqa: E402
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution, WorkflowType  # noqa: E402
from temporalio.api.taskqueue.v1 import TaskQueue  # noqa: E402
from temporalio.api.workflowservice.v1 import (  # noqa: E402
    GetWorkflowExecutionHistoryRequest,
    StartWorkflowExecutionRequest,
)
from temporalio.client import Client  # noqa: E402

NAMESPACE = "default"
KEK_ID = "bench-kek"
MARKER = b"PGW-BENCH-KMS-CALLS"
METRIC = re.compile(r'^pgw_kms_calls_total\{([^}]*)\} (\d+)', re.M)


class Sidecar:
    """tests/kms_sidecar.py on a free loopback port; every call is one log line."""

    def __init__(self, workdir: Path):
        self.port = rig.free_port()
        self.proc = rig.ManagedProcess(
            "kms-sidecar",
            [sys.executable, str(ROOT / "tests" / "kms_sidecar.py"), "--listen", f"127.0.0.1:{self.port}",
             "--key-file", str(workdir / "kek.bin")],
            workdir / "sidecar.log",
        )
        rig.wait_until(lambda: f"listening on 127.0.0.1:{self.port}" in self.proc.output(), 30,
                       what="kms sidecar listening")

    def calls(self) -> dict[str, int]:
        out = self.proc.output()
        return {m: len(re.findall(rf"^kms-sidecar: {m} .* OK$", out, re.M)) for m in ("Encrypt", "Decrypt")}

    def failed_calls(self) -> int:
        return sum(1 for line in self.proc.output().splitlines()
                   if line.startswith("kms-sidecar: ") and not line.endswith(" OK"))

    def stop(self) -> None:
        self.proc.stop()


def gateway_metrics(gw: rig.Gateway) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for labels, value in METRIC.findall(text):
        fields = dict(kv.split("=", 1) for kv in labels.split(","))
        out[f'{fields["operation"].strip(chr(34))}/{fields["result"].strip(chr(34))}'] = int(value)
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def input_payload(i: int) -> Payloads:
    body = json.dumps({"marker": MARKER.decode(), "i": i, "lines": [{"sku": f"SKU-{i:06d}-{n}", "qty": n} for n in range(24)]})
    return Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=body.encode())])


async def pair(client: Client, tq: str, i: int) -> int:
    """StartWorkflowExecution + GetWorkflowExecutionHistory of it: 2 RPCs; checks the input
    comes back decrypted."""
    wf_id = f"{tq}-{i}"
    payloads = input_payload(i)
    await client.workflow_service.start_workflow_execution(StartWorkflowExecutionRequest(
        namespace=NAMESPACE, workflow_id=wf_id, workflow_type=WorkflowType(name="KmsCallsBench"),
        task_queue=TaskQueue(name=tq), input=payloads, request_id=uuid.uuid4().hex))
    history = await client.workflow_service.get_workflow_execution_history(GetWorkflowExecutionHistoryRequest(
        namespace=NAMESPACE, execution=WorkflowExecution(workflow_id=wf_id)))
    got = history.history.events[0].workflow_execution_started_event_attributes.input
    assert got == payloads, f"{wf_id}: the input did not come back decrypted: {got}"
    return 2


async def connect_and_warm(address: str) -> tuple[str, Client]:
    client = await Client.connect(address, namespace=NAMESPACE)
    tq = f"kms-calls-{uuid.uuid4().hex[:8]}"
    await pair(client, tq, -1)  # warm-up, not counted
    return tq, client


async def timed(client: Client, tq: str, rpcs: int, concurrency: int) -> tuple[int, float]:
    pairs = (rpcs + 1) // 2
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with sem:
            return await pair(client, tq, i)

    t0 = time.monotonic()
    done = sum(await asyncio.gather(*(one(i) for i in range(pairs))))
    return done, time.monotonic() - t0


def gateway_config(gw: rig.Gateway, sidecar: Sidecar, rotation_s: int) -> dict:
    return {
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": KEK_ID, "keys": [{"id": KEK_ID, "kms": "grpc://side"}],
                       "dek_rotation_s": rotation_s},
        "kms_servers.side": {"address": f"127.0.0.1:{sidecar.port}", "tls": False},
        "compression": {"enabled": True},
        "storage": {"enabled": False},
    }


def measure(workdir: Path, server: rig.TemporalServer, sidecar: Sidecar, rotation_s: int, rpcs: int,
            concurrency: int) -> dict:
    gw = rig.Gateway(workdir, server.address, config={}, name=f"gateway-rot{rotation_s}")
    gw.configure(gateway_config(gw, sidecar, rotation_s)).start()
    try:
        loop = asyncio.new_event_loop()
        tq, client = loop.run_until_complete(connect_and_warm(gw.address))
        side0, metrics0 = sidecar.calls(), gateway_metrics(gw)
        done, seconds = loop.run_until_complete(timed(client, tq, rpcs, concurrency))
        side, metrics = diff(sidecar.calls(), side0), diff(gateway_metrics(gw), metrics0)
        loop.close()
    finally:
        gw.stop()
    side_total = sum(side.values())
    return {
        "dek_rotation_s": rotation_s, "rpcs": done, "seconds": round(seconds, 2),
        "rpc_per_s": round(done / seconds, 1),
        "sidecar_calls": side, "gateway_metric_calls": metrics,
        "sidecar_calls_per_1000_rpcs": round(1000 * side_total / done, 2),
        "metric_calls_per_1000_rpcs": round(1000 * sum(metrics.values()) / done, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpcs", type=int, default=2000, help="RPCs per rotation setting (timed phase)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rotations", default="3600,2", help="comma-separated dek_rotation_s values")
    ap.add_argument("--out", default="benches/results/kms-calls.json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="pgw-kms-calls-") as tmp:
        workdir = Path(tmp)
        server = rig.TemporalServer(workdir / "temporal").start()
        sidecar = Sidecar(workdir)
        try:
            for rotation in (int(r) for r in args.rotations.split(",")):
                result = measure(workdir, server, sidecar, rotation, args.rpcs, args.concurrency)
                print(json.dumps(result), flush=True)
                results.append(result)
            if sidecar.failed_calls():
                print(f"WARNING: {sidecar.failed_calls()} failed key-service calls", file=sys.stderr)
        finally:
            sidecar.stop()
            server.stop()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"| dek_rotation_s | RPCs | duration | rpc/s | KEK calls at the sidecar (Encrypt/Decrypt) "
          f"| per 1,000 RPCs | pgw_kms_calls_total | per 1,000 RPCs |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = r["sidecar_calls"]
        print(f'| {r["dek_rotation_s"]} | {r["rpcs"]} | {r["seconds"]} s | {r["rpc_per_s"]} | '
              f'{s.get("Encrypt", 0)}/{s.get("Decrypt", 0)} | {r["sidecar_calls_per_1000_rpcs"]} | '
              f'{r["gateway_metric_calls"]} | {r["metric_calls_per_1000_rpcs"]} |')
    return 0


if __name__ == "__main__":
    sys.exit(main())
