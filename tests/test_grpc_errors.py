"""gRPC statuses from the upstream reach the client unchanged: gateway vs direct, code and message."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.query.v1 import message_pb2 as query_pb
from temporalio.api.taskqueue.v1 import message_pb2 as tq
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.api.workflowservice.v1 import service_pb2_grpc

import rig


def outcome(fn):
    """(code, details, grpc-status-details-bin) of a call that is expected to fail."""
    try:
        fn()
    except grpc.RpcError as err:
        bin_details = [v for k, v in (err.trailing_metadata() or ()) if k == "grpc-status-details-bin"]
        return err.code(), err.details(), bin_details
    pytest.fail("call succeeded but an error status was expected")


def both(temporal_server, gateway, call):
    """Run call(stub, channel) direct and through the gateway; returns (direct, through)."""
    results = []
    for address in (temporal_server.address, gateway.address):
        with rig.channel(address) as ch:
            stub = service_pb2_grpc.WorkflowServiceStub(ch)
            results.append(outcome(lambda: call(stub, ch)))
    return results


def start_req(workflow_id: str, **kw) -> wsr.StartWorkflowExecutionRequest:
    return wsr.StartWorkflowExecutionRequest(
        namespace="default", workflow_id=workflow_id, workflow_type=common.WorkflowType(name="NoWorkerType"),
        task_queue=tq.TaskQueue(name="tq-nobody-polls"), request_id=str(uuid.uuid4()), **kw)


def test_unknown_service_is_upstream_unimplemented(temporal_server, gateway):
    direct, through = both(temporal_server, gateway,
                           lambda stub, ch: ch.unary_unary("/made.up.v1.NoSuchService/NoSuchMethod")(b"\x08\x01", timeout=10))
    assert direct[0] == grpc.StatusCode.UNIMPLEMENTED
    assert "made.up.v1.NoSuchService" in direct[1]  # the upstream's own message
    assert through == direct


def test_unknown_method_on_known_service_is_upstream_unimplemented(temporal_server, gateway):
    method = "/temporal.api.workflowservice.v1.WorkflowService/NoSuchMethod"
    direct, through = both(temporal_server, gateway, lambda stub, ch: ch.unary_unary(method)(b"", timeout=10))
    assert direct[0] == grpc.StatusCode.UNIMPLEMENTED
    assert through == direct


def test_not_found(temporal_server, gateway):
    wid = f"does-not-exist-{uuid.uuid4().hex}"
    req = wsr.DescribeWorkflowExecutionRequest(namespace="default", execution=common.WorkflowExecution(workflow_id=wid))
    direct, through = both(temporal_server, gateway, lambda stub, ch: stub.DescribeWorkflowExecution(req, timeout=10))
    assert direct[0] == grpc.StatusCode.NOT_FOUND
    assert wid in direct[1]
    assert direct[2], "server sent no grpc-status-details-bin"
    assert through == direct


def test_namespace_not_found(temporal_server, gateway):
    req = wsr.DescribeNamespaceRequest(namespace=f"no-such-ns-{uuid.uuid4().hex[:8]}")
    direct, through = both(temporal_server, gateway, lambda stub, ch: stub.DescribeNamespace(req, timeout=10))
    assert direct[0] == grpc.StatusCode.NOT_FOUND
    assert through == direct


def test_already_exists(temporal_server, gateway):
    wid = f"dup-{uuid.uuid4().hex}"
    with rig.channel(temporal_server.address) as ch:
        service_pb2_grpc.WorkflowServiceStub(ch).StartWorkflowExecution(start_req(wid), timeout=10)
    # The second start (new request id) of the same id, direct and through the gateway: same error.
    direct, through = both(temporal_server, gateway, lambda stub, ch: stub.StartWorkflowExecution(start_req(wid), timeout=10))
    assert direct[0] == grpc.StatusCode.ALREADY_EXISTS
    assert wid in direct[1]
    assert direct[2], "server sent no grpc-status-details-bin (WorkflowExecutionAlreadyStartedFailure)"
    assert through == direct


def test_invalid_argument(temporal_server, gateway):
    bad = wsr.StartWorkflowExecutionRequest(namespace="default", workflow_id=f"inv-{uuid.uuid4().hex}",
                                            task_queue=tq.TaskQueue(name="x"), request_id=str(uuid.uuid4()))
    direct, through = both(temporal_server, gateway, lambda stub, ch: stub.StartWorkflowExecution(bad, timeout=10))
    assert direct[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "WorkflowType" in direct[1]
    assert through == direct


def test_failed_precondition_short_long_poll(temporal_server, gateway):
    """A long poll with a 1 s deadline: the server refuses it ('Context timeout is too short.').

    Also proves the gateway passes the client's deadline (grpc-timeout) upstream.
    """
    req = wsr.PollWorkflowTaskQueueRequest(namespace="default", task_queue=tq.TaskQueue(name=f"tq-{uuid.uuid4().hex[:8]}"))
    direct, through = both(temporal_server, gateway, lambda stub, ch: stub.PollWorkflowTaskQueue(req, timeout=1))
    assert direct[0] == grpc.StatusCode.FAILED_PRECONDITION, direct
    assert through == direct


def test_deadline_exceeded_from_server(temporal_server, gateway):
    """A query to a workflow nobody works on: the server holds it until the deadline passes."""
    wid = f"dl-{uuid.uuid4().hex}"
    with rig.channel(temporal_server.address) as ch:
        service_pb2_grpc.WorkflowServiceStub(ch).StartWorkflowExecution(start_req(wid), timeout=10)
    req = wsr.QueryWorkflowRequest(namespace="default", execution=common.WorkflowExecution(workflow_id=wid),
                                   query=query_pb.WorkflowQuery(query_type="state"))
    for address in (temporal_server.address, gateway.address):
        with rig.channel(address) as ch:
            stub = service_pb2_grpc.WorkflowServiceStub(ch)
            t0 = time.monotonic()
            code, details, _ = outcome(lambda: stub.QueryWorkflow(req, timeout=3))
            took = time.monotonic() - t0
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (address, code, details)
        assert 2.5 < took < 10, (address, took)


@pytest.mark.parametrize("code,message", [
    (grpc.StatusCode.DEADLINE_EXCEEDED, "upstream: deadline exceeded while waiting for history"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "namespace rate limit exceeded"),
    (grpc.StatusCode.PERMISSION_DENIED, "Request unauthorized."),
    (grpc.StatusCode.INTERNAL, "boom \u2013 non-ASCII \u00e9 message"),
])
def test_upstream_status_passes_unchanged(gateway_factory, code, message):
    """Statuses an upstream returns without the client having set a deadline come back unchanged."""
    def responder(method, request, context):
        context.abort(code, message)

    up = rig.RecordingUpstream(responder=responder).start()
    try:
        gw = gateway_factory(up.address)
        with rig.channel(gw.address) as ch:
            got = outcome(lambda: ch.unary_unary("/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo")(b"", timeout=20))
        with rig.channel(up.address) as ch:
            ref = outcome(lambda: ch.unary_unary("/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo")(b"", timeout=20))
    finally:
        up.stop()
    assert ref[:2] == (code, message)
    assert got == ref
