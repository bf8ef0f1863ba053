"""Schedules through the gateway: create, describe and update a schedule; its action's input is
ciphertext (and a storage reference for the large argument) in the schedule the server holds
(DescribeSchedule read directly from the server); runs started by `trigger` receive plaintext."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from temporalio import workflow
from temporalio.api.workflowservice.v1 import DescribeScheduleRequest
from temporalio.client import (Client, Schedule, ScheduleActionStartWorkflow, ScheduleIntervalSpec, ScheduleSpec,
                               ScheduleUpdate)
from temporalio.converter import DataConverter
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from features import MARKER, REF_TYPE, assert_no_plaintext, blob, full_gateway, server_history, sha, uid
from sdk_codec import ENCRYPTED

BIG = 300_000


@workflow.defn
class ScheduledWorkflow:
    @workflow.run
    async def run(self, label: str, big: str) -> dict:
        return {"label": label, "big_sha": sha(big), "big_len": len(big)}


async def raw_schedule(server_address: str, schedule_id: str):
    direct = await Client.connect(server_address)
    return await direct.workflow_service.describe_schedule(DescribeScheduleRequest(namespace="default", schedule_id=schedule_id))


def assert_action_encrypted(desc, marker: bytes) -> None:
    payloads = desc.schedule.action.start_workflow.input.payloads
    assert len(payloads) == 2
    assert payloads[0].metadata["encoding"] == ENCRYPTED and payloads[0].metadata["encryption-key-id"] == b"k1"
    assert payloads[1].metadata.get("messageType") == REF_TYPE  # the large argument is offloaded
    raw = desc.SerializeToString()
    assert marker not in raw and MARKER.encode() not in raw


def test_schedule_create_describe_update_trigger(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, sched_id = uid("sched"), uid("sched")

    async def run():
        client = await Client.connect(gw.address)
        handle = await client.create_schedule(sched_id, Schedule(
            action=ScheduleActionStartWorkflow(ScheduledWorkflow.run, args=[f"{MARKER}-label-one", blob(BIG, "sched-1")],
                                               id=f"{sched_id}-run", task_queue=tq),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(days=365))])))
        desc1 = await handle.describe()
        raw1 = await raw_schedule(temporal_server.address, sched_id)

        def change(inp):
            action = inp.description.schedule.action
            action.args = [f"{MARKER}-label-two", blob(BIG, "sched-2")]
            return ScheduleUpdate(schedule=inp.description.schedule)

        await handle.update(change)
        desc2 = await handle.describe()
        raw2 = await raw_schedule(temporal_server.address, sched_id)
        async with Worker(client, task_queue=tq, workflows=[ScheduledWorkflow], workflow_runner=UnsandboxedWorkflowRunner()):
            await handle.trigger()
            deadline = time.monotonic() + 30
            while True:
                d = await handle.describe()
                if d.info.recent_actions:
                    break
                assert time.monotonic() < deadline, "trigger started nothing"
                await asyncio.sleep(0.2)
            started = d.info.recent_actions[-1].action
            result = await client.get_workflow_handle(started.workflow_id, run_id=started.first_execution_run_id).result()
        await handle.delete()
        return desc1, raw1, desc2, raw2, started.workflow_id, result

    desc1, raw1, desc2, raw2, run_wf_id, result = asyncio.run(run())
    # through the gateway: plaintext
    a1, a2 = desc1.schedule.action, desc2.schedule.action
    assert isinstance(a1, ScheduleActionStartWorkflow) and isinstance(a2, ScheduleActionStartWorkflow)
    conv = DataConverter.default.payload_converter
    args1 = [conv.from_payload(p) for p in a1.args]
    args2 = [conv.from_payload(p) for p in a2.args]
    assert args1 == [f"{MARKER}-label-one", blob(BIG, "sched-1")]
    assert args2 == [f"{MARKER}-label-two", blob(BIG, "sched-2")]
    # at the server: ciphertext and a reference
    assert_action_encrypted(raw1, b"label-one")
    assert_action_encrypted(raw2, b"label-two")
    # the triggered run got the updated plaintext
    assert result == {"label": f"{MARKER}-label-two", "big_sha": sha(blob(BIG, "sched-2")), "big_len": BIG}
    stats = assert_no_plaintext(asyncio.run(server_history(temporal_server.address, run_wf_id)),
                                [MARKER.encode(), b"label-two"], s3_server)
    assert stats["refs"] >= 1
