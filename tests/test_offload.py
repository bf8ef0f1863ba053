"""External storage end to end: large payloads go through the gateway with encryption,
compression and offload to a real store; the server's history holds only references, the
bucket only ciphertext; forged references, tampered objects and an unreachable store fail with
the right statuses. The workflow suite runs once per store kind (`store` fixture): S3 (s3s-fs),
GCS (fake-gcs-server) and Azure Blob Storage (Azurite). The Python SDK's own ExternalStorage +
S3StorageDriver interoperates both ways (GCS interop: test_gcs_interop.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import DataConverter, ExternalStorage, PayloadCodec
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from conftest import _attach
from raw_rpc import history_raw, start_raw
from test_features_nexus import nexus_server  # noqa: F401  (fixture: a dev server with Nexus on)

KEY = bytes(range(32))
KEY_ID = "k1"
MARKER = "PGW-PLAINTEXT-MARKER"
BUCKET = "pgw-test"
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"


class Store:
    """One store kind as the tests see it: the gateway's driver settings and environment, and
    direct access to the emulator's objects (never through a driver)."""

    kind: str
    driver: str  # driver name written into references
    bucket_field: str
    key_field: str

    def driver_config(self, bucket: str = BUCKET, timeout_ms: int = 5000) -> dict:
        raise NotImplementedError

    def env(self) -> dict:
        return {}

    def make_bucket(self, name: str) -> None:
        raise NotImplementedError

    def names(self, bucket: str = BUCKET) -> list[str]:
        raise NotImplementedError

    def get(self, name: str, bucket: str = BUCKET) -> bytes:
        raise NotImplementedError

    def put(self, name: str, data: bytes, bucket: str = BUCKET) -> None:
        raise NotImplementedError

    def objects(self, bucket: str = BUCKET) -> dict[str, bytes]:
        return {n: self.get(n, bucket) for n in self.names(bucket)}

    @property
    def claim_keys(self) -> set[str]:
        return {self.bucket_field, self.key_field, "hash_algorithm", "hash_value"}

    def storage_section(self, threshold: int = 256 * 1024, timeout_ms: int = 5000) -> dict:
        return {"enabled": True, "driver": self.driver, "threshold": threshold,
                "drivers": [self.driver_config(timeout_ms=timeout_ms)]}


class S3Store(Store):
    kind, driver, bucket_field, key_field = "s3", "aws.s3driver", "bucket", "key"

    def __init__(self, server: rig.S3Server):
        self.server = server

    def driver_config(self, bucket: str = BUCKET, timeout_ms: int = 5000) -> dict:
        return {"name": self.driver, "kind": "s3", "bucket": bucket, "endpoint": self.server.endpoint,
                "region": "us-east-1", "force_path_style": True, "timeout_ms": timeout_ms}

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.server.access_key, "AWS_SECRET_ACCESS_KEY": self.server.secret_key}

    def make_bucket(self, name: str) -> None:
        self.server.make_bucket(name)

    def names(self, bucket: str = BUCKET) -> list[str]:
        root = self.server.root / bucket
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]

    def get(self, name: str, bucket: str = BUCKET) -> bytes:
        return (self.server.root / bucket / name).read_bytes()

    def put(self, name: str, data: bytes, bucket: str = BUCKET) -> None:
        path = (self.server.root / bucket / name).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class GcsStore(Store):
    kind, driver, bucket_field, key_field = "gcs", "gcp.gcsdriver", "bucket", "object_name"

    def __init__(self, server: rig.GcsServer):
        self.server = server

    def driver_config(self, bucket: str = BUCKET, timeout_ms: int = 5000) -> dict:
        return {"name": self.driver, "kind": "gcs", "bucket": bucket, "endpoint": self.server.endpoint,
                "anonymous": True, "timeout_ms": timeout_ms}

    def make_bucket(self, name: str) -> None:
        self.server.make_bucket(name)

    def names(self, bucket: str = BUCKET) -> list[str]:
        return self.server.list(bucket)

    def get(self, name: str, bucket: str = BUCKET) -> bytes:
        return self.server.get(bucket, name)

    def put(self, name: str, data: bytes, bucket: str = BUCKET) -> None:
        self.server.put(bucket, name, data)


