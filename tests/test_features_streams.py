"""Workflow Streams (`temporalio.contrib.workflow_streams`, experimental in temporalio 1.35.0)
through the gateway: a workflow publishes 200 events; a subscriber connected through the gateway
receives all of them, in order; the server's history (read directly) holds the events only as
ciphertext. Subscriptions are workflow Updates (`__temporal_workflow_stream_poll`), whose
results travel in `protocol.v1.Message` Any bodies; items are base64 of a serialized Payload
inside the JSON poll result, so the marker is also searched for in its base64 forms."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from features import MARKER, assert_no_plaintext, b64_variants, full_gateway, server_history, uid

streams = pytest.importorskip("temporalio.contrib.workflow_streams",
                              reason="temporalio.contrib.workflow_streams is not in this SDK version")
WorkflowStream, WorkflowStreamClient = streams.WorkflowStream, streams.WorkflowStreamClient

N = 200


@workflow.defn
class PublisherWorkflow:
    @workflow.init
    def __init__(self, n: int) -> None:
        self.stream = WorkflowStream()
        self.done = False

    @workflow.run
    async def run(self, n: int) -> int:
        topic = self.stream.topic("events")
        for i in range(n):
            topic.publish({"seq": i, "text": f"{MARKER} event {i:03d}"})
            if i % 50 == 49:
                await workflow.sleep(timedelta(milliseconds=50))
        await workflow.wait_condition(lambda: self.done)
        return n

    @workflow.signal
    def finish(self) -> None:
        self.done = True


def test_workflow_stream_200_events_in_order(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, wf_id = uid("streams"), uid("streams-wf")

    async def run():
        client = await Client.connect(gw.address)
        async with Worker(client, task_queue=tq, workflows=[PublisherWorkflow], workflow_runner=UnsandboxedWorkflowRunner()):
            handle = await client.start_workflow(PublisherWorkflow.run, N, id=wf_id, task_queue=tq,
                                                 execution_timeout=timedelta(seconds=120))
            got = []
            stream = WorkflowStreamClient.create(client, wf_id)

            async def consume():
                async for item in stream.subscribe(["events"], result_type=dict, poll_cooldown=timedelta(milliseconds=20)):
                    got.append((item.offset, item.topic, item.data))
                    if len(got) == N:
                        return

            await asyncio.wait_for(consume(), 90)
            await handle.signal(PublisherWorkflow.finish)
            return got, await handle.result()

    got, result = asyncio.run(run())
    assert result == N
    assert [g[2] for g in got] == [{"seq": i, "text": f"{MARKER} event {i:03d}"} for i in range(N)]
    assert [g[0] for g in got] == list(range(N)) and {g[1] for g in got} == {"events"}
    history = asyncio.run(server_history(temporal_server.address, wf_id))
    stats = assert_no_plaintext(history, [MARKER.encode(), *b64_variants(MARKER.encode()), b"event 1"], s3_server)
    polls = sum(1 for e in history.events if e.HasField("workflow_execution_update_completed_event_attributes"))
    assert polls >= 1, "no subscription update in history"
    print(f"\nworkflow streams: {N} events in {polls} poll updates; history {stats}")
