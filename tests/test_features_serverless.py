"""Serverless-style workers and large artifacts through a gateway with encryption, compression
and offload to s3s-fs.

- 20 times in a row: start a gateway, start a worker through it, process a workflow (workflow
  task + activity), stop both. The gateway's start-to-ready time (process spawn until it accepts
  TCP, and until the first gRPC call through it succeeds; tight poll loops) is printed; the median
  is recorded in BENCHMARKS.md ("Start-up"). Not asserted.
- A pipeline of three activities passing 50 MB random (incompressible) artifacts: offload moves
  them to the bucket, the server's history stays under 200 KB; the gateway's peak RSS (VmHWM) is
  printed and recorded in BENCHMARKS.md ("Large artifacts")."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import statistics
import time
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.api.workflowservice.v1 import service_pb2_grpc
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from features import MARKER, assert_no_plaintext, bucket_objects, full_gateway, gateway_config, s3_env, server_history, uid

# ----------------------------------------------------------------------------- serverless


@activity.defn
async def greet(name: str) -> str:
    return f"{MARKER} hello {name}"


@workflow.defn
class ServerlessWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(greet, name, start_to_close_timeout=timedelta(seconds=30))


def start_timed(gw: rig.Gateway) -> tuple[float, float]:
    """Spawn the gateway; return (ms until TCP accept, ms until the first gRPC call succeeds)."""
    import grpc

    env = dict(os.environ)
    env.update(gw.extra_env)
    t0 = time.perf_counter()
    gw.proc = rig.ManagedProcess(gw.name, [str(rig.gateway_bin()), "--config", str(gw.config_path)],
                                 gw.workdir / f"{gw.config_path.stem}.log", env=env, cwd=gw.workdir)
    deadline = t0 + 10
    import socket
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", gw.port))
            break
        except OSError:
            if time.perf_counter() > deadline or not gw.proc.alive():
                raise RuntimeError(f"gateway not accepting\n{gw.describe()}")
            time.sleep(0.0002)
        finally:
            s.close()
    t_tcp = time.perf_counter() - t0
    with grpc.insecure_channel(gw.address) as ch:
        stub = service_pb2_grpc.WorkflowServiceStub(ch)
        while True:
            try:
                stub.GetSystemInfo(GetSystemInfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.0002)
    t_rpc = time.perf_counter() - t0
    return t_tcp * 1000, t_rpc * 1000


def test_serverless_20_gateway_and_worker_cold_starts(temporal_server, gateway_factory, s3_server):
    tcp_ms, rpc_ms, cycle_ms = [], [], []
    for i in range(20):
        c0 = time.perf_counter()
        gw = gateway_factory(temporal_server.address, config={}, start=False, name=f"gw-cold{i}", extra_env=s3_env(s3_server))
        gw.configure(gateway_config(gw, s3_server))
        t_tcp, t_rpc = start_timed(gw)
        tcp_ms.append(t_tcp)
        rpc_ms.append(t_rpc)

        async def one():
            client = await Client.connect(gw.address)
            tq = uid("serverless")
            async with Worker(client, task_queue=tq, workflows=[ServerlessWorkflow], activities=[greet],
                              workflow_runner=UnsandboxedWorkflowRunner()):
                wf_id = uid(f"serverless-{i}")
                return wf_id, await client.execute_workflow(ServerlessWorkflow.run, f"run {i}", id=wf_id, task_queue=tq)

        wf_id, out = asyncio.run(one())
        assert out == f"{MARKER} hello run {i}"
        assert gw.stop() == 0, gw.describe()
        cycle_ms.append((time.perf_counter() - c0) * 1000)
        if i == 0:
            assert_no_plaintext(asyncio.run(server_history(temporal_server.address, wf_id)), [MARKER.encode()])
    med = statistics.median
    print(f"\nserverless cold start x20: gateway spawn->TCP accept median {med(tcp_ms):.1f} ms "
          f"(min {min(tcp_ms):.1f}, max {max(tcp_ms):.1f}); spawn->first gRPC OK median {med(rpc_ms):.1f} ms "
          f"(min {min(rpc_ms):.1f}, max {max(rpc_ms):.1f}); full cycle (gateway+worker+workflow+exit) "
          f"median {med(cycle_ms):.0f} ms")


# ----------------------------------------------------------------------------- large artifacts

SIZE = 50 * 1024 * 1024


def artifact(seed: str) -> bytes:
    return MARKER.encode() + random.Random(seed).randbytes(SIZE - len(MARKER))


@activity.defn
async def extract(seed: str) -> bytes:
    return artifact(seed)


@activity.defn
async def transform(data: bytes) -> bytes:
    assert len(data) == SIZE
    # a new 50 MB artifact (different hash), still incompressible
    return MARKER.encode() + hashlib.sha256(data).digest() + data[len(MARKER) + 32:]


@activity.defn
async def load(data: bytes) -> dict:
    return {"len": len(data), "sha": hashlib.sha256(data).hexdigest()}


@workflow.defn
class ArtifactPipeline:
    @workflow.run
    async def run(self, seed: str) -> dict:
        opts = {"start_to_close_timeout": timedelta(seconds=120)}
        a = await workflow.execute_activity(extract, seed, **opts)
        b = await workflow.execute_activity(transform, a, **opts)
        return await workflow.execute_activity(load, b, **opts)


def vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def test_large_artifacts_pipeline_50mb(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server, threshold=256 * 1024)
    tq, wf_id, seed = uid("artifacts"), uid("artifacts-wf"), "artifact-seed"
    src = artifact(seed)
    transformed = MARKER.encode() + hashlib.sha256(src).digest() + src[len(MARKER) + 32:]

    async def run():
        client = await Client.connect(gw.address)
        async with Worker(client, task_queue=tq, workflows=[ArtifactPipeline], activities=[extract, transform, load],
                          workflow_runner=UnsandboxedWorkflowRunner(),
                          max_concurrent_activities=1):
            t0 = time.perf_counter()
            out = await client.execute_workflow(ArtifactPipeline.run, seed, id=wf_id, task_queue=tq,
                                                execution_timeout=timedelta(seconds=240))
            return out, time.perf_counter() - t0

    out, elapsed = asyncio.run(run())
    assert out == {"len": SIZE, "sha": hashlib.sha256(transformed).hexdigest()}
    hwm = vm_hwm_kib(gw.proc.pid)
    history = asyncio.run(server_history(temporal_server.address, wf_id))
    stats = assert_no_plaintext(history, [MARKER.encode()])
    assert stats["bytes"] < 200 * 1024, stats
    assert stats["refs"] >= 4, stats  # two activity results, two activity inputs
    big = [p for p in bucket_objects(s3_server) if p.stat().st_size > SIZE]
    assert len(big) >= 4, [p.stat().st_size for p in bucket_objects(s3_server)]
    for p in big:  # ciphertext only (checking the first and last MiB keeps this quick)
        with open(p, "rb") as f:
            head = f.read(1 << 20)
            f.seek(-(1 << 20), os.SEEK_END)
            tail = f.read()
        assert MARKER.encode() not in head + tail and b"binary/encrypted" in head
    print(f"\nlarge artifacts: 3 activities x 50 MiB in {elapsed:.1f} s; history {stats['bytes']} bytes, "
          f"{stats['refs']} references; {len(big)} objects > 50 MiB in the bucket; gateway peak RSS (VmHWM) "
          f"{hwm / 1024:.0f} MiB")
