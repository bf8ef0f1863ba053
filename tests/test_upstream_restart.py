"""Upstream down: UNAVAILABLE naming the upstream; upstream back: the same gateway serves again."""

from __future__ import annotations

import time
import uuid

import grpc
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.taskqueue.v1 import message_pb2 as tq
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.api.workflowservice.v1 import service_pb2_grpc

import rig


def describe_ns(stub, timeout=10):
    return stub.DescribeNamespace(wsr.DescribeNamespaceRequest(namespace="default"), timeout=timeout)


def test_upstream_killed_and_restarted(dedicated_temporal_server, gateway_factory):
    server = dedicated_temporal_server
    gw = gateway_factory(server.address)
    wid = f"survivor-{uuid.uuid4().hex[:8]}"
    with rig.channel(gw.address) as ch:
        stub = service_pb2_grpc.WorkflowServiceStub(ch)
        assert describe_ns(stub).namespace_info.name == "default"
        stub.StartWorkflowExecution(wsr.StartWorkflowExecutionRequest(
            namespace="default", workflow_id=wid, workflow_type=common.WorkflowType(name="T"),
            task_queue=tq.TaskQueue(name="tq-nobody"), request_id=str(uuid.uuid4())), timeout=10)

        server.kill()  # SIGKILL: connections drop without goodbye
        assert not rig.port_accepts(server.port)

        # Both on the connection the gateway had and on fresh ones: UNAVAILABLE naming the upstream.
        errors = []
        for _ in range(3):
            try:
                describe_ns(stub, timeout=15)
                raise AssertionError("call succeeded with the upstream down")
            except grpc.RpcError as err:
                errors.append((err.code(), err.details()))
        for code, details in errors:
            assert code == grpc.StatusCode.UNAVAILABLE, errors
            assert server.address in (details or ""), f"message does not name upstream {server.address}: {errors}"
        assert gw.proc.alive(), "gateway died when its upstream went away"

        # Upstream back on the same port and db file.
        server.start()
        deadline = time.monotonic() + 30
        last = None
        while True:
            try:
                resp = stub.DescribeWorkflowExecution(wsr.DescribeWorkflowExecutionRequest(
                    namespace="default", execution=common.WorkflowExecution(workflow_id=wid)), timeout=10)
                break
            except grpc.RpcError as err:
                last = (err.code(), err.details())
                if time.monotonic() > deadline:
                    raise AssertionError(f"gateway did not serve again within 30 s of the upstream's return: {last}")
                time.sleep(0.5)
        assert resp.workflow_execution_info.execution.workflow_id == wid  # same db: the workflow survived
    assert gw.proc.alive()
    # A brand-new client connection works too.
    with rig.channel(gw.address) as ch:
        assert describe_ns(service_pb2_grpc.WorkflowServiceStub(ch)).namespace_info.name == "default"
