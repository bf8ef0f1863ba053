"""External storage end to end: large payloads go through the gateway with encryption,
compression and offload to a real S3 server (s3s-fs); the server's history holds only
references, the bucket only ciphertext; the Python SDK's own ExternalStorage + S3StorageDriver
interoperates both ways; forged references, tampered objects and an unreachable S3 fail with
the right statuses."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import DataConverter, ExternalStorage, PayloadCodec
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from raw_rpc import history_raw, start_raw

KEY = bytes(range(32))
KEY_ID = "k1"
MARKER = "PGW-PLAINTEXT-MARKER"
BUCKET = "pgw-test"
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"


def blob(n: int, seed: str) -> str:
    """`n` chars of hex (compresses only about 2:1) with the marker every 4 KiB."""
    hexdata = hashlib.shake_256(seed.encode()).hexdigest(n // 2 + 1)
    step = 4096
    return "".join(MARKER + hexdata[i:i + step - len(MARKER)] for i in range(0, n, step))[:n]


def digest(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@activity.defn
async def make_blob(n: int) -> str:
    return blob(n, "activity")


# Short workflow type and ids: s3s-fs keeps per-object bookkeeping in a file named after the
# base64 of bucket and key, so keys much above ~170 bytes (the SDK's keys carry the run id)
# fail there with "File name too long"; real S3 takes 1024-byte keys.
@workflow.defn(name="W")
class OffloadWorkflow:
    @workflow.run
    async def run(self, data: str) -> dict:
        out = await workflow.execute_activity(make_blob, 6 * 1024 * 1024, start_to_close_timeout=timedelta(seconds=120))
        return {"in_len": len(data), "in_sha": digest(data), "act_len": len(out), "act_sha": digest(out)}


EXPECTED_INPUT = blob(8 * 1024 * 1024, "input")
EXPECTED = {"in_len": len(EXPECTED_INPUT), "in_sha": digest(EXPECTED_INPUT), "act_len": 6 * 1024 * 1024,
            "act_sha": digest(blob(6 * 1024 * 1024, "activity"))}


class GatewayCodec(PayloadCodec):
    """The gateway's encryption format (AES-256-GCM, 12-byte nonce ‖ ciphertext ‖ tag of the
    serialized inner payload), no compression."""

    async def encode(self, payloads):
        out = []
        for p in payloads:
            nonce = os.urandom(12)
            ct = AESGCM(KEY).encrypt(nonce, p.SerializeToString(), None)
            out.append(Payload(metadata={"encoding": b"binary/encrypted", "encryption-key-id": KEY_ID.encode()}, data=nonce + ct))
        return out

    async def decode(self, payloads):
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != b"binary/encrypted":
                out.append(p)
                continue
            assert p.metadata["encryption-key-id"] == KEY_ID.encode()
            inner = Payload.FromString(AESGCM(KEY).decrypt(p.data[:12], p.data[12:], None))
            assert inner.metadata.get("encoding") != b"binary/zstd", "compression is off for interop"
            out.append(inner)
        return out


def gateway_config(gw: rig.Gateway, s3: rig.S3Server, compression: bool = True) -> dict:
    return {
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": KEY_ID, "keys": [{"id": KEY_ID, "env": "PGW_TEST_OFFLOAD_KEY"}]},
        "compression": {"enabled": compression},
        "storage": {
            "enabled": True,
            "driver": "aws.s3driver",
            "threshold": 256 * 1024,
            "drivers": [{"name": "aws.s3driver", "kind": "s3", "bucket": BUCKET, "endpoint": s3.endpoint,
                         "region": "us-east-1", "force_path_style": True, "timeout_ms": 5000}],
        },
    }


def start_gateway(gateway_factory, upstream: str, s3: rig.S3Server, compression: bool = True) -> rig.Gateway:
    gw = gateway_factory(upstream, config={}, start=False,
                         extra_env={"PGW_TEST_OFFLOAD_KEY": base64.b64encode(KEY).decode(),
                                    "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    return gw.configure(gateway_config(gw, s3, compression)).start()


def objects(s3: rig.S3Server) -> list[Path]:
    return [p for p in (s3.root / BUCKET).rglob("*") if p.is_file() and not p.name.startswith(".")]


async def sdk_converter(s3: rig.S3Server, stack):
    import aioboto3
    from botocore.config import Config as BotoConfig
    from temporalio.contrib.aws.s3driver import S3StorageDriver
    from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client

    client = await stack.enter_async_context(aioboto3.Session().client(
        "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required")))
    storage = ExternalStorage(drivers=[S3StorageDriver(client=new_aioboto3_client(client), bucket=BUCKET)])
    return dataclasses.replace(DataConverter.default, payload_codec=GatewayCodec(), external_storage=storage)


async def history_of(address: str, wf_id: str):
    direct = await Client.connect(address, namespace="default")
    return await direct.get_workflow_handle(wf_id).fetch_history()


def assert_only_references(history, min_refs: int) -> None:
    size = sum(e.ByteSize() for e in history.events)
    assert size < 200 * 1024, f"history is {size} bytes"
    refs = 0
    for e in history.events:
        for p in _payloads_of(e):
            if p.metadata.get("messageType") == REF_TYPE:
                refs += 1
                ref = json.loads(p.data)
                assert ref["driverName"] == "aws.s3driver"
                assert set(ref["claimData"]) == {"bucket", "key", "hash_algorithm", "hash_value"}
                assert len(p.external_payloads) == 1 and p.external_payloads[0].size_bytes > 256 * 1024
    assert refs >= min_refs, f"{refs} references in history"


def _payloads_of(event):
    a = event.workflow_execution_started_event_attributes
    if event.HasField("workflow_execution_started_event_attributes"):
        yield from a.input.payloads
    if event.HasField("activity_task_completed_event_attributes"):
        yield from event.activity_task_completed_event_attributes.result.payloads


async def run_workflow(client_addr: str, worker_addr: str, client_conv=None, worker_conv=None, wf_id=None):
    tq = f"offload-{uuid.uuid4().hex[:8]}"
    wf_id = wf_id or f"o-{uuid.uuid4().hex[:6]}"
    kw = {"data_converter": client_conv} if client_conv else {}
    client = await Client.connect(client_addr, namespace="default", **kw)
    wkw = {"data_converter": worker_conv} if worker_conv else {}
    worker_client = await Client.connect(worker_addr, namespace="default", **wkw)
    # Behind the gateway the SDK sees payloads before offload: its own 2 MB error limit must be off.
    async with Worker(worker_client, task_queue=tq, workflows=[OffloadWorkflow], activities=[make_blob],
                      workflow_runner=UnsandboxedWorkflowRunner(), disable_payload_error_limit=True):
        result = await client.execute_workflow(OffloadWorkflow.run, EXPECTED_INPUT, id=wf_id, task_queue=tq,
                                               execution_timeout=timedelta(seconds=240))
    return wf_id, result


def test_offload_through_gateway(temporal_server, gateway_factory, s3_server):
    gw = start_gateway(gateway_factory, temporal_server.address, s3_server)
    wf_id, result = asyncio.run(run_workflow(gw.address, gw.address))
    assert result == EXPECTED
    history = asyncio.run(history_of(temporal_server.address, wf_id))
    assert_only_references(history, min_refs=2)
    objs = objects(s3_server)
    assert len(objs) >= 2
    for o in objs:
        data = o.read_bytes()
        assert MARKER.encode() not in data, f"plaintext in {o}"
        assert b"binary/encrypted" in data
        assert str(o.relative_to(s3_server.root / BUCKET)).startswith("v0/ns/default/")


def test_interop_gateway_writes_sdk_reads(temporal_server, gateway_factory, s3_server):
    """Client through the gateway (offloads), worker straight to the server with the SDK's own
    ExternalStorage + S3StorageDriver and a codec in the gateway's format."""
    gw = start_gateway(gateway_factory, temporal_server.address, s3_server, compression=False)

    async def go():
        from contextlib import AsyncExitStack
        async with AsyncExitStack() as stack:
            conv = await sdk_converter(s3_server, stack)
            return await run_workflow(gw.address, temporal_server.address, worker_conv=conv)

    wf_id, result = asyncio.run(go())
    assert result == EXPECTED
    assert_only_references(asyncio.run(history_of(temporal_server.address, wf_id)), min_refs=2)
    for o in objects(s3_server):
        assert MARKER.encode() not in o.read_bytes()


