"""Worker Versioning (worker deployments) through the gateway: two deployment versions of the
same workflow type poll one task queue through the gateway; the current version is set through
the gateway (SetWorkerDeploymentCurrentVersion); a pinned workflow started on v1 stays on v1
after v2 becomes current, new workflows start on v2. Histories hold only ciphertext."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from temporalio import workflow
from temporalio.api.workflowservice.v1 import DescribeWorkerDeploymentRequest, SetWorkerDeploymentCurrentVersionRequest
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkerDeploymentConfig

from features import MARKER, assert_no_plaintext, full_gateway, server_history, uid


@workflow.defn(name="VersionedWorkflow", versioning_behavior=VersioningBehavior.PINNED)
class VersionedV1:
    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self, text: str) -> str:
        await workflow.wait_condition(lambda: self.done)
        return f"v1:{text}"

    @workflow.signal
    def finish(self) -> None:
        self.done = True


@workflow.defn(name="VersionedWorkflow", versioning_behavior=VersioningBehavior.PINNED)
class VersionedV2:
    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self, text: str) -> str:
        await workflow.wait_condition(lambda: self.done)
        return f"v2:{text}"

    @workflow.signal
    def finish(self) -> None:
        self.done = True


def versioned_worker(client: Client, tq: str, deployment: str, build_id: str, wf) -> Worker:
    return Worker(client, task_queue=tq, workflows=[wf], workflow_runner=UnsandboxedWorkflowRunner(),
                  deployment_config=WorkerDeploymentConfig(version=WorkerDeploymentVersion(deployment, build_id),
                                                           use_worker_versioning=True))


async def set_current(client: Client, deployment: str, build_id: str) -> None:
    """Through the gateway; retried until the version has registered (its worker polled)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.workflow_service.set_worker_deployment_current_version(SetWorkerDeploymentCurrentVersionRequest(
                namespace="default", deployment_name=deployment, build_id=build_id, identity="pgw-test"))
            return
        except RPCError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def wait_version_on(handle, build_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        d = await handle.describe()
        info = d.raw_description.workflow_execution_info.versioning_info
        if info.deployment_version.build_id == build_id:
            return
        assert time.monotonic() < deadline, f"{handle.id} never ran on {build_id}: {info}"
        await asyncio.sleep(0.2)


def test_worker_versioning_pinned_stays_new_goes_to_current(temporal_server, gateway_factory, s3_server):
    gw = full_gateway(gateway_factory, temporal_server.address, s3_server)
    tq, deployment = uid("versioned"), uid("pgw-deploy")
    id1, id2 = uid("pinned-v1"), uid("new-v2")

    async def run():
        client = await Client.connect(gw.address)
        async with versioned_worker(client, tq, deployment, "v1", VersionedV1):
            await set_current(client, deployment, "v1")
            h1 = await client.start_workflow("VersionedWorkflow", f"{MARKER}-first", id=id1, task_queue=tq,
                                             execution_timeout=timedelta(seconds=120))
            await wait_version_on(h1, "v1")
            async with versioned_worker(client, tq, deployment, "v2", VersionedV2):
                await set_current(client, deployment, "v2")
                desc = await client.workflow_service.describe_worker_deployment(DescribeWorkerDeploymentRequest(
                    namespace="default", deployment_name=deployment))
                h2 = await client.start_workflow("VersionedWorkflow", f"{MARKER}-second", id=id2, task_queue=tq,
                                                 execution_timeout=timedelta(seconds=120))
                await wait_version_on(h2, "v2")
                await h1.signal("finish")
                await h2.signal("finish")
                r1, r2 = await h1.result(), await h2.result()
                d1 = (await h1.describe()).raw_description.workflow_execution_info.versioning_info
                return r1, r2, d1, desc

    r1, r2, d1, desc = asyncio.run(run())
    assert r1 == f"v1:{MARKER}-first", "the pinned workflow moved off v1"
    assert r2 == f"v2:{MARKER}-second", "a new workflow did not start on the current version v2"
    assert d1.behavior == VersioningBehavior.PINNED.value and d1.deployment_version.build_id == "v1"
    routing = desc.worker_deployment_info.routing_config
    assert routing.current_deployment_version.build_id == "v2"
    for wf_id in (id1, id2):
        assert_no_plaintext(asyncio.run(server_history(temporal_server.address, wf_id)),
                            [MARKER.encode(), b"-first", b"-second"], s3_server)