class AzureStore(Store):
    kind, driver, bucket_field, key_field = "azure", "azure.blobdriver", "container", "blob_name"

    def __init__(self, server: rig.AzuriteServer):
        self.server = server

    def driver_config(self, bucket: str = BUCKET, timeout_ms: int = 5000) -> dict:
        return {"name": self.driver, "kind": "azure", "account": self.server.account, "container": bucket,
                "endpoint": self.server.endpoint, "timeout_ms": timeout_ms}

    def env(self) -> dict:
        return {"AZURE_STORAGE_ACCOUNT_KEY": self.server.key}

    def make_bucket(self, name: str) -> None:
        self.server.make_container(name)

    def names(self, bucket: str = BUCKET) -> list[str]:
        return self.server.list(bucket)

    def get(self, name: str, bucket: str = BUCKET) -> bytes:
        return self.server.get(bucket, name)

    def put(self, name: str, data: bytes, bucket: str = BUCKET) -> None:
        self.server.put(bucket, name, data)


def start_store(kind: str, workdir: Path, request):
    """Starts the emulator of `kind` with bucket BUCKET; returns (Store, emulator)."""
    if kind == "s3":
        server = rig.S3Server(rig.new_tmpdir(workdir, "s3-"))
        server.make_bucket(BUCKET)
        server.start()
        store = S3Store(server)
    elif kind == "gcs":
        server = rig.GcsServer(rig.new_tmpdir(workdir, "gcs-")).start()
        store = GcsStore(server)
    else:
        server = rig.AzuriteServer(rig.new_tmpdir(workdir, "azurite-")).start()
        store = AzureStore(server)
    _attach(request, server.proc)
    if kind != "s3":
        try:
            store.make_bucket(BUCKET)
        except BaseException:
            server.stop()
            raise
    return store, server


@pytest.fixture(params=["s3", "gcs", "azure"])
def store(request, workdir):
    """Each store kind in turn, its emulator started for the test and stopped after it."""
    st, server = start_store(request.param, workdir, request)
    yield st
    server.stop()


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


def start_gateway(gateway_factory, upstream: str, store, compression: bool = True) -> rig.Gateway:
    if isinstance(store, rig.S3Server):
        store = S3Store(store)
    return rig.encrypting_gateway(gateway_factory, upstream, KEY, "PGW_TEST_OFFLOAD_KEY", KEY_ID, extra_env=store.env(),
                                  compression={"enabled": compression}, storage=store.storage_section())


def objects(s3: rig.S3Server) -> list[Path]:
    return [p for p in (s3.root / BUCKET).rglob("*") if p.is_file() and not p.name.startswith(".")]


def assert_ciphertext_only(store: Store, min_objects: int = 1) -> dict[str, bytes]:
    """Every object in the bucket is an encrypted payload under `v0/ns/default/`."""
    objs = store.objects()
    assert len(objs) >= min_objects, f"{len(objs)} objects in the {store.kind} bucket"
    for name, data in objs.items():
        assert MARKER.encode() not in data, f"plaintext in {store.kind} object {name}"
        assert Payload.FromString(data).metadata.get("encoding") == b"binary/encrypted", name
        assert name.startswith("v0/ns/default/"), name
    return objs


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


def assert_only_references(history, min_refs: int, store: Optional[Store] = None) -> int:
    store = store or S3Store(None)
    size = sum(e.ByteSize() for e in history.events)
    assert size < 200 * 1024, f"history is {size} bytes"
    assert MARKER.encode() not in b"".join(e.SerializeToString() for e in history.events)
    refs = 0
    for e in history.events:
        for p in _payloads_of(e):
            if p.metadata.get("messageType") == REF_TYPE:
                refs += 1
                ref = json.loads(p.data)
                assert ref["driverName"] == store.driver
                assert set(ref["claimData"]) == store.claim_keys
                assert len(p.external_payloads) == 1 and p.external_payloads[0].size_bytes > 256 * 1024
    assert refs >= min_refs, f"{refs} references in history"
    return refs


def _payloads_of(event):
    a = event.workflow_execution_started_event_attributes
    if event.HasField("workflow_execution_started_event_attributes"):
        yield from a.input.payloads
    if event.HasField("activity_task_completed_event_attributes"):
        yield from event.activity_task_completed_event_attributes.result.payloads
    if event.HasField("workflow_execution_signaled_event_attributes"):
        yield from event.workflow_execution_signaled_event_attributes.input.payloads
    if event.HasField("workflow_execution_continued_as_new_event_attributes"):
        yield from event.workflow_execution_continued_as_new_event_attributes.input.payloads