def test_interop_sdk_writes_gateway_reads(temporal_server, gateway_factory, s3_server):
    """Client straight to the server with the SDK's ExternalStorage (it offloads), worker
    through the gateway (it resolves and decrypts what the SDK wrote)."""
    gw = start_gateway(gateway_factory, temporal_server.address, s3_server, compression=False)

    async def go():
        from contextlib import AsyncExitStack
        async with AsyncExitStack() as stack:
            conv = await sdk_converter(s3_server, stack)
            return await run_workflow(temporal_server.address, gw.address, client_conv=conv)

    wf_id, result = asyncio.run(go())
    assert result == EXPECTED
    assert_only_references(asyncio.run(history_of(temporal_server.address, wf_id)), min_refs=2)


def _reference(claim: dict) -> Payload:
    data = json.dumps({"claimData": claim, "driverName": "aws.s3driver"}, separators=(",", ":")).encode()
    p = Payload(metadata={"encoding": b"json/protobuf", "messageType": REF_TYPE}, data=data)
    p.external_payloads.add().size_bytes = 1000
    return p


def test_forged_references_are_refused(temporal_server, gateway_factory, s3_server):
    gw = start_gateway(gateway_factory, temporal_server.address, s3_server)
    secret = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(MARKER + " secret").encode()).SerializeToString()
    h = hashlib.sha256(secret).hexdigest()
    s3_server.make_bucket("other-bucket")
    placed = {
        "other namespace": (BUCKET, f"v0/ns/other/d/sha256/{h}"),
        "other bucket": ("other-bucket", f"v0/ns/default/d/sha256/{h}"),
        "dot-dot key": (BUCKET, f"v0/ns/default/../other/d/sha256/{h}"),
    }
    for bucket, key in placed.values():
        path = (s3_server.root / bucket / key).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secret)
    for what, (bucket, key) in placed.items():
        wf_id = f"forged-{uuid.uuid4().hex[:8]}"
        ref = _reference({"bucket": bucket, "key": key, "hash_algorithm": "sha256", "hash_value": h})
        asyncio.run(start_raw(temporal_server.address, wf_id, ref))
        with pytest.raises(RPCError) as err:
            asyncio.run(history_raw(gw.address, wf_id))
        assert err.value.status == RPCStatusCode.PERMISSION_DENIED, f"{what}: {err.value.status} {err.value}"
        assert MARKER not in str(err.value) and MARKER not in repr(err.value.raw_grpc_status)


