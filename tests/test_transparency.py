"""With a recording upstream: what the client sends arrives byte for byte, what the upstream answers comes back unchanged."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest
from google.protobuf import any_pb2
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.errordetails.v1 import message_pb2 as errordetails
from temporalio.api.taskqueue.v1 import message_pb2 as tq
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr

import rig

START = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution"
MADE_UP = "/made.up.v1.BlobService/Put"

CLIENT_MD = (
    ("temporal-namespace", "default"),
    ("authorization", "Bearer test-token-123"),
    ("x-custom", "custom value / with spaces"),
    ("x-trace-bin", b"\x00\x01\x02\xff"),
)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def start_request_with_unknown_fields() -> bytes:
    req = wsr.StartWorkflowExecutionRequest(
        namespace="default", workflow_id=f"wf-{uuid.uuid4().hex[:8]}", workflow_type=common.WorkflowType(name="T"),
        task_queue=tq.TaskQueue(name="tq"), request_id=str(uuid.uuid4()),
        input=common.Payloads(payloads=[common.Payload(metadata={"encoding": b"json/plain"}, data=b'{"a": 1}')]))
    raw = req.SerializeToString()
    # Unknown top-level fields (a newer SDK), one of them repeated, plus a second copy of a known field.
    return raw + field_varint(9999, 42) + field_bytes(10000, b"future-field") + field_bytes(10000, b"again") + \
        field_bytes(3, common.WorkflowType(name="T").SerializeToString())


def status_details(code: grpc.StatusCode, message: str) -> bytes:
    """A serialized google.rpc.Status with a Temporal error detail (built by hand: no googleapis package needed)."""
    detail = any_pb2.Any()
    detail.Pack(errordetails.NotFoundFailure(current_cluster="active", active_cluster="active"))
    return field_varint(1, code.value[0]) + field_bytes(2, message.encode()) + field_bytes(3, detail.SerializeToString())


RESPONSE = wsr.StartWorkflowExecutionResponse(run_id="run-123", started=True).SerializeToString() + field_bytes(777, b"unknown-in-response")


def responder(method, request, context):
    if method.endswith("/Fail"):
        msg = "no such thing: é"
        context.set_trailing_metadata((("grpc-status-details-bin", status_details(grpc.StatusCode.NOT_FOUND, msg)),
                                       ("x-upstream-trailer", "t-err")))
        context.abort(grpc.StatusCode.NOT_FOUND, msg)
    context.send_initial_metadata((("x-upstream-header", "h1"),))
    context.set_trailing_metadata((("x-upstream-trailer", "t1"), ("x-upstream-trailer-bin", b"\xde\xad\xbe\xef")))
    if method == MADE_UP:
        return request[::-1]  # depends on the exact bytes received
    return RESPONSE


@pytest.fixture
def upstream():
    up = rig.RecordingUpstream(responder=responder).start()
    yield up
    up.stop()


@pytest.fixture
def gw(gateway_factory, upstream):
    return gateway_factory(upstream.address)


def md_dict(md) -> dict:
    return {k: v for k, v in (md or ())}


def assert_client_metadata_arrived(rec: rig.Recorded):
    got = md_dict(rec.metadata)
    for k, v in CLIENT_MD:
        assert got.get(k) == v, f"metadata {k!r}: sent {v!r}, upstream got {got.get(k)!r} (all: {rec.metadata})"


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
def test_start_request_with_unknown_fields_passes_byte_for_byte(gw, upstream, gzip):
    body = start_request_with_unknown_fields()
    with rig.channel(gw.address, compression=grpc.Compression.Gzip if gzip else None) as ch:
        resp, call = ch.unary_unary(START).with_call(body, metadata=CLIENT_MD, timeout=30)
    rec = upstream.last()
    assert rec.method == START
    assert rec.request == body
    assert_client_metadata_arrived(rec)
    assert resp == RESPONSE
    assert call.code() == grpc.StatusCode.OK
    assert md_dict(call.initial_metadata()).get("x-upstream-header") == "h1"
    trailers = md_dict(call.trailing_metadata())
    assert trailers.get("x-upstream-trailer") == "t1"
    assert trailers.get("x-upstream-trailer-bin") == b"\xde\xad\xbe\xef"


@pytest.mark.parametrize("size", [0, 1, 1000, 3_000_000])
def test_raw_blob_to_made_up_method(gw, upstream, size):
    blob = os.urandom(size)
    with rig.channel(gw.address) as ch:
        resp, call = ch.unary_unary(MADE_UP).with_call(blob, metadata=CLIENT_MD, timeout=30)
    rec = upstream.last()
    assert rec.method == MADE_UP
    assert rec.request == blob
    assert_client_metadata_arrived(rec)
    assert resp == blob[::-1]
    assert md_dict(call.trailing_metadata()).get("x-upstream-trailer") == "t1"


def test_gzip_blob_to_made_up_method(gw, upstream):
    blob = b"compress me please " * 100_000
    with rig.channel(gw.address, compression=grpc.Compression.Gzip) as ch:
        resp = ch.unary_unary(MADE_UP)(blob, metadata=CLIENT_MD, timeout=30)
    assert upstream.last().request == blob
    assert resp == blob[::-1]


def test_error_status_with_details_comes_back_unchanged(gw, upstream):
    method = "/temporal.api.workflowservice.v1.WorkflowService/Fail"
    with rig.channel(gw.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(method)(b"\x0a\x01x", metadata=CLIENT_MD, timeout=30)
    err = info.value
    assert upstream.last().request == b"\x0a\x01x"
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such thing: é"
    trailers = md_dict(err.trailing_metadata())
    assert trailers.get("grpc-status-details-bin") == status_details(grpc.StatusCode.NOT_FOUND, "no such thing: é")
    assert trailers.get("x-upstream-trailer") == "t-err"


def test_deadline_is_propagated_upstream(gw, upstream):
    with rig.channel(gw.address) as ch:
        ch.unary_unary(MADE_UP)(b"abc", timeout=30)
        rec = upstream.last()
        assert rec.time_remaining is not None, "upstream saw no deadline"
        assert 15 < rec.time_remaining <= 30.5, rec.time_remaining
        ch.unary_unary(MADE_UP)(b"abc")  # no deadline: the gateway must not invent a short one
        rec = upstream.last()
        assert rec.time_remaining is None or rec.time_remaining > 60, rec.time_remaining


def test_many_concurrent_requests(gw, upstream):
    from concurrent.futures import ThreadPoolExecutor

    blobs = [os.urandom(1000 + i) for i in range(64)]
    with rig.channel(gw.address) as ch:
        call = ch.unary_unary(MADE_UP)
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda b: call(b, timeout=30), blobs))
    assert results == [b[::-1] for b in blobs]
    assert sorted(r.request for r in upstream.records) == sorted(blobs)
