"""Operations: Prometheus metrics, readiness following the upstream, graceful shutdown under load."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta

import grpc
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from test_encryption import encrypting_gateway, encryption_config


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
    # Payload contents that must never reach the metrics: a workflow input and an activity
    # result carry it (asserted below through the results); no id or name does.
    marker = f"PgwPayloadMarker{uuid.uuid4().hex[:8]}"

    async def run():
        client = await Client.connect(gw.address)
        tq = f"tq-metrics-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=tq, workflows=[StepsWorkflow, BigInputWorkflow],
                          activities=[slow_double, echo_len], workflow_runner=UnsandboxedWorkflowRunner()):
            steps = await client.execute_workflow(StepsWorkflow.run, 3, id=f"metrics-{tq}", task_queue=tq)
            echoed = await client.execute_workflow(BigInputWorkflow.run, f"input {marker}", id=f"metrics-echo-{tq}",
                                                   task_queue=tq)
            return steps, echoed

    steps, echoed = asyncio.run(run())
    assert steps == 6
    assert echoed == f"{len(marker) + 6}:{marker[-8:]}"  # the input payload carried the marker
    status, text = http_get(f"http://127.0.0.1:{gw.admin_port}/metrics")
    assert status == 200
    assert metric(text, "pgw_rpcs_total", method="WorkflowService/StartWorkflowExecution", code="OK") >= 1
    assert metric(text, "pgw_rpcs_total", method="WorkflowService/RespondActivityTaskCompleted", code="OK") >= 3
    assert metric(text, "pgw_rpc_duration_seconds_count", method="WorkflowService/PollWorkflowTaskQueue") >= 1
    assert metric(text, "pgw_payloads_total", namespace="default", operation="encoded") >= 4
    assert metric(text, "pgw_payloads_total", namespace="default", operation="decoded") >= 4
    assert metric(text, "pgw_payload_bytes_total", direction="encode", side="in") > 0
    assert metric(text, "pgw_encryptions_total", key_id="k1") >= 4
    assert marker not in text, "payload contents in the metrics"
    assert "slow_double" not in text.replace("# ", "")  # nor activity types (they are in the requests)


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


GRACE_S = 30  # the drain tests' shutdown grace: far longer than any of them may take
HOLD = "/made.up.v1.SlowService/Hold"
PING = "/made.up.v1.SlowService/Ping"
LONG_POLL = "/temporal.api.workflowservice.v1.WorkflowService/PollActivityTaskQueue"


def test_sigterm_drains_in_flight_rpcs_then_exits_at_once(gateway_factory):
    """SIGTERM with an RPC in flight (the upstream holds it `hold` s), a long poll in flight and
    an idle client connection: the listener closes at once, the long poll ends with UNAVAILABLE
    at once, the in-flight RPC runs to completion, and the gateway exits as soon as it has
    completed: seconds, where the grace period alone would take `GRACE_S`."""
    hold = 4.0
    release = threading.Event()  # ends the upstream's waits at teardown
    arrived = {HOLD: threading.Event(), LONG_POLL: threading.Event()}

    def responder(method, request, context):
        if method == PING:
            return request
        arrived[method].set()
        if method == HOLD:
            release.wait(hold)
            return request[::-1]
        while context.is_active() and not release.wait(0.2):  # a poll with no task: until the client leaves
            pass
        return b""

    up = rig.RecordingUpstream(responder=responder).start()
    try:
        gw = gateway_factory(up.address, config={}, start=False, name="gw-drain")
        gw.configure({**gw.listener_sections(), "encryption": {"enabled": False}, "compression": {"enabled": False},
                      "storage": {"enabled": False}})
        gw.config["proxy"]["shutdown_grace_ms"] = GRACE_S * 1000
        gw.configure().start()
        idle, busy, polling = (rig.channel(gw.address) for _ in range(3))
        try:
            assert idle.unary_unary(PING)(b"ping", timeout=10) == b"ping"  # a connection left open, idle
            ended: dict[str, float] = {}
            body = os.urandom(64)
            in_flight = busy.unary_unary(HOLD).future(body, timeout=60)
            in_flight.add_done_callback(lambda _f: ended.setdefault("rpc", time.monotonic()))
            poll = polling.unary_unary(LONG_POLL).future(b"", timeout=60)
            poll.add_done_callback(lambda _f: ended.setdefault("poll", time.monotonic()))
            for event in arrived.values():
                assert event.wait(10), "the upstream never received the calls"
            time.sleep(0.5)
            sigterm = time.monotonic()
            os.kill(gw.proc.pid, signal.SIGTERM)

            # At once: the listener is closed, the long poll has ended, the RPC is still running.
            rig.wait_until(lambda: not rig.port_accepts(gw.port), timeout=2, interval=0.05,
                           what="the listener to close after SIGTERM")
            assert poll.exception(timeout=2) is not None, "the long poll was not ended at shutdown"
            assert poll.exception().code() == grpc.StatusCode.UNAVAILABLE, poll.exception()
            assert ended["poll"] - sigterm < 2, f"the long poll ended {ended['poll'] - sigterm:.1f}s after SIGTERM"
            assert not in_flight.done() and gw.proc.alive(), "the in-flight RPC was cut instead of drained"

            # The in-flight RPC completes with its answer; then the gateway exits, at once.
            assert in_flight.result(timeout=hold + 5) == body[::-1]
            code = gw.proc.proc.wait(timeout=GRACE_S + 10)
            exited = time.monotonic()
        finally:
            for ch in (idle, busy, polling):
                ch.close()
        print(f"\n[drain] after SIGTERM: long poll ended {ended['poll'] - sigterm:.2f}s, in-flight RPC completed "
              f"{ended['rpc'] - sigterm:.2f}s, gateway exited {exited - sigterm:.2f}s (grace {GRACE_S}s)")
        assert code == 0, gw.describe()
        assert ended["rpc"] - sigterm > 1, "the in-flight RPC completed before SIGTERM: nothing was drained"
        assert exited - ended["rpc"] < 2, f"the gateway exited {exited - ended['rpc']:.1f}s after the last RPC completed"
        assert exited - sigterm < hold + 2 < GRACE_S, f"shutdown took {exited - sigterm:.1f}s"
        out = gw.output()
        assert "in-flight requests still running" not in out, out[-3000:]
    finally:
        release.set()
        up.stop()


def test_sigterm_under_load_then_a_new_gateway_finishes_the_work(temporal_server, gateway_factory):
    first = gateway_factory(temporal_server.address, config={}, start=False, name="gw-enc-k1")
    first.configure(encryption_config(first, "k1", ("k1", "k2")))
    first.config["proxy"]["shutdown_grace_ms"] = GRACE_S * 1000  # so only draining can pass the time bound below
    first.configure().start()
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
            exit_code = await asyncio.to_thread(first.stop, GRACE_S + 15)
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
    print(f"\n[drain under load] SIGTERM to exit: {stop_seconds:.2f}s (grace {GRACE_S}s)")
    assert exit_code == 0, first.describe()
    # In flight at SIGTERM: long polls (ended at once) and short RPCs (activities take 0.2 s).
    assert stop_seconds < 5, f"shutdown took {stop_seconds:.1f}s (grace {GRACE_S}s): in-flight RPCs were not drained"
    assert results == [sum(2 * i for i in range(steps))] * count
    out = first.output()
    assert "shutdown requested" in out and "stopped" in out, out[-3000:]
    assert "panicked" not in out + second.output()