def test_tampered_object_is_a_hash_mismatch(temporal_server, gateway_factory, s3_server):
    gw = start_gateway(gateway_factory, temporal_server.address, s3_server)
    wf_id = f"tamper-{uuid.uuid4().hex[:8]}"

    async def start():
        client = await Client.connect(gw.address, namespace="default")
        await client.start_workflow("Nobody", EXPECTED_INPUT, id=wf_id, task_queue=f"none-{uuid.uuid4().hex[:6]}")

    asyncio.run(start())
    [obj] = objects(s3_server)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    with pytest.raises(RPCError) as err:
        asyncio.run(history_raw(gw.address, wf_id))
    assert err.value.status == RPCStatusCode.DATA_LOSS, err.value
    assert "hash mismatch" in str(err.value)


def test_s3_unavailable_then_back(temporal_server, gateway_factory, s3_server):
    gw = start_gateway(gateway_factory, temporal_server.address, s3_server)
    s3_server.stop()
    wf_id = f"s3down-{uuid.uuid4().hex[:8]}"
    tq = f"offload-{uuid.uuid4().hex[:8]}"

    async def start(id_):
        client = await Client.connect(gw.address, namespace="default")
        return await client.start_workflow(OffloadWorkflow.run, EXPECTED_INPUT, id=id_, task_queue=tq,
                                           execution_timeout=timedelta(seconds=240))

    with pytest.raises(RPCError) as err:
        asyncio.run(start(wf_id))
    assert err.value.status == RPCStatusCode.UNAVAILABLE, err.value

    async def exists_on_server(id_):
        direct = await Client.connect(temporal_server.address, namespace="default")
        try:
            await direct.get_workflow_handle(id_).describe()
            return True
        except RPCError as e:
            assert e.status == RPCStatusCode.NOT_FOUND, e
            return False

    assert not asyncio.run(exists_on_server(wf_id)), "nothing may reach the server while S3 is down"

    # S3 back: the start goes through; S3 down again while the worker polls; back again: the
    # workflow continues (the lost workflow task is retried by the server after its timeout).
    s3_server.start()
    asyncio.run(start(wf_id))
    s3_server.stop()

    async def finish():
        client = await Client.connect(gw.address, namespace="default")
        async with Worker(client, task_queue=tq, workflows=[OffloadWorkflow], activities=[make_blob],
                          workflow_runner=UnsandboxedWorkflowRunner(), disable_payload_error_limit=True):
            await asyncio.sleep(3)
            s3_server.start()
            return await asyncio.wait_for(client.get_workflow_handle(wf_id).result(), timeout=120)

    assert asyncio.run(finish()) == EXPECTED