async def run_workflow(client_addr: str, worker_addr: str, client_conv=None, worker_conv=None, wf_id=None):
    tq = f"offload-{uuid.uuid4().hex[:8]}"
    wf_id = wf_id or f"o-{uuid.uuid4().hex[:6]}"
    kw = {"data_converter": client_conv} if client_conv else {}
    client = await Client.connect(client_addr, namespace="default", **kw)
    wkw = {"data_converter": worker_conv} if worker_conv else {}
    worker_client = await Client.connect(worker_addr, namespace="default", **wkw)
    async with Worker(worker_client, task_queue=tq, workflows=[OffloadWorkflow], activities=[make_blob],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        result = await client.execute_workflow(OffloadWorkflow.run, EXPECTED_INPUT, id=wf_id, task_queue=tq,
                                               execution_timeout=timedelta(seconds=240))
    return wf_id, result


def test_offload_through_gateway(temporal_server, gateway_factory, store):
    """Start input (8 MB) and activity result (6 MB) offloaded to each store kind."""
    gw = start_gateway(gateway_factory, temporal_server.address, store)
    wf_id, result = asyncio.run(run_workflow(gw.address, gw.address))
    assert result == EXPECTED
    history = asyncio.run(history_of(temporal_server.address, wf_id))
    assert_only_references(history, min_refs=2, store=store)
    assert_ciphertext_only(store, min_objects=2)


PARTS_LEN = 16 * 1024 * 1024  # hex: ~8 MiB stored after compression, two 5 MiB parts


@activity.defn
async def make_hex(n: int) -> str:
    return hashlib.shake_256(b"parts").hexdigest(n // 2)


@workflow.defn(name="P")
class PartsWorkflow:
    @workflow.run
    async def run(self, data: str) -> dict:
        out = await workflow.execute_activity(make_hex, PARTS_LEN, start_to_close_timeout=timedelta(seconds=120))
        return {"in_sha": digest(data), "act_sha": digest(out)}


def test_s3_part_uploads_through_gateway(temporal_server, gateway_factory, s3_server):
    """S3 multipart uploads on (`part_upload_threshold`): the activity result (a task-token
    request: key `v0/ns/default/d/sha256/...`) goes up in parts, the start input (a workflow
    key past what s3s-fs can name a multipart upload for: 46-character workflow id) as one
    PutObject; both read back through the gateway, and nothing of an upload is left."""
    store = S3Store(s3_server)
    section = store.storage_section()
    section["drivers"][0].update(part_upload_threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024,
                                 part_concurrency=4)
    gw = rig.encrypting_gateway(gateway_factory, temporal_server.address, KEY, "PGW_TEST_OFFLOAD_KEY", KEY_ID,
                                extra_env=store.env(), compression={"enabled": True}, storage=section)
    data = hashlib.shake_256(b"input").hexdigest(PARTS_LEN // 2)
    wf_id = "parts-" + uuid.uuid4().hex + "abcdef12"  # 46 characters

    async def run() -> dict:
        tq = f"parts-{uuid.uuid4().hex[:8]}"
        client = await Client.connect(gw.address, namespace="default")
        async with Worker(client, task_queue=tq, workflows=[PartsWorkflow], activities=[make_hex],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            return await client.execute_workflow(PartsWorkflow.run, data, id=wf_id, task_queue=tq,
                                                 execution_timeout=timedelta(seconds=240))

    result = asyncio.run(run())
    assert result == {"in_sha": digest(data), "act_sha": digest(hashlib.shake_256(b"parts").hexdigest(PARTS_LEN // 2))}
    # s3s-fs keeps each object's ETag in `.bucket-{b64}.object-{b64}.internal.json`; a multipart
    # upload's ends in `-{parts}`.
    etags = {}
    for info in s3_server.root.glob(".bucket-*.internal.json"):
        etags[info.name] = json.loads(info.read_text()).get("e_tag", "")
    big = [e for e in etags.values() if e]
    assert any(e.endswith("-2") for e in big), etags
    assert any("-" not in e for e in big), etags
    left = [p.name for p in s3_server.root.iterdir()
            if p.name.startswith(".upload_id-") or (".upload-" in p.name and p.name.endswith(".metadata.json"))]
    assert left == [], left
    assert_ciphertext_only(store, min_objects=2)


SIGNAL_LEN = QUERY_LEN = STATE_LEN = 800_000  # ~400 KB after compression: above the threshold


@workflow.defn(name="S")
class SuiteWorkflow:
    """Round 0 waits for a large signal, then continues as new with a large state built from
    it; round 1 returns digests. A large query result is served in both rounds."""

    def __init__(self) -> None:
        self.signal_data: Optional[str] = None

    @workflow.run
    async def run(self, state: str, round_: int) -> dict:
        if round_ == 0:
            await workflow.wait_condition(lambda: self.signal_data is not None)
            workflow.continue_as_new(args=[self.signal_data[::-1], 1])
        await workflow.wait_condition(lambda: self.signal_data is not None)
        return {"round": round_, "state_sha": digest(state), "signal_sha": digest(self.signal_data)}

    @workflow.signal
    def big(self, data: str) -> None:
        self.signal_data = data

    @workflow.query
    def peek(self) -> str:
        return blob(QUERY_LEN, "query")


def test_workflow_suite_signal_query_continue_as_new(temporal_server, gateway_factory, store):
    """Signal input, query result and continue-as-new state, each large, through each store."""
    gw = start_gateway(gateway_factory, temporal_server.address, store)
    wf_id, tq = f"suite-{uuid.uuid4().hex[:6]}", f"suite-{uuid.uuid4().hex[:8]}"
    sig1, sig2 = blob(SIGNAL_LEN, "signal-1"), blob(SIGNAL_LEN, "signal-2")

    async def go():
        client = await Client.connect(gw.address, namespace="default")
        async with Worker(client, task_queue=tq, workflows=[SuiteWorkflow], workflow_runner=UnsandboxedWorkflowRunner()):
            handle = await client.start_workflow(SuiteWorkflow.run, args=[blob(STATE_LEN, "state-0"), 0], id=wf_id,
                                                 task_queue=tq, execution_timeout=timedelta(seconds=120))
            before = len(store.names())
            assert await handle.query(SuiteWorkflow.peek) == blob(QUERY_LEN, "query")
            assert len(store.names()) > before, "the query result was not offloaded"
            await handle.signal(SuiteWorkflow.big, sig1)
            # The continued run: its input is the state built from the first signal.
            latest = client.get_workflow_handle(wf_id)
            while (await latest.describe()).run_id == handle.first_execution_run_id:
                await asyncio.sleep(0.2)
            await latest.signal(SuiteWorkflow.big, sig2)
            return handle.first_execution_run_id, await latest.result()

    first_run, result = asyncio.run(go())
    assert result == {"round": 1, "state_sha": digest(sig1[::-1]), "signal_sha": digest(sig2)}

    async def histories():
        direct = await Client.connect(temporal_server.address, namespace="default")
        return (await direct.get_workflow_handle(wf_id, run_id=first_run).fetch_history(),
                await direct.get_workflow_handle(wf_id).fetch_history())

    first, second = asyncio.run(histories())
    # First run: input, signal, continue-as-new input; second run: input (the state), signal.
    assert assert_only_references(first, min_refs=3, store=store) >= 3
    assert assert_only_references(second, min_refs=2, store=store) >= 2
    assert_ciphertext_only(store, min_objects=5)


def test_nexus_across_namespaces(nexus_server, gateway_factory, store):
    """Nexus from namespace A to a handler in B with payloads offloaded both ways to each store
    kind; each namespace resolves the other's objects only by the configured grant."""
    from features import KEYS
    from test_features_nexus import (CallerWorkflow, HandlerChildWorkflow, PgwServiceHandler, big_activity,
                                     child_activity, register_namespace)
    from temporalio.api.nexus.v1 import EndpointSpec, EndpointTarget
    from temporalio.api.operatorservice.v1 import CreateNexusEndpointRequest

    ns_a, ns_b = f"pgw-ox-a-{uuid.uuid4().hex[:6]}", f"pgw-ox-b-{uuid.uuid4().hex[:6]}"
    gw = gateway_factory(nexus_server.address, config={}, start=False, extra_env=store.env())
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": rig.key_files(gw.workdir, KEYS)},
        "compression": {"enabled": True},
        "storage": store.storage_section(threshold=64 * 1024, timeout_ms=10000),
        f"namespaces.{ns_a}": {"active_key": "k1", "storage_read_namespaces": [ns_b]},
        f"namespaces.{ns_b}": {"active_key": "k2", "storage_read_namespaces": [ns_a]},
    }).start()
    endpoint = f"pgw-ox-ep-{uuid.uuid4().hex[:6]}"
    handler_tq, caller_tq, wf_id = (f"{p}-{uuid.uuid4().hex[:6]}" for p in ("ox-h", "ox-c", "ox-wf"))

    async def go():
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
            return await client_a.execute_workflow(CallerWorkflow.run, args=[endpoint, 300_000, 150_000, 30], id=wf_id,
                                                   task_queue=caller_tq, execution_timeout=timedelta(seconds=90))

    out = asyncio.run(go())
    assert out["caller_ns"] == ns_a and out["sync"]["namespace"] == ns_b and out["child"]["namespace"] == ns_b
    assert out["sync"]["big_len"] == 300_000
    names = store.names()
    from features import MARKER as FEATURE_MARKER
    for prefix in (f"v0/ns/{ns_a}/", f"v0/ns/{ns_b}/"):
        assert any(n.startswith(prefix) for n in names), f"nothing stored under {prefix}: {names}"
    for name, data in store.objects().items():
        assert FEATURE_MARKER.encode() not in data, f"plaintext in {name}"

    async def caller_history():
        direct = await Client.connect(nexus_server.address, namespace=ns_a)
        return await direct.get_workflow_handle(wf_id).fetch_history()

    raw = b"".join(e.SerializeToString() for e in asyncio.run(caller_history()).events)
    assert FEATURE_MARKER.encode() not in raw
    assert store.driver.encode() in raw, "the caller's history holds no reference of this store"


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


def _reference(claim: dict, driver: str = "aws.s3driver") -> Payload:
    data = json.dumps({"claimData": claim, "driverName": driver}, separators=(",", ":")).encode()
    p = Payload(metadata={"encoding": b"json/protobuf", "messageType": REF_TYPE}, data=data)
    p.external_payloads.add().size_bytes = 1000
    return p


def test_forged_references_are_refused(temporal_server, gateway_factory, store):
    gw = start_gateway(gateway_factory, temporal_server.address, store)
    secret = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(MARKER + " secret").encode()).SerializeToString()
    h = hashlib.sha256(secret).hexdigest()
    store.make_bucket("other-bucket")
    # The objects a forger wants exist (the `..` key normalizes to the other namespace's).
    store.put(f"v0/ns/other/d/sha256/{h}", secret)
    store.put(f"v0/ns/default/d/sha256/{h}", secret, bucket="other-bucket")
    forged = {
        "other namespace": (BUCKET, f"v0/ns/other/d/sha256/{h}"),
        "other bucket": ("other-bucket", f"v0/ns/default/d/sha256/{h}"),
        "dot-dot key": (BUCKET, f"v0/ns/default/../other/d/sha256/{h}"),
    }
    for what, (bucket, key) in forged.items():
        wf_id = f"forged-{uuid.uuid4().hex[:8]}"
        claim = {store.bucket_field: bucket, store.key_field: key, "hash_algorithm": "sha256", "hash_value": h}
        asyncio.run(start_raw(temporal_server.address, wf_id, _reference(claim, store.driver)))
        with pytest.raises(RPCError) as err:
            asyncio.run(history_raw(gw.address, wf_id))
        assert err.value.status == RPCStatusCode.PERMISSION_DENIED, f"{what}: {err.value.status} {err.value}"
        assert MARKER not in str(err.value) and MARKER not in repr(err.value.raw_grpc_status)


def test_tampered_object_is_a_hash_mismatch(temporal_server, gateway_factory, store):
    gw = start_gateway(gateway_factory, temporal_server.address, store)
    wf_id = f"tamper-{uuid.uuid4().hex[:8]}"

    async def start():
        client = await Client.connect(gw.address, namespace="default")
        await client.start_workflow("Nobody", EXPECTED_INPUT, id=wf_id, task_queue=f"none-{uuid.uuid4().hex[:6]}")

    asyncio.run(start())
    [name] = store.names()
    data = bytearray(store.get(name))
    data[len(data) // 2] ^= 0x01
    store.put(name, bytes(data))
    with pytest.raises(RPCError) as err:
        asyncio.run(history_raw(gw.address, wf_id))
    assert err.value.status == RPCStatusCode.DATA_LOSS, err.value
    assert "hash mismatch" in str(err.value)


def test_store_unavailable_then_back(temporal_server, gateway_factory, store):
    """The emulator down: UNAVAILABLE and nothing reaches the server; down again while a worker
    runs the workflow: the SDK retries and nothing is lost once it is back."""
    gw = start_gateway(gateway_factory, temporal_server.address, store)
    store.server.stop()
    wf_id = f"down-{uuid.uuid4().hex[:8]}"
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

    assert not asyncio.run(exists_on_server(wf_id)), "nothing may reach the server while the store is down"

    # Back: the start goes through; down again while the worker polls; back again: the
    # workflow continues (the lost workflow task is retried by the server after its timeout).
    store.server.start()
    asyncio.run(start(wf_id))
    store.server.stop()

    async def finish():
        client = await Client.connect(gw.address, namespace="default")
        async with Worker(client, task_queue=tq, workflows=[OffloadWorkflow], activities=[make_blob],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            await asyncio.sleep(3)
            store.server.start()
            return await asyncio.wait_for(client.get_workflow_handle(wf_id).result(), timeout=120)

    assert asyncio.run(finish()) == EXPECTED
    assert_ciphertext_only(store, min_objects=2)
