"""[proxy.auth] and what the server acts on beyond a request's `namespace` field.

The server completes tasks, records heartbeats and answers queries in the namespace named by
the task token (its own `token.v1.Task`, not signed), not by the request's `namespace`; and with
cross-namespace commands enabled a workflow task completion can signal, cancel or start a child
workflow in another namespace. A credential for namespace A must reach none of B's state that
way. Judged at the server: B's history and pending activities are read directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import grpc
import pytest
from temporalio import activity, workflow
from temporalio.api.command.v1 import Command, SignalExternalWorkflowExecutionCommandAttributes
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution
from temporalio.api.enums.v1 import CommandType, EventType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    PollWorkflowTaskQueueRequest, PollWorkflowTaskQueueResponse, RecordActivityTaskHeartbeatRequest,
    RecordActivityTaskHeartbeatResponse, RegisterNamespaceRequest, RespondActivityTaskCompletedRequest,
    RespondActivityTaskCompletedResponse, RespondWorkflowTaskCompletedRequest, RespondWorkflowTaskCompletedResponse,
)
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig

NS_A = "default"
NS_B = "tt-victim"
TOKEN_A = "tok-a-" + uuid.uuid4().hex
WS = "/temporal.api.workflowservice.v1.WorkflowService/"
MARKER = b"injected-by-a-" + uuid.uuid4().hex.encode()


class Setup:
    server: rig.TemporalServer
    gw: rig.Gateway


@pytest.fixture(scope="module")
def setup(workdir):
    s = Setup()
    base = rig.new_tmpdir(workdir, "task-token-")
    # Cross-namespace commands are off by default since server 1.30.1; an operator may turn
    # them on, and then the gateway is what stands between A and B.
    server = rig.TemporalServer(base / "temporal", name="temporal-task-token",
                                dynamic_config={"system.enableCrossNamespaceCommands": "true"})
    gw = None
    try:
        server.start()
        channel = rig.channel(server.address)
        register = channel.unary_unary(WS + "RegisterNamespace", request_serializer=RegisterNamespaceRequest.SerializeToString,
                                       response_deserializer=lambda b: b)
        try:
            register(RegisterNamespaceRequest(namespace=NS_B, workflow_execution_retention_period=timedelta(days=1)), timeout=30)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e
        channel.close()
        gw = rig.Gateway(base / "gw", server.address, config={}, name="gateway-task-token",
                         extra_env={"PGW_T_TOKEN_A": TOKEN_A})
        gw.configure({
            **gw.listener_sections(),
            "proxy.auth": {"tokens": [{"env": "PGW_T_TOKEN_A", "namespaces": [NS_A]}]},
            "encryption": {"enabled": False}, "compression": {"enabled": False}, "storage": {"enabled": False},
        })
        gw.start()
        s.server, s.gw = server, gw
        yield s
    finally:
        if gw is not None:
            gw.stop()
        server.stop()


def call(address: str, method: str, request, response_type, token: str | None = TOKEN_A, timeout: float = 20):
    """One unary call with `authorization: Bearer <token>`; returns (response, None) or (None, RpcError)."""
    channel = rig.channel(address)
    try:
        stub = channel.unary_unary(WS + method, request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_type.FromString)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            return stub(request, metadata=metadata, timeout=timeout), None
        except grpc.RpcError as e:
            return None, e
    finally:
        channel.close()


held_tokens: dict[str, bytes] = {}


@activity.defn
async def hold(key: str) -> str:
    held_tokens[key] = activity.info().task_token
    await asyncio.sleep(3600)
    return "never"


@activity.defn
async def quick(x: str) -> str:
    return x + "!"


@workflow.defn
class ActivityWorkflow:
    @workflow.run
    async def run(self, key: str) -> str:
        if key.startswith("quick"):
            return await workflow.execute_activity(quick, key, start_to_close_timeout=timedelta(seconds=30))
        return await workflow.execute_activity(hold, key, start_to_close_timeout=timedelta(seconds=600),
                                               heartbeat_timeout=timedelta(seconds=600))


@workflow.defn
class WaitWorkflow:
    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


async def history_events(client: Client, wid: str) -> list:
    return [e async for e in client.get_workflow_handle(wid).fetch_history_events()]


sync = rig.sync


@sync
async def test_a_task_token_of_namespace_b_is_refused_and_b_is_untouched(setup):
    direct_b = await Client.connect(setup.server.address, namespace=NS_B)
    tq = f"tq-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    async with Worker(direct_b, task_queue=tq, workflows=[ActivityWorkflow], activities=[hold],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        wid = f"victim-{uuid.uuid4().hex[:8]}"
        await direct_b.start_workflow(ActivityWorkflow.run, key, id=wid, task_queue=tq)
        deadline = time.monotonic() + 30
        while key not in held_tokens:
            assert time.monotonic() < deadline, "B's activity never started"
            await asyncio.sleep(0.1)
        token_b = held_tokens[key]
        marker = Payloads(payloads=[Payload(metadata={"encoding": b"binary/plain"}, data=MARKER)])
        # A's credential, A's namespace in the request, B's task token.
        _, err = call(setup.gw.address, "RespondActivityTaskCompleted",
                      RespondActivityTaskCompletedRequest(namespace=NS_A, task_token=token_b, result=marker, identity="a"),
                      RespondActivityTaskCompletedResponse)
        # The gateway refuses before the server sees it. (Servers since 1.2x also refuse a task
        # token of another namespace than the request's, with INVALID_ARGUMENT: the gateway's
        # check is for the servers before that and for the request reaching the server at all.)
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert "task token" in err.details(), err.details()
        _, err = call(setup.gw.address, "RecordActivityTaskHeartbeat",
                      RecordActivityTaskHeartbeatRequest(namespace=NS_A, task_token=token_b, details=marker, identity="a"),
                      RecordActivityTaskHeartbeatResponse)
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        # Judged at the server: the activity is still pending, without our heartbeat, and
        # nothing completed it.
        await asyncio.sleep(1.0)
        events = await history_events(direct_b, wid)
        assert not any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED for e in events)
        desc = await direct_b.get_workflow_handle(wid).describe()
        pending = desc.raw_description.pending_activities
        assert len(pending) == 1
        assert MARKER not in pending[0].heartbeat_details.SerializeToString()
        await direct_b.get_workflow_handle(wid).terminate("test done")


@sync
async def test_a_worker_of_a_completes_its_own_tasks_through_the_gateway(setup):
    """The control: task tokens of A pass the namespace-id check (looked up at the server)."""
    client_a = await Client.connect(setup.gw.address, namespace=NS_A, api_key=TOKEN_A, tls=False)
    tq = f"tq-{uuid.uuid4().hex[:8]}"
    async with Worker(client_a, task_queue=tq, workflows=[ActivityWorkflow], activities=[quick],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        result = await client_a.execute_workflow(ActivityWorkflow.run, "quick-a", id=f"own-{uuid.uuid4().hex[:8]}",
                                                 task_queue=tq, execution_timeout=timedelta(seconds=60))
    assert result == "quick-a!"


@sync
async def test_a_cross_namespace_command_to_b_is_refused_and_b_gets_no_signal(setup):
    direct_a = await Client.connect(setup.server.address, namespace=NS_A)
    direct_b = await Client.connect(setup.server.address, namespace=NS_B)
    tq_b = f"tq-b-{uuid.uuid4().hex[:8]}"
    victim = f"victim-{uuid.uuid4().hex[:8]}"
    async with Worker(direct_b, task_queue=tq_b, workflows=[WaitWorkflow], workflow_runner=UnsandboxedWorkflowRunner()):
        await direct_b.start_workflow(WaitWorkflow.run, id=victim, task_queue=tq_b)
        # A workflow in A without a worker: the attacker polls its task through the gateway.
        tq_a = f"tq-a-{uuid.uuid4().hex[:8]}"
        own = f"own-{uuid.uuid4().hex[:8]}"
        await direct_a.start_workflow("Whatever", id=own, task_queue=tq_a)
        polled, err = call(setup.gw.address, "PollWorkflowTaskQueue",
                           PollWorkflowTaskQueueRequest(namespace=NS_A, task_queue=TaskQueue(name=tq_a), identity="a"),
                           PollWorkflowTaskQueueResponse, timeout=70)
        assert err is None, err
        assert polled.task_token, "no workflow task for A's workflow"
        command = Command(
            command_type=CommandType.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION,
            signal_external_workflow_execution_command_attributes=SignalExternalWorkflowExecutionCommandAttributes(
                namespace=NS_B, execution=WorkflowExecution(workflow_id=victim), signal_name="injected"))
        _, err = call(setup.gw.address, "RespondWorkflowTaskCompleted",
                      RespondWorkflowTaskCompletedRequest(namespace=NS_A, task_token=polled.task_token,
                                                          commands=[command], identity="a"),
                      RespondWorkflowTaskCompletedResponse)
        await asyncio.sleep(3.0)
        events = await history_events(direct_b, victim)
        assert not any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in events), \
            "B's workflow was signalled by a command sent with A's credential"
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert NS_B in err.details(), err.details()
        await direct_b.get_workflow_handle(victim).terminate("test done")
        await direct_a.get_workflow_handle(own).terminate("test done")
