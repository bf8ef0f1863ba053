"""Operations: Prometheus metrics, readiness following the upstream, graceful shutdown under load."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from test_encryption import encrypting_gateway


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"no sample {name}{labels} in:\n{text[:3000]}"
    return total


@activity.defn
async def slow_double(x: int) -> int:
    await asyncio.sleep(0.2)
    return 2 * x


@workflow.defn
class StepsWorkflow:
    @workflow.run
    async def run(self, steps: int) -> int:
        total = 0
        for i in range(steps):
            total += await workflow.execute_activity(slow_double, i, start_to_close_timeout=timedelta(seconds=30))
        return total


def test_metrics_after_a_workflow(temporal_server, gateway_factory):
    gw = encrypting_gateway(gateway_factory, temporal_server.address)

    async def run():
        client = await Client.connect(gw.address)
        tq = f"tq-metrics-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=tq, workflows=[StepsWorkflow], activities=[slow_double],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            return await client.execute_workflow(StepsWorkflow.run, 3, id=f"metrics-{tq}", task_queue=tq)

    assert asyncio.run(run()) == 6
    status, text = http_get(f"http://127.0.0.1:{gw.admin_port}/metrics")
    assert status == 200
    assert metric(text, "pgw_rpcs_total", method="WorkflowService/StartWorkflowExecution", code="OK") >= 1
    assert metric(text, "pgw_rpcs_total", method="WorkflowService/RespondActivityTaskCompleted", code="OK") >= 3
    assert metric(text, "pgw_rpc_duration_seconds_count", method="WorkflowService/PollWorkflowTaskQueue") >= 1
    assert metric(text, "pgw_payloads_total", namespace="default", operation="encoded") >= 4
    assert metric(text, "pgw_payloads_total", namespace="default", operation="decoded") >= 4
    assert metric(text, "pgw_payload_bytes_total", direction="encode", side="in") > 0
    assert metric(text, "pgw_encryptions_total", key_id="k1") >= 4
    assert "secret" not in text and "slow_double" not in text.replace("# ", "")  # no payload contents


@activity.defn
async def echo_len(text: str) -> str:
    return f"{len(text)}:{text[-8:]}"


@workflow.defn
class BigInputWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(echo_len, text, start_to_close_timeout=timedelta(seconds=30))


def test_storage_metrics_after_offload(temporal_server, gateway_factory):
    gw = gateway_factory(temporal_server.address, config={}, start=False, name="gw-metrics-storage")
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "dev_key_file": str(gw.workdir / "dev.key")},
        "storage": {"enabled": True, "driver": "local", "threshold": 4096,
                    "drivers": [{"name": "local", "kind": "filesystem", "root": str(gw.workdir / "payloads")}]},
    }).start()
    text = base64.b64encode(os.urandom(96 * 1024)).decode()  # 128 KiB, ~96 KiB after compression

    async def run():
        client = await Client.connect(gw.address)
        tq = f"tq-storage-metrics-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=tq, workflows=[BigInputWorkflow], activities=[echo_len],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            return await client.execute_workflow(BigInputWorkflow.run, text, id=f"sm-{tq}", task_queue=tq)

    assert asyncio.run(run()) == f"{len(text)}:{text[-8:]}"
    _, body = http_get(f"http://127.0.0.1:{gw.admin_port}/metrics")
    assert metric(body, "pgw_payloads_total", namespace="default", operation="offloaded") >= 1
    assert metric(body, "pgw_payloads_total", namespace="default", operation="resolved") >= 2
    assert metric(body, "pgw_storage_duration_seconds_count", driver="local", operation="store") >= 1
    assert metric(body, "pgw_storage_duration_seconds_count", driver="local", operation="retrieve") >= 1
    lookups = metric(body, "pgw_cache_lookups_total")
    assert lookups >= 2 and metric(body, "pgw_cache_lookups_total", result="hit") >= 1, body


def test_readyz_follows_the_upstream(dedicated_temporal_server, gateway_factory):
    gw = gateway_factory(dedicated_temporal_server.address)
    url = f"http://127.0.0.1:{gw.admin_port}/readyz"
    assert http_get(url)[0] == 200
    assert http_get(f"http://127.0.0.1:{gw.admin_port}/healthz")[0] == 200
    dedicated_temporal_server.kill()
    status, body = http_get(url)
    assert status == 503 and dedicated_temporal_server.address in body, body
    dedicated_temporal_server.start()
    rig.wait_until(lambda: http_get(url)[0] == 200, timeout=30, what="/readyz back to 200")


def test_sigterm_under_load_then_a_new_gateway_finishes_the_work(temporal_server, gateway_factory):
    first = encrypting_gateway(gateway_factory, temporal_server.address)
    tag = uuid.uuid4().hex[:8]
    count, steps = 10, 6

    async def run():
        client = await Client.connect(first.address)
        tq = f"tq-drain-{tag}"
        async with Worker(client, task_queue=tq, workflows=[StepsWorkflow], activities=[slow_double],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            handles = [await client.start_workflow(StepsWorkflow.run, steps, id=f"drain-{tag}-{i}", task_queue=tq)
                       for i in range(count)]
            await asyncio.sleep(1.0)  # work in flight: polls waiting, activities running
            t0 = time.monotonic()
            exit_code = await asyncio.to_thread(first.stop, 30)
            stop_seconds = time.monotonic() - t0
            # A new gateway on the same address, same keys: the SDK reconnects by itself.
            second = gateway_factory(temporal_server.address, config={}, start=False, name="gw-second")
            second.port, second.address = first.port, first.address
            second.configure(dict(first.config, admin={"listen": f"127.0.0.1:{second.admin_port}"},
                                  codec_server={"enabled": False}))
            for key_file in first.workdir.glob("*.key"):
                (second.workdir / key_file.name).write_bytes(key_file.read_bytes())
            await asyncio.to_thread(second.start)
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=180)
            return exit_code, stop_seconds, results, second

    exit_code, stop_seconds, results, second = asyncio.run(run())
    assert exit_code == 0, first.describe()
    assert stop_seconds < 15, f"shutdown took {stop_seconds:.1f}s: long polls were not ended"
    assert results == [sum(2 * i for i in range(steps))] * count
    out = first.output()
    assert "shutdown requested" in out and "stopped" in out, out[-3000:]
    assert "panicked" not in out + second.output()
