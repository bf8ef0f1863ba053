"""Fail closed against an adversary (issue 13, SECURITY.md "Shapes forwarded without encryption").

Every case writes through the gateway (and, for what history can carry, directly to the
server) and then reads what reached the server *directly* — the server's history, or the raw
bytes a recording upstream received — asserting that no plaintext marker is there. Memory
cases assert the gateway's peak RSS (VmHWM) and that it still serves afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import struct
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import zstandard
from google.protobuf.any_pb2 import Any as AnyProto
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution, WorkflowType
from temporalio.api.nexus.v1 import Endpoint, EndpointSpec, EndpointTarget
from temporalio.api.operatorservice.v1 import CreateNexusEndpointRequest, GetNexusEndpointRequest
from temporalio.api.protocol.v1 import Message as ProtocolMessage
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    RespondWorkflowTaskCompletedRequest,
    SignalWorkflowExecutionRequest,
    StartWorkflowExecutionRequest,
)
from temporalio.api.workflowservice.v1 import service_pb2_grpc
from temporalio.client import Client
from temporalio.service import RPCError

import rig
from raw_rpc import history_raw, start_raw

MARKER = b"PGW-HOSTILE-PLAINTEXT-" + uuid.uuid4().hex[:8].upper().encode()
KEY = hashlib.sha256(b"pgw-hostile-key").digest()
KEY_ID = "hk1"
MiB = 1024 * 1024
START = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution"


# ----------------------------------------------------------------------------- helpers


def vm_hwm_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM")


def start_gateway(gateway_factory, upstream: str, **sections) -> rig.Gateway:
    """A gateway encrypting with KEY (from a variable) unless `sections` say otherwise."""
    return rig.encrypting_gateway(gateway_factory, upstream, KEY, "PGW_TEST_HOSTILE_KEY", KEY_ID, name="gw-hostile",
                                  extra_env={"RUST_LOG": "warn"},
                                  **rig.merge_sections({"compression": {"enabled": False}, "storage": {"enabled": False}},
                                                       sections))


def assert_served(gw: rig.Gateway) -> None:
    with rig.channel(gw.address) as ch:
        service_pb2_grpc.WorkflowServiceStub(ch).DescribeNamespace(DescribeNamespaceRequest(namespace="default"), timeout=10)


def assert_no_marker(blob: bytes, where: str) -> None:
    assert MARKER not in blob, f"plaintext marker reached the server: {where}"


async def history_bytes_at_server(server: str, wf_id: str) -> bytes:
    return (await history_raw(server, wf_id)).SerializeToString()


def input_payloads_at_server(server: str, wf_id: str) -> list[Payload]:
    history = asyncio.run(history_raw(server, wf_id))
    started = history.history.events[0].workflow_execution_started_event_attributes
    return list(started.input.payloads)


def marker_payload(**metadata: bytes) -> Payload:
    return Payload(metadata={"encoding": b"json/plain", **metadata}, data=b'"' + MARKER + b'"')


# ----------------------------------------------------------------------------- policy


def test_encryption_switched_on_for_one_namespace_only_applies(temporal_server, gateway_factory):
    """`[encryption] enabled = false` everywhere but `[namespaces.default] encryption = true`:
    the rewrite layer must exist and encrypt that namespace."""
    gw = start_gateway(gateway_factory, temporal_server.address,
                       encryption={"enabled": False},
                       namespaces={"default": {"encryption": True}})
    wf_id = f"ns-only-{uuid.uuid4().hex[:8]}"
    asyncio.run(start_raw(gw.address, wf_id, marker_payload()))
    blob = asyncio.run(history_bytes_at_server(temporal_server.address, wf_id))
    assert_no_marker(blob, "start input of a namespace that alone enables encryption")
    payloads = input_payloads_at_server(temporal_server.address, wf_id)
    assert [p.metadata["encoding"] for p in payloads] == [b"binary/encrypted"]
    # And the effective policy is shown by check-config.
    out = rig.run_gateway_once(None, gw.workdir, extra_env={"PGW_TEST_HOSTILE_KEY": base64.b64encode(KEY).decode()},
                               args=["check-config", str(gw.config_path)])
    assert out.returncode == 0, out.stderr
    assert f'default: encrypt with key "{KEY_ID}"' in out.stdout, out.stdout
    assert "NOT ENCRYPTED (exempt)" in out.stdout, out.stdout


# ----------------------------------------------------------------------------- look-alikes


def _reference_lookalikes() -> dict[str, Payload]:
    secret = MARKER.decode()
    return {
        "legacy form, extra field": Payload(
            metadata={"encoding": b"json/external-storage-reference"},
            data=json.dumps({"driver_name": "x", "driver_claim": {"claim_data": {}}, "s": secret}).encode()),
        "legacy form, configured driver, extra field": Payload(
            metadata={"encoding": b"json/external-storage-reference"},
            data=json.dumps({"driver_name": "local", "driver_claim": {"claim_data": {"key": secret}}, "s": secret}).encode()),
        "current form, unknown driver, secret in claim": Payload(
            metadata={"encoding": b"json/protobuf", "messageType": b"temporal.api.sdk.v1.ExternalStorageReference"},
            data=json.dumps({"driverName": "nobody", "claimData": {"secret": secret}}).encode()),
        "current form, configured driver, forged claim": Payload(
            metadata={"encoding": b"json/protobuf", "messageType": b"temporal.api.sdk.v1.ExternalStorageReference"},
            data=json.dumps({"driverName": "local", "claimData": {"key": secret, "hash_algorithm": "sha256",
                                                                  "hash_value": "0" * 64}}).encode()),
        "current form, extra metadata": Payload(
            metadata={"encoding": b"json/protobuf", "messageType": b"temporal.api.sdk.v1.ExternalStorageReference",
                      "note": MARKER},
            data=b'{"driverName":"local","claimData":{}}'),
        "marked reference with plaintext data": Payload(
            metadata={"encoding": b"json/plain", "__temporal_external_storage_reference": b"true"},
            data=b'"' + MARKER + b'"'),
        "system payload that cannot be opened": Payload(
            metadata={"encoding": b"binary/protobuf", "__temporal_system_payload": b"true",
                      "messageType": b"evil.v1.Unknown"},
            data=MARKER),
        "system payload without messageType": Payload(
            metadata={"encoding": b"binary/protobuf", "__temporal_system_payload": b"true"},
            data=MARKER),
    }


@pytest.mark.parametrize("storage", [False, True], ids=["no-storage", "filesystem-storage"])
def test_payloads_that_only_look_like_references_or_envelopes_are_encrypted(temporal_server, gateway_factory, tmp_path, storage):
    sections = {}
    if storage:
        sections["storage"] = {"enabled": True, "driver": "local", "threshold": 1 * MiB,
                               "drivers": [{"name": "local", "kind": "filesystem", "root": str(tmp_path / "objects")}]}
    gw = start_gateway(gateway_factory, temporal_server.address, **sections)
    for what, payload in _reference_lookalikes().items():
        wf_id = f"lookalike-{uuid.uuid4().hex[:8]}"
        asyncio.run(start_raw(gw.address, wf_id, payload))
        blob = asyncio.run(history_bytes_at_server(temporal_server.address, wf_id))
        assert_no_marker(blob, what)
        [stored] = input_payloads_at_server(temporal_server.address, wf_id)
        assert stored.metadata["encoding"] == b"binary/encrypted", f"{what}: {dict(stored.metadata)}"
        # The SDK side gets its payload back exactly.
        [back] = input_payloads_at_server(gw.address, wf_id)
        assert back == payload, what


def test_real_reference_of_a_configured_driver_still_passes_untouched(temporal_server, gateway_factory, tmp_path):
    """The strict recognition must not break SDK interop: a reference the gateway itself wrote
    (an SDK with the same driver writes the same) is forwarded as it is."""
    root = tmp_path / "objects"
    storage = {"enabled": True, "driver": "local", "threshold": 1024,
               "drivers": [{"name": "local", "kind": "filesystem", "root": str(root)}]}
    gw = start_gateway(gateway_factory, temporal_server.address, storage=storage)
    wf_id = f"realref-{uuid.uuid4().hex[:8]}"
    asyncio.run(start_raw(gw.address, wf_id, Payload(metadata={"encoding": b"binary/plain"}, data=os.urandom(64 * 1024))))
    [ref] = input_payloads_at_server(temporal_server.address, wf_id)
    assert ref.metadata["messageType"] == b"temporal.api.sdk.v1.ExternalStorageReference"
    # Re-send that exact reference through the gateway: it must stay a reference.
    wf2 = f"realref2-{uuid.uuid4().hex[:8]}"
    asyncio.run(start_raw(gw.address, wf2, ref))
    [stored] = input_payloads_at_server(temporal_server.address, wf2)
    assert stored == ref


# ----------------------------------------------------------------------------- what the gateway cannot see into


@pytest.fixture
def empty_answering_upstream():
    """A recording upstream answering every call with an empty message (valid for any type)."""
    up = rig.RecordingUpstream(responder=lambda method, request, context: b"").start()
    yield up
    up.stop()


def test_unknown_methods_and_any_types_are_refused_unless_listed(gateway_factory, empty_answering_upstream):
    up = empty_answering_upstream
    gw = start_gateway(gateway_factory, up.address)
    unknown_method = "/temporal.api.workflowservice.v1.WorkflowService/ExecuteSomethingNew"
    with rig.channel(gw.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(unknown_method)(b"\x0a\x07default\x12" + bytes([len(MARKER)]) + MARKER, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert unknown_method in err.value.details() and "forward_unknown_methods" in err.value.details(), err.value.details()
        # A request holding an Any of a type the descriptors do not know.
        request = RespondWorkflowTaskCompletedRequest(
            namespace="default", task_token=b"token",
            messages=[ProtocolMessage(id="m1", body=AnyProto(type_url="type.googleapis.com/evil.v1.Secret", value=MARKER))])
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted")(
                request.SerializeToString(), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "evil.v1.Secret" in err.value.details() and "forward_unknown_any_types" in err.value.details(), err.value.details()
        # Other services (health checks) pass.
        ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    for r in up.records:
        assert_no_marker(r.request, f"{r.method} reached the upstream")
    assert all(r.method == "/grpc.health.v1.Health/Check" for r in up.records), [r.method for r in up.records]
    # Listed: forwarded untouched (the explicit, visible opt-out).
    gw.stop()
    gw.config["encryption"]["forward_unknown_methods"] = [unknown_method]
    gw.config["encryption"]["forward_unknown_any_types"] = ["evil.v1.Secret"]
    gw.configure().start()
    with rig.channel(gw.address) as ch:
        ch.unary_unary(unknown_method)(b"\x0a\x07default", timeout=10)
        ch.unary_unary("/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted")(
            request.SerializeToString(), timeout=10)
    assert [r.method for r in up.records[-2:]] == [unknown_method, "/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=10).read().decode()
    assert 'pgw_policy_decisions_total{action="forwarded_unknown_method"} 1' in metrics, metrics
    assert 'pgw_policy_decisions_total{action="forwarded_unknown_any"} 1' in metrics, metrics


def test_namespace_less_requests_ignore_the_namespace_header(temporal_server, gateway_factory):
    """OperatorService Nexus endpoints have no namespace field: a `temporal-namespace` header
    naming an exempt namespace must not switch encryption off for their payloads."""
    gw = start_gateway(gateway_factory, temporal_server.address, namespaces={"exempt": {"encryption": False}})
    name = f"hostile-ep-{uuid.uuid4().hex[:8]}"
    spec = EndpointSpec(name=name, description=marker_payload(),
                        target=EndpointTarget(worker=EndpointTarget.Worker(namespace="default", task_queue="tq-hostile")))
    with rig.channel(gw.address) as ch:
        created = ch.unary_unary("/temporal.api.operatorservice.v1.OperatorService/CreateNexusEndpoint")(
            CreateNexusEndpointRequest(spec=spec).SerializeToString(), metadata=(("temporal-namespace", "exempt"),), timeout=20)
    from temporalio.api.operatorservice.v1 import CreateNexusEndpointResponse, GetNexusEndpointResponse
    endpoint_id = CreateNexusEndpointResponse.FromString(created).endpoint.id
    with rig.channel(temporal_server.address) as ch:
        raw = ch.unary_unary("/temporal.api.operatorservice.v1.OperatorService/GetNexusEndpoint")(
            GetNexusEndpointRequest(id=endpoint_id).SerializeToString(), timeout=20)
    assert_no_marker(raw, "Nexus endpoint description")
    at_server = GetNexusEndpointResponse.FromString(raw).endpoint.spec.description
    assert at_server.metadata["encoding"] == b"binary/encrypted"


# ----------------------------------------------------------------------------- memory


def test_many_gzip_frames_in_one_unary_request(temporal_server, gateway_factory):
    """64 gzip frames each inflating to 8 MiB: refused before the second is inflated."""
    gw = start_gateway(gateway_factory, temporal_server.address)
    eight = gzip.compress(b"\0" * (8 * MiB), compresslevel=9)
    body = b"".join(bytes([1]) + struct.pack(">I", len(eight)) + eight for _ in range(64))
    before = vm_hwm_mib(gw.proc.pid)
    # The second frame is refused at its first byte, while the client is still sending: a
    # trailers-only status, then RST_STREAM(NO_ERROR) (RFC 9113 8.1), which curl reports as a
    # stream error without the status; the raw h2 client reads the status.
    import h2raw
    got = h2raw.call(gw.address, START, body, encoding="gzip", timeout=60)
    after = vm_hwm_mib(gw.proc.pid)
    print(f"\n[gzip frames] {got} (reset {got.reset}); VmHWM {before} -> {after} MiB")
    assert got.code == "INVALID_ARGUMENT", got
    assert "bytes after its gRPC message" in got.grpc_message, got
    assert after - before < 200, f"64 gzip frames grew the gateway by {after - before} MiB"
    assert_served(gw)


def _zstd_bomb(size: int, declare_size: bool) -> bytes:
    cobj = zstandard.ZstdCompressor(level=3, write_content_size=declare_size).compressobj(size=size if declare_size else -1)
    parts = [cobj.compress(b"\0" * MiB) for _ in range(size // MiB)]
    parts.append(cobj.flush())
    return b"".join(parts)


@pytest.mark.parametrize("declare_size", [True, False], ids=["declared", "undeclared"])
def test_zstd_bombs_in_history_stay_within_the_message_budget(temporal_server, gateway_factory, declare_size):
    """8 payloads `binary/zstd` each inflating to 256 MiB, written directly to the server; read
    through a gateway with the default limits: an error, VmHWM under 700 MiB, still serving.
    Declared content sizes are refused before allocating; undeclared ones grow the output step
    by step until the message budget (256 MiB by default) runs out."""
    gw = start_gateway(gateway_factory, temporal_server.address)
    bomb = _zstd_bomb(256 * MiB, declare_size)
    wf_id = f"zbombs-{uuid.uuid4().hex[:8]}"

    async def write():
        client = await Client.connect(temporal_server.address, namespace="default")
        await client.workflow_service.start_workflow_execution(StartWorkflowExecutionRequest(
            namespace="default", workflow_id=wf_id, workflow_type=WorkflowType(name="Nobody"),
            task_queue=TaskQueue(name=f"none-{uuid.uuid4().hex[:6]}"), request_id=str(uuid.uuid4()),
            input=Payloads(payloads=[Payload(metadata={"encoding": b"binary/zstd"}, data=bomb) for _ in range(8)])))

    asyncio.run(write())
    with pytest.raises(RPCError) as err:
        asyncio.run(history_raw(gw.address, wf_id))
    peak = vm_hwm_mib(gw.proc.pid)
    print(f"\n[zstd bombs, declared={declare_size}] {err.value.status.name}: {err.value}; gateway VmHWM {peak} MiB")
    assert "max_message_bytes" in str(err.value) or "exceeds" in str(err.value), err.value
    assert peak < 700, f"gateway peaked at {peak} MiB decoding 8 x 256 MiB bombs"
    assert_served(gw)


def test_reference_fan_out_is_refused_before_fetching(temporal_server, gateway_factory, tmp_path):
    """A signal of thousands of references to one large stored object: refused from the sizes
    the references declare, before anything is fetched; the gateway stays small."""
    storage = {"enabled": True, "driver": "local", "threshold": 256 * 1024,
               "drivers": [{"name": "local", "kind": "filesystem", "root": str(tmp_path / "objects")}]}
    gw = start_gateway(gateway_factory, temporal_server.address, storage=storage)
    wf_id = f"fanout-{uuid.uuid4().hex[:8]}"
    asyncio.run(start_raw(gw.address, wf_id, Payload(metadata={"encoding": b"binary/plain"}, data=os.urandom(20 * MiB))))
    [ref] = input_payloads_at_server(temporal_server.address, wf_id)
    assert ref.external_payloads[0].size_bytes > 20 * MiB

    async def signal():
        client = await Client.connect(temporal_server.address, namespace="default")
        await client.workflow_service.signal_workflow_execution(SignalWorkflowExecutionRequest(
            namespace="default", workflow_execution=WorkflowExecution(workflow_id=wf_id), signal_name="fan",
            input=Payloads(payloads=[ref] * 4000), request_id=str(uuid.uuid4())))

    asyncio.run(signal())
    before = vm_hwm_mib(gw.proc.pid)
    with pytest.raises(RPCError) as err:
        asyncio.run(history_raw(gw.address, wf_id))
    after = vm_hwm_mib(gw.proc.pid)
    print(f"\n[fan-out] {err.value.status.name}: {err.value}; VmHWM {before} -> {after} MiB")
    assert "storage references declaring" in str(err.value), err.value
    assert after - before < 100, f"4,000 references grew the gateway by {after - before} MiB"
    assert_served(gw)


def test_process_wide_inflight_budget_answers_resource_exhausted(temporal_server, gateway_factory):
    gw = start_gateway(gateway_factory, temporal_server.address, proxy={"max_inflight_bytes": 8 * MiB})
    request = StartWorkflowExecutionRequest(
        namespace="default", workflow_id=f"budget-{uuid.uuid4().hex[:8]}", workflow_type=WorkflowType(name="Nobody"),
        task_queue=TaskQueue(name="tq-nobody"), request_id=str(uuid.uuid4()),
        input=Payloads(payloads=[Payload(metadata={"encoding": b"binary/plain"}, data=MARKER * (10 * MiB // len(MARKER)))]))
    with rig.channel(gw.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(START)(request.SerializeToString(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "proxy.max_inflight_bytes" in err.value.details(), err.value.details()
    assert_served(gw)


def test_metrics_labels_stay_bounded(gateway_factory, recording_upstream):
    gw = start_gateway(gateway_factory, recording_upstream.address)
    with rig.channel(gw.address) as ch:
        for i in range(300):
            ch.unary_unary(f"/made.up.v1.Service/Method{i}")(b"", timeout=10)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=10).read().decode()
    assert "Method1" not in metrics
    assert 'method="unknown"' in metrics
    assert len(metrics) < 200_000
