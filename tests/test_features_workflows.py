"""Workflow features through a gateway with encryption, compression and offload to s3s-fs:
continue-as-new carrying large (offloaded) state, signal-with-start, update-with-start
(ExecuteMultiOperation), a query returning a large (offloaded) result, and a workflow reset
issued through the gateway whose new run completes. Each case reads the history directly from
the server to show that it holds only ciphertext and storage references."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from features import MARKER, assert_no_plaintext, bucket_objects, blob, full_gateway, server_history, sha, uid

BIG = 300_000  # ~150 KB after zstd: above the 64 KiB threshold, offloaded


@activity.defn
async def produce(seed: str) -> str:
    return blob(BIG, seed)


@dataclass
class CanState:
    round: int
    state: str
    shas: list[str]


@workflow.defn
class CanWorkflow:
    @workflow.run
    async def run(self, s: CanState) -> dict:
        shas = s.shas + [sha(s.state)]
        if s.round < 3:
            workflow.continue_as_new(CanState(round=s.round + 1, state=blob(BIG, f"state-{s.round + 1}"), shas=shas))
        return {"rounds": s.round, "shas": shas, "run_id": workflow.info().run_id,
                "first_run_id": workflow.info().first_execution_run_id}


@workflow.defn
class MailboxWorkflow:
    """Signal-with-start, update-with-start and query target."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.done = False

    @workflow.run
    async def run(self, greeting: str) -> dict:
        await workflow.wait_condition(lambda: self.done)
        return {"greeting": greeting, "items": [i[:40] for i in self.items], "shas": [sha(i) for i in self.items]}

    @workflow.signal
    def put(self, item: str) -> None:
        self.items.append(item)

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.update
    async def put_and_count(self, item: str) -> dict:
        self.items.append(item)
        return {"count": len(self.items), "echo": item}

    @workflow.query
    def everything(self) -> str:
        return "".join(self.items) + blob(BIG, "query-result")


@workflow.defn
class ResetWorkflow:
    @workflow.run
    async def run(self, inp: str) -> dict:
        out = await workflow.execute_activity(produce, "reset-activity", start_to_close_timeout=timedelta(seconds=60))
        return {"in_sha": sha(inp), "act_sha": sha(out), "run_id": workflow.info().run_id}


def worker(client: Client, tq: str) -> Worker:
    return Worker(client, task_queue=tq, workflows=[CanWorkflow, MailboxWorkflow, ResetWorkflow], activities=[produce],
                  workflow_runner=UnsandboxedWorkflowRunner())


def markers(*extra: bytes) -> list[bytes]:
    return [MARKER.encode(), *extra]


