"""Nexus through the gateway, across namespaces with different keys: a caller workflow in
namespace A (key k1) calls Nexus operations whose handler worker runs in namespace B (key k2).
Namespaces and the endpoint are created through the gateway. A sync operation and a
workflow-run operation (a workflow started in B for A: the cross-namespace "child") carry
payloads both ways; both histories, read directly from the server, hold only ciphertext (and
storage references for what B offloads inside B).

Offloaded payloads cross namespaces too: a reference written in A lies under `v0/ns/A/`, and
the gateway only resolves it for a request in B because the config grants it
(`[namespaces.B] storage_read_namespaces = ["A"]`, and the reverse for results coming back);
without the grant it is refused like any reference outside the requesting namespace.

The Python SDK has no cross-namespace child workflows (Temporal deprecated cross-namespace
commands); the workflow-run Nexus operation is the supported way to run a child workflow in
another namespace, and is what proves that row."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

import nexusrpc
import nexusrpc.handler
import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio import activity, nexus, workflow
from temporalio.api.nexus.v1 import EndpointSpec, EndpointTarget
from temporalio.api.operatorservice.v1 import CreateNexusEndpointRequest
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from features import MARKER, assert_no_plaintext, blob, full_gateway, server_history, sha, uid


@dataclass
class EchoIn:
    text: str
    big: str
    reply_len: int = 2000


@dataclass
class EchoOut:
    text: str
    big_len: int
    big_sha: str
    reply: str
    namespace: str


@nexusrpc.service
class PgwService:
    echo: nexusrpc.Operation[EchoIn, EchoOut]
    run_child: nexusrpc.Operation[EchoIn, EchoOut]


@activity.defn
async def child_activity(text: str) -> str:
    return f"{MARKER}-activity-in-{activity.info().namespace}:{text}"


@activity.defn
async def big_activity(n: int) -> str:
    return blob(n, "inside-b")


@workflow.defn
class HandlerChildWorkflow:
    @workflow.run
    async def run(self, inp: EchoIn) -> EchoOut:
        r = await workflow.execute_activity(child_activity, inp.text, start_to_close_timeout=timedelta(seconds=30))
        # A large intermediate inside B: offloaded under B's prefix, resolved by B's worker.
        inside = await workflow.execute_activity(big_activity, 300_000, start_to_close_timeout=timedelta(seconds=30))
        return EchoOut(text=inp.text, big_len=len(inp.big), big_sha=sha(inp.big), reply=r + f"|{sha(inside)}",
                       namespace=workflow.info().namespace)


@nexusrpc.handler.service_handler(service=PgwService)
class PgwServiceHandler:
    @nexusrpc.handler.sync_operation
    async def echo(self, ctx: nexusrpc.handler.StartOperationContext, inp: EchoIn) -> EchoOut:
        return EchoOut(text=inp.text, big_len=len(inp.big), big_sha=sha(inp.big),
                       reply=f"{MARKER}-sync-reply " + blob(inp.reply_len, "sync-reply"), namespace=nexus.info().namespace)

    @nexus.workflow_run_operation
    async def run_child(self, ctx: nexus.WorkflowRunOperationContext, inp: EchoIn) -> nexus.WorkflowHandle[EchoOut]:
        return await ctx.start_workflow(HandlerChildWorkflow.run, inp, id=f"nexus-child-{uid('c')}")


@workflow.defn
class CallerWorkflow:
    @workflow.run
    async def run(self, endpoint: str, big: int = 20_000, reply_len: int = 2000, timeout_s: int = 60) -> dict:
        client = workflow.create_nexus_client(service=PgwService, endpoint=endpoint)
        sync_out = await client.execute_operation(
            PgwService.echo, EchoIn(text=f"{MARKER}-sync-input", big=blob(big, "sync-in"), reply_len=reply_len),
            schedule_to_close_timeout=timedelta(seconds=timeout_s))
        child_out = await client.execute_operation(
            PgwService.run_child, EchoIn(text=f"{MARKER}-child-input", big=blob(big, "child-in")),
            schedule_to_close_timeout=timedelta(seconds=timeout_s))
        return {"sync": sync_out, "child": child_out, "caller_ns": workflow.info().namespace}


@pytest.fixture(scope="module")
def nexus_server(workdir):
    server = rig.TemporalServer(rig.new_tmpdir(workdir, "temporal-nexus-"), name="temporal-nexus")
    server.dynamic_config = {
        "system.enableNexus": "true",
        "component.nexusoperations.callback.endpoint.template":
            f'"http://127.0.0.1:{server.http_port}/namespaces/{{{{.NamespaceName}}}}/nexus/callback"',
        "component.callbacks.allowedAddresses": '[{"Pattern":"*","AllowInsecure":true}]',
    }
    server.start()
    yield server
    server.stop()


async def register_namespace(client: Client, name: str) -> None:
    await client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=name, workflow_execution_retention_period=Duration(seconds=24 * 3600)))
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=name))
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def run_nexus(server, gateway_factory, s3, big: int, reply_len: int, timeout_s: int):
    ns_a, ns_b = uid("pgw-nx-a"), uid("pgw-nx-b")
    gw = full_gateway(gateway_factory, server.address, s3,
                      namespaces={ns_a: {"active_key": "k1", "storage_read_namespaces": [ns_b]},
                                  ns_b: {"active_key": "k2", "storage_read_namespaces": [ns_a]}})
    endpoint = uid("pgw-ep")
    handler_tq, caller_tq, wf_id = uid("nx-handler"), uid("nx-caller"), uid("nx-caller-wf")

    async def run():
        admin = await Client.connect(gw.address, namespace="default")
        await register_namespace(admin, ns_a)
        await register_namespace(admin, ns_b)
        await admin.operator_service.create_nexus_endpoint(CreateNexusEndpointRequest(spec=EndpointSpec(
            name=endpoint, target=EndpointTarget(worker=EndpointTarget.Worker(namespace=ns_b, task_queue=handler_tq)))))
        client_a = await Client.connect(gw.address, namespace=ns_a)
        client_b = await Client.connect(gw.address, namespace=ns_b)
        async with Worker(client_b, task_queue=handler_tq, workflows=[HandlerChildWorkflow],
                          activities=[child_activity, big_activity], nexus_service_handlers=[PgwServiceHandler()],
                          workflow_runner=UnsandboxedWorkflowRunner()), \
                Worker(client_a, task_queue=caller_tq, workflows=[CallerWorkflow], workflow_runner=UnsandboxedWorkflowRunner()):
            out = await client_a.execute_workflow(CallerWorkflow.run, args=[endpoint, big, reply_len, timeout_s], id=wf_id,
                                                  task_queue=caller_tq, execution_timeout=timedelta(seconds=120))
        child_ids = [w.id async for w in client_b.list_workflows("WorkflowType = 'HandlerChildWorkflow'")]
        return out, child_ids

    out, child_ids = asyncio.run(run())
    sync, child = out["sync"], out["child"]
    assert out["caller_ns"] == ns_a
    assert sync["text"] == f"{MARKER}-sync-input" and sync["namespace"] == ns_b
    assert sync["big_len"] == big and sync["big_sha"] == sha(blob(big, "sync-in"))
    assert sync["reply"] == f"{MARKER}-sync-reply " + blob(reply_len, "sync-reply")
    assert child["namespace"] == ns_b and child["big_sha"] == sha(blob(big, "child-in"))
    assert child["reply"] == f"{MARKER}-activity-in-{ns_b}:{MARKER}-child-input|" + sha(blob(300_000, "inside-b"))
    assert len(child_ids) == 1

    markers = [MARKER.encode(), b"sync-input", b"child-input"]
    caller = assert_no_plaintext(asyncio.run(server_history(server.address, wf_id, ns_a)), markers, s3)
    handler = assert_no_plaintext(asyncio.run(server_history(server.address, child_ids[0], ns_b)), markers, s3)
    return caller, handler


def test_nexus_cross_namespace_different_keys(nexus_server, gateway_factory, s3_server):
    """Sync operation and workflow-run operation (child workflow in namespace B) from A."""
    caller, handler = run_nexus(nexus_server, gateway_factory, s3_server, big=20_000, reply_len=20_000, timeout_s=60)
    # A's own payloads are k1; what B's worker wrote (the sync result, the child's result via
    # the completion callback) stays k2 in A's history: every configured key decrypts.
    assert caller["key_ids"] == {"k1", "k2"}, caller
    # B: the child's input (k2, re-encoded by the handler worker's start) and its offloaded activity result.
    assert handler["key_ids"] == {"k2"} and handler["refs"] >= 1, handler
    print(f"\nnexus: caller history {caller}, handler history {handler}")


def test_nexus_cross_namespace_offloaded_payloads(nexus_server, gateway_factory, s3_server):
    caller, handler = run_nexus(nexus_server, gateway_factory, s3_server, big=300_000, reply_len=150_000, timeout_s=10)
    assert caller["refs"] >= 3 and handler["refs"] >= 2
