"""Big and gzip-compressed requests pass through the gateway intact."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.enums.v1 import event_type_pb2
from temporalio.api.taskqueue.v1 import message_pb2 as tq
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.api.workflowservice.v1 import service_pb2_grpc

import rig

SIZE = 1_500_000


def compressible(n: int) -> bytes:
    line = b'{"order": 12345, "sku": "ABC-123", "qty": 7, "note": "payload gateway"}\n'
    return (line * (n // len(line) + 1))[:n]


def incompressible(n: int) -> bytes:
    return os.urandom(n)


def read_back_input(address: str, workflow_id: str, run_id: str) -> common.Payloads:
    with rig.channel(address) as ch:
        stub = service_pb2_grpc.WorkflowServiceStub(ch)
        hist = stub.GetWorkflowExecutionHistory(wsr.GetWorkflowExecutionHistoryRequest(
            namespace="default", execution=common.WorkflowExecution(workflow_id=workflow_id, run_id=run_id)), timeout=30)
    first = hist.history.events[0]
    assert first.event_type == event_type_pb2.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    return first.workflow_execution_started_event_attributes.input


@pytest.mark.parametrize("kind", ["compressible", "incompressible"])
@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "identity"])
def test_large_start_workflow_request(temporal_server, gateway, kind, gzip):
    data = compressible(SIZE) if kind == "compressible" else incompressible(SIZE)
    payload = common.Payload(metadata={"encoding": b"binary/plain", "x-test": kind.encode()}, data=data)
    wid = f"big-{kind}-{'gz' if gzip else 'id'}-{uuid.uuid4().hex[:8]}"
    req = wsr.StartWorkflowExecutionRequest(
        namespace="default", workflow_id=wid, workflow_type=common.WorkflowType(name="BigInput"),
        task_queue=tq.TaskQueue(name="tq-nobody-polls"), input=common.Payloads(payloads=[payload]),
        request_id=str(uuid.uuid4()))
    assert req.ByteSize() > SIZE
    with rig.channel(gateway.address, compression=grpc.Compression.Gzip if gzip else None) as ch:
        stub = service_pb2_grpc.WorkflowServiceStub(ch)
        resp = stub.StartWorkflowExecution(req, timeout=60)
    assert resp.run_id
    got = read_back_input(temporal_server.address, wid, resp.run_id)
    assert len(got.payloads) == 1
    assert got.payloads[0].data == data
    assert dict(got.payloads[0].metadata) == dict(payload.metadata)


def test_large_gzip_response(temporal_server, gateway):
    """A ~1.5 MB response (history) read back through the gateway (grpcio advertises gzip in grpc-accept-encoding)."""
    data = compressible(SIZE)
    wid = f"big-resp-{uuid.uuid4().hex[:8]}"
    req = wsr.StartWorkflowExecutionRequest(
        namespace="default", workflow_id=wid, workflow_type=common.WorkflowType(name="BigInput"),
        task_queue=tq.TaskQueue(name="tq-nobody-polls"),
        input=common.Payloads(payloads=[common.Payload(metadata={"encoding": b"binary/plain"}, data=data)]),
        request_id=str(uuid.uuid4()))
    with rig.channel(temporal_server.address) as ch:
        run_id = service_pb2_grpc.WorkflowServiceStub(ch).StartWorkflowExecution(req, timeout=60).run_id
    got = read_back_input(gateway.address, wid, run_id)
    assert got.payloads[0].data == data