def test_continue_as_new_with_large_state(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, wf_id = uid("can"), uid("can-wf")

    async def run():
        client = await Client.connect(gw.address)
        async with worker(client, tq):
            return await client.execute_workflow(CanWorkflow.run, CanState(round=0, state=blob(BIG, "state-0"), shas=[]),
                                                 id=wf_id, task_queue=tq, execution_timeout=timedelta(seconds=120))

    out = asyncio.run(run())
    assert out["rounds"] == 3
    assert out["shas"] == [sha(blob(BIG, f"state-{i}")) for i in range(4)]
    assert out["run_id"] != out["first_run_id"]
    first = asyncio.run(server_history(temporal_server.address, wf_id, run_id=out["first_run_id"]))
    can_events = [e for e in first.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW]
    assert len(can_events) == 1
    can_input = can_events[0].workflow_execution_continued_as_new_event_attributes.input.payloads
    assert can_input[0].metadata.get("messageType") == b"temporal.api.sdk.v1.ExternalStorageReference"
    stats = assert_no_plaintext(first, markers(), s3_server)
    assert stats["refs"] >= 2 and stats["bytes"] < 50_000, stats
    last = assert_no_plaintext(asyncio.run(server_history(temporal_server.address, wf_id)), markers(), s3_server)
    assert last["refs"] >= 1


def test_signal_with_start_and_update_with_start(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, sws_id, uws_id = uid("sws"), uid("sws-wf"), uid("uws-wf")
    big_signal, big_update = blob(BIG, "sws-signal"), blob(BIG, "uws-update")

    async def run():
        client = await Client.connect(gw.address)
        async with worker(client, tq):
            # signal-with-start (SignalWithStartWorkflowExecution): large signal input
            h1 = await client.start_workflow(MailboxWorkflow.run, f"{MARKER}-hello-sws", id=sws_id, task_queue=tq,
                                             start_signal="put", start_signal_args=[big_signal])
            await h1.signal(MailboxWorkflow.put, f"{MARKER}-second-small")
            await h1.signal(MailboxWorkflow.finish)
            r1 = await h1.result()
            # update-with-start (ExecuteMultiOperation): large update argument and result
            op = WithStartWorkflowOperation(MailboxWorkflow.run, f"{MARKER}-hello-uws", id=uws_id, task_queue=tq,
                                            id_conflict_policy=WorkflowIDConflictPolicy.FAIL)
            u = await client.execute_update_with_start_workflow(MailboxWorkflow.put_and_count, big_update,
                                                                start_workflow_operation=op)
            h2 = await op.workflow_handle()
            # a second update-with-start on the running workflow (USE_EXISTING)
            op2 = WithStartWorkflowOperation(MailboxWorkflow.run, "unused", id=uws_id, task_queue=tq,
                                             id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
            u2 = await client.execute_update_with_start_workflow(MailboxWorkflow.put_and_count, f"{MARKER}-small-update",
                                                                 start_workflow_operation=op2)
            await h2.signal(MailboxWorkflow.finish)
            r2 = await h2.result()
            return r1, u, u2, r2

    r1, u, u2, r2 = asyncio.run(run())
    assert r1["greeting"] == f"{MARKER}-hello-sws"
    assert r1["shas"] == [sha(big_signal), sha(f"{MARKER}-second-small")]
    assert u == {"count": 1, "echo": big_update}
    assert u2 == {"count": 2, "echo": f"{MARKER}-small-update"}
    assert r2["greeting"] == f"{MARKER}-hello-uws" and r2["shas"] == [sha(big_update), sha(f"{MARKER}-small-update")]
    for wf_id in (sws_id, uws_id):
        stats = assert_no_plaintext(asyncio.run(server_history(temporal_server.address, wf_id)),
                                    markers(b"hello-sws", b"hello-uws", b"small-update", b"second-small"), s3_server)
        assert stats["refs"] >= 1 and stats["key_ids"] == {"k1"}, (wf_id, stats)


def test_query_with_large_offloaded_result(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, wf_id = uid("query"), uid("query-wf")

    async def run():
        client = await Client.connect(gw.address)
        async with worker(client, tq):
            h = await client.start_workflow(MailboxWorkflow.run, "q", id=wf_id, task_queue=tq)
            await h.signal(MailboxWorkflow.put, f"{MARKER}-item")
            await h.query(MailboxWorkflow.everything)  # first query: the workflow is cached now
            before = {p.name for p in bucket_objects(s3_server)}
            result = await h.query(MailboxWorkflow.everything)
            after = {p.name for p in bucket_objects(s3_server)}
            await h.signal(MailboxWorkflow.finish)
            await h.result()
            return result, before, after

    result, before, after = asyncio.run(run())
    assert result == f"{MARKER}-item" + blob(BIG, "query-result")
    # The query result was offloaded: the second query stored a new object (fresh nonce, new hash).
    assert after - before, "the large query result was not offloaded"
    assert_no_plaintext(asyncio.run(server_history(temporal_server.address, wf_id)), markers(), s3_server)


def test_reset_through_gateway(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, wf_id = uid("reset"), uid("reset-wf")
    inp = blob(BIG, "reset-input")

    async def run():
        client = await Client.connect(gw.address)
        async with worker(client, tq):
            h = await client.start_workflow(ResetWorkflow.run, inp, id=wf_id, task_queue=tq)
            first = await h.result()
            history = await h.fetch_history()
            wft_completed = next(e.event_id for e in history.events
                                 if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
            resp = await client.workflow_service.reset_workflow_execution(ResetWorkflowExecutionRequest(
                namespace="default", workflow_execution=WorkflowExecution(workflow_id=wf_id, run_id=first["run_id"]),
                reason="pgw feature test reset", workflow_task_finish_event_id=wft_completed,
                request_id=str(uuid.uuid4())))
            second = await client.get_workflow_handle(wf_id, run_id=resp.run_id).result()
            return first, resp.run_id, second

    first, new_run, second = asyncio.run(run())
    assert second["run_id"] == new_run != first["run_id"]
    assert first["in_sha"] == second["in_sha"] == sha(inp)
    assert first["act_sha"] == second["act_sha"] == sha(blob(BIG, "reset-activity"))
    for run_id in (first["run_id"], new_run):
        stats = assert_no_plaintext(asyncio.run(server_history(temporal_server.address, wf_id, run_id=run_id)),
                                    markers(), s3_server)
        assert stats["refs"] >= 2, stats
