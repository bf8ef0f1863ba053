#!/usr/bin/env python3
"""Large-artifact pipeline benchmark (BENCHMARKS.md, section "Large artifacts", issue 24).

A workflow of three activities (extract -> transform -> load) passing `--mib` MiB of random
(incompressible) bytes, the Python SDK's worker and client in this process
(`max_concurrent_activities=1`), against one Temporal dev server and one s3s-fs started here:

  gateway   client + worker through the gateway: zstd + AES-256-GCM, offload to s3s-fs with its
            S3 driver over `--threshold` (the configuration of tests/test_features_serverless.py);
            a fresh gateway per run, so its VmHWM is the run's peak RSS;
  sdk       straight to the server with the SDK doing it in process: ExternalStorage +
            S3StorageDriver (aioboto3) on the same s3s-fs, plus the zstd + AES-256-GCM codec of
            tests/sdk_codec.py (the gateway's format). The SDK's aioboto3 wrapper uploads with
            `upload_fileobj`, which goes multipart past 8 MiB; s3s-fs names a multipart upload's
            metadata file after base64(key) plus the upload id, which passes the 255-byte file
            name limit with the SDK's keys (InternalError), so here the wrapper sends one
            PutObject, as the gateway's S3 driver does.

Each mode runs with the client's gRPC compression on (`gzip`, the SDK's default) and off
(`none`, `Client.connect(grpc_compression=GrpcCompression.NONE)`). Rounds rotate the order.
Reported per run: wall time of the workflow (start request to result), the gateway's peak RSS
(VmHWM) and its CPU, and the result is checked (length and SHA-256 of the transformed artifact).

    ~/.cache/payload-gateway/venv/bin/python scripts/bench-pipeline.py [--rounds 2] [--mib 48]

Needs PGW_GATEWAY_BIN (or target/$PGW_PROFILE/payload-gateway), the venv and s3s-fs from
scripts/setup.sh. `--gateway-bin label=path,...` compares several gateway builds in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if "PGW_GATEWAY_BIN" not in os.environ:
    os.environ["PGW_GATEWAY_BIN"] = str(REPO / "target" / os.environ.get("PGW_PROFILE", "release") / "payload-gateway")
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import rig  # noqa: E402
from sdk_codec import SdkCodec  # noqa: E402
from temporalio import activity, workflow  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.converter import DataConverter, ExternalStorage  # noqa: E402
from temporalio.service import GrpcCompression  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

KEY = bytes(range(32))
BUCKET = "pgw"
SIZE = 48 * 1024 * 1024


def artifact(seed: str) -> bytes:
    return random.Random(seed).randbytes(SIZE)


@activity.defn
async def extract(seed: str) -> bytes:
    return artifact(seed)


@activity.defn
async def transform(data: bytes) -> bytes:
    assert len(data) == SIZE
    return hashlib.sha256(data).digest() + data[32:]


@activity.defn
async def load(data: bytes) -> dict:
    return {"len": len(data), "sha": hashlib.sha256(data).hexdigest()}


@workflow.defn
class ArtifactPipeline:
    @workflow.run
    async def run(self, seed: str) -> dict:
        opts = {"start_to_close_timeout": timedelta(seconds=300)}
        a = await workflow.execute_activity(extract, seed, **opts)
        b = await workflow.execute_activity(transform, a, **opts)
        return await workflow.execute_activity(load, b, **opts)


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


async def sdk_converter(s3: "rig.S3Server", threshold: int, stack: AsyncExitStack) -> DataConverter:
    import aioboto3
    from botocore.config import Config as BotoConfig
    from temporalio.contrib.aws.s3driver import S3StorageDriver
    from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client

    client = await stack.enter_async_context(aioboto3.Session().client(
        "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required")))
    wrapped = new_aioboto3_client(client)

    class SinglePut(type(wrapped)):  # one PutObject, as the gateway's driver does (see the docstring)
        async def put_object(self, *, bucket: str, key: str, data: bytes) -> None:
            await self._client.put_object(Bucket=bucket, Key=key, Body=data)

    wrapped.__class__ = SinglePut
    storage = ExternalStorage(drivers=[S3StorageDriver(client=wrapped, bucket=BUCKET)],
                              payload_size_threshold=threshold)
    return dataclasses.replace(DataConverter.default, payload_codec=SdkCodec({"k1": KEY}, active="k1"),
                               external_storage=storage)


async def run_pipeline(address: str, converter: DataConverter, compression: GrpcCompression) -> float:
    client = await Client.connect(address, data_converter=converter, grpc_compression=compression)
    tq = f"pipe-{uuid.uuid4().hex[:6]}"
    seed = uuid.uuid4().hex
    src = artifact(seed)
    want = hashlib.sha256(hashlib.sha256(src).digest() + src[32:]).hexdigest()
    del src
    async with Worker(client, task_queue=tq, workflows=[ArtifactPipeline], activities=[extract, transform, load],
                      workflow_runner=UnsandboxedWorkflowRunner(), disable_payload_error_limit=True,
                      max_concurrent_activities=1,
                      # no deadlock detector: on a busy machine decoding 2 x 48 MiB in the
                      # workflow activation can exceed its 2 s and fail the task over and over
                      debug_mode=True):
        t0 = time.perf_counter()
        out = await client.execute_workflow(ArtifactPipeline.run, seed, id=f"p-{uuid.uuid4().hex[:8]}",
                                            task_queue=tq, execution_timeout=timedelta(seconds=600),
                                            # a busy machine takes > 10 s (the default) for a
                                            # task that fetches 2 x 48 MiB: its retry would get
                                            # the full history
                                            task_timeout=timedelta(seconds=60))
        elapsed = time.perf_counter() - t0
    assert out == {"len": SIZE, "sha": want}, out
    return elapsed


def main() -> int:
    global SIZE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--threshold", type=int, default=256 * 1024)
    ap.add_argument("--modes", default="gateway,sdk")
    ap.add_argument("--compression", default="gzip,none")
    ap.add_argument("--gateway-bin", default="", help="label=path,... (default: gateway=$PGW_GATEWAY_BIN)")
    ap.add_argument("--out", default="benches/results/pipeline.json")
    args = ap.parse_args()
    SIZE = args.mib * 1024 * 1024
    bins = dict(kv.split("=", 1) for kv in args.gateway_bin.split(",") if kv) or \
        {"gateway": os.environ["PGW_GATEWAY_BIN"]}
    comps = {"gzip": GrpcCompression.GZIP, "none": GrpcCompression.NONE}
    rig.install_cleanup_handlers()
    from features import gateway_config, s3_env  # noqa: E402
    work = Path(tempfile.mkdtemp(prefix="pgw-pipe-"))
    started: list = []
    results: list[dict] = []
    failures: list[str] = []
    try:
        server = rig.TemporalServer(work / "temporal").start()
        started.append(server)
        s3 = rig.S3Server(work / "s3")
        s3.make_bucket(BUCKET)
        started.append(s3.start())
        runs = []
        for mode in args.modes.split(","):
            for comp in args.compression.split(","):
                if mode == "sdk":
                    runs.append(("sdk", None, comp))
                else:
                    runs.extend((label, path, comp) for label, path in bins.items())
        n = 0
        for r in range(args.rounds):
            order = runs if r % 2 == 0 else list(reversed(runs))
            for label, path, comp in order:
                n += 1
                row = {"round": r + 1, "mode": label, "compression": comp}
                gw = None
                try:
                    if path is None:
                        async def go():
                            async with AsyncExitStack() as stack:
                                conv = await sdk_converter(s3, args.threshold, stack)
                                return await run_pipeline(server.address, conv, comps[comp])
                        row["wall_s"] = asyncio.run(go())
                    else:
                        os.environ["PGW_GATEWAY_BIN"] = path
                        gw = rig.Gateway(work / f"gw{n}", server.address, name=f"gw-{label}", extra_env=s3_env(s3))
                        gw.configure(gateway_config(gw, s3, threshold=args.threshold))
                        gw.start()
                        started.append(gw)
                        c0 = cpu_secs(gw.proc.pid)
                        peak_rss = [0]
                        stop = threading.Event()

                        def sample(pid=gw.proc.pid):
                            while not stop.is_set():
                                try:
                                    peak_rss[0] = max(peak_rss[0], vm_kib(pid, "VmRSS"))
                                except Exception:
                                    return
                                time.sleep(0.05)
                        t = threading.Thread(target=sample, daemon=True)
                        t.start()
                        row["wall_s"] = asyncio.run(run_pipeline(gw.address, DataConverter.default, comps[comp]))
                        stop.set()
                        t.join()
                        row["gw_cpu_s"] = cpu_secs(gw.proc.pid) - c0
                        row["gw_hwm_mib"] = vm_kib(gw.proc.pid, "VmHWM") / 1024
                        row["gw_rss_after_mib"] = vm_kib(gw.proc.pid, "VmRSS") / 1024
                        row["binary"] = path
                except Exception as e:  # keep the other runs' figures; report the failure
                    failures.append(f"round {r + 1} {label} {comp}: {type(e).__name__}: {e}")
                    print(f"FAILED {row}: {e}", file=sys.stderr, flush=True)
                    if gw is not None:
                        print(gw.describe(), file=sys.stderr)
                    continue
                finally:
                    if gw is not None:
                        gw.stop()
                        started.remove(gw)
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for p in reversed(started):
            try:
                p.stop()
            except Exception:
                pass
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mib": args.mib, "threshold": args.threshold, "runs": results,
                               "failures": failures}, indent=1))
    print(f"\n| mode | client compression | wall s (runs) | median | gateway peak RSS MiB (runs) | gateway CPU s |")
    print("| --- | --- | --- | --- | --- | --- |")
    keys = []
    for row in results:
        if (row["mode"], row["compression"]) not in keys:
            keys.append((row["mode"], row["compression"]))
    for mode, comp in keys:
        rs = [x for x in results if x["mode"] == mode and x["compression"] == comp]
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in rs)
        hwm = ", ".join(f"{x['gw_hwm_mib']:.0f}" for x in rs if "gw_hwm_mib" in x) or "—"
        cpu = ", ".join(f"{x['gw_cpu_s']:.1f}" for x in rs if "gw_cpu_s" in x) or "—"
        print(f"| {mode} | {comp} | {walls} | {statistics.median(x['wall_s'] for x in rs):.1f} | {hwm} | {cpu} |")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
