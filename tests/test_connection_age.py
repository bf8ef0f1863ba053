"""proxy.max_connection_age_ms: client connections are replaced over time, and no RPC fails.

A Python worker and a client (SDK defaults, one connection each way as the SDK opens it)
run short workflows through a gateway whose connections age out after ~3 s, for ~24 s, while
a workflow that sleeps 10 s is awaited the whole time (its result is a history long poll that
outlives several connection ages). The gateway's metrics show connections accepted again and
again and every aged connection drained within its grace (none cut), every RPC through it
answered OK, every workflow completes, and neither the SDK's core nor its Python layer logs
a warning or an error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.request
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig

AGE_MS = 3000
LOAD_SECONDS = 24


@activity.defn
async def double(x: int) -> int:
    return 2 * x


@workflow.defn
class ShortWorkflow:
    @workflow.run
    async def run(self, x: int) -> int:
        return await workflow.execute_activity(double, x, start_to_close_timeout=timedelta(seconds=30))


@workflow.defn
class SleepyWorkflow:
    @workflow.run
    async def run(self, seconds: float) -> str:
        await workflow.sleep(timedelta(seconds=seconds))
        return "rested"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def metrics(gw: rig.Gateway) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=5).read().decode()


def counter(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def failed_rpcs(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("pgw_rpcs_total{") and 'code="OK"' not in line and not line.endswith(" 0")]


@rig.sync
async def test_connections_are_replaced_and_no_rpc_fails(temporal_server, gateway_factory):
    gw = gateway_factory(temporal_server.address, name="gateway-age", config=lambda gw: {
        **gw.listener_sections(),
        "proxy": {**gw.listener_sections()["proxy"], "max_connection_age_ms": AGE_MS,
                  "max_connection_age_grace_ms": 90_000},
        "encryption": {"enabled": False}, "compression": {"enabled": False}, "storage": {"enabled": False},
    })
    caught = Collect()
    core_logger = logging.getLogger(f"pgw-age-core-{uuid.uuid4().hex[:6]}")
    core_logger.addHandler(caught)
    core_logger.setLevel(logging.WARNING)
    sdk_logger = logging.getLogger("temporalio")
    sdk_logger.addHandler(caught)
    # Core's own warnings and errors (poll failures, reconnects that fail) go to `caught`.
    runtime = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
        filter=TelemetryFilter(core_level="WARN", other_level="WARN"),
        forwarding=LogForwardingConfig(logger=core_logger))))
    try:
        client = await Client.connect(gw.address, runtime=runtime)
        tq = f"tq-age-{uuid.uuid4().hex[:8]}"
        before = metrics(gw)
        accepted_before = counter(before, "pgw_connections_accepted_total", 'listener="proxy.listen"')
        # Unsandboxed: this module imports the rig, which the sandbox refuses (as in test_auth).
        async with Worker(client, task_queue=tq, workflows=[ShortWorkflow, SleepyWorkflow], activities=[double],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            sleepy = await client.start_workflow(SleepyWorkflow.run, 10.0, id=f"sleepy-{uuid.uuid4().hex[:8]}", task_queue=tq)
            sleepy_result = asyncio.ensure_future(sleepy.result())
            done: list[int] = []
            deadline = time.monotonic() + LOAD_SECONDS

            async def load(lane: int) -> None:
                i = 0
                while time.monotonic() < deadline:
                    x = lane * 100_000 + i
                    result = await client.execute_workflow(ShortWorkflow.run, x, id=f"short-{uuid.uuid4().hex}", task_queue=tq)
                    assert result == 2 * x
                    done.append(x)
                    i += 1

            await asyncio.gather(*(load(lane) for lane in range(4)))
            assert await asyncio.wait_for(sleepy_result, 30) == "rested"
            after = metrics(gw)
        accepted = counter(after, "pgw_connections_accepted_total", 'listener="proxy.listen"') - accepted_before
        drained = counter(after, "pgw_connections_closed_by_age_total", 'ending="drained"')
        cut = counter(after, "pgw_connections_closed_by_age_total", 'ending="grace_expired"')
        print(f"workflows {len(done)}, connections accepted {accepted:.0f}, drained by age {drained:.0f}, cut {cut:.0f}")
        assert len(done) >= 40, len(done)
        # Two connections live at a time (worker and client share one client here: the SDK
        # opens one); over ~24 s at ~3 s each they are replaced several times.
        assert accepted >= 5, after
        assert drained >= 4, after
        assert cut == 0, after
        assert failed_rpcs(after) == [], failed_rpcs(after)
        assert caught.records == [], caught.records
    finally:
        sdk_logger.removeHandler(caught)
    assert "panicked" not in gw.output()
