"""GCS interop with the Python SDK's own driver: `temporalio.contrib.gcp.gcsdriver`
(GCSStorageDriver over gcloud-aio-storage, pointed at fake-gcs-server by
`STORAGE_EMULATOR_HOST`) and the sample encryption codec (tests/sdk_codec.py), with compression
on and off on both sides.

- SDK writes, gateway reads: a worker straight to the server with ExternalStorage(GCSStorageDriver)
  returns a 6 MB result; a client through the gateway gets it (the gateway resolves the SDK's
  reference, then decrypts).
- Gateway writes, SDK reads: a client through the gateway starts a workflow with an 8 MB input;
  the gateway offloads it through its `gcp.gcsdriver`; a worker straight to the server with the
  SDK's driver and codec reads it. The gateway's claim is the one the SDK's driver computes for
  the same payload and target, object name included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from contextlib import AsyncExitStack
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import DataConverter, ExternalStorage
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import SdkCodec
from test_offload import BUCKET, MARKER, REF_TYPE, GcsStore, blob, digest, start_store

KEYS = {"k1": bytes(range(32))}
RESULT_LEN = 6 * 1024 * 1024
INPUT_LEN = 8 * 1024 * 1024


@pytest.fixture
def gcs(request, workdir, monkeypatch):
    store, server = start_store("gcs", workdir, request)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
    yield store
    server.stop()


def start_gateway(gateway_factory, upstream: str, gcs: GcsStore, compression: bool) -> rig.Gateway:
    return rig.encrypting_gateway(gateway_factory, upstream, KEYS["k1"], "PGW_TEST_GCS_KEY",
                                  compression={"enabled": compression}, storage=gcs.storage_section(timeout_ms=10000))


async def sdk_driver(stack: AsyncExitStack):
    from gcloud.aio.storage import Storage
    from temporalio.contrib.gcp.gcsdriver import GCSStorageDriver
    from temporalio.contrib.gcp.gcsdriver.gcloud_aio import new_gcloud_aio_client

    storage = await stack.enter_async_context(Storage())  # STORAGE_EMULATOR_HOST: no credentials
    return GCSStorageDriver(client=new_gcloud_aio_client(storage), bucket=BUCKET)


def sdk_converter(driver, compression: bool) -> DataConverter:
    return dataclasses.replace(DataConverter.default, payload_codec=SdkCodec(KEYS, "k1", compress=compression),
                               external_storage=ExternalStorage(drivers=[driver]))


@activity.defn
async def big_result(n: int) -> str:
    return blob(n, "sdk-result")


@workflow.defn(name="GI")
class InteropWorkflow:
    @workflow.run
    async def run(self, data: str, result_len: int) -> dict:
        out = ""
        if result_len:
            out = await workflow.execute_activity(big_result, result_len, start_to_close_timeout=timedelta(seconds=60))
        return {"in_len": len(data), "in_sha": digest(data), "out": out}


def references(address: str, wf_id: str) -> list[dict]:
    return asyncio.run(references_async(address, wf_id))


async def references_async(address: str, wf_id: str) -> list[dict]:
    """The storage references in the history as the server holds it (no plaintext anywhere)."""
    direct = await Client.connect(address, namespace="default")
    history = await direct.get_workflow_handle(wf_id).fetch_history()
    raw = b"".join(e.SerializeToString() for e in history.events)
    assert MARKER.encode() not in raw, "plaintext in the server's history"
    refs = []
    for e in history.events:
        payloads = []
        if e.HasField("workflow_execution_started_event_attributes"):
            payloads = e.workflow_execution_started_event_attributes.input.payloads
        elif e.HasField("activity_task_completed_event_attributes"):
            payloads = e.activity_task_completed_event_attributes.result.payloads
        refs += [json.loads(p.data) for p in payloads if p.metadata.get("messageType") == REF_TYPE]
    return refs


def assert_objects_ciphertext(gcs: GcsStore) -> None:
    for name, data in gcs.objects().items():
        assert MARKER.encode() not in data, f"plaintext in {name}"
        assert Payload.FromString(data).metadata.get("encoding") == b"binary/encrypted", name


@pytest.mark.parametrize("compression", [True, False], ids=["zstd", "plain"])
def test_sdk_writes_gateway_reads(temporal_server, gateway_factory, gcs, compression):
    gw = start_gateway(gateway_factory, temporal_server.address, gcs, compression)
    wf_id, tq = f"gi-{uuid.uuid4().hex[:6]}", f"gi-{uuid.uuid4().hex[:8]}"

    async def go():
        async with AsyncExitStack() as stack:
            conv = sdk_converter(await sdk_driver(stack), compression)
            worker_client = await Client.connect(temporal_server.address, namespace="default", data_converter=conv)
            client = await Client.connect(gw.address, namespace="default")
            async with Worker(worker_client, task_queue=tq, workflows=[InteropWorkflow], activities=[big_result],
                              workflow_runner=UnsandboxedWorkflowRunner()):
                return await client.execute_workflow(InteropWorkflow.run, args=["small", RESULT_LEN], id=wf_id,
                                                     task_queue=tq, execution_timeout=timedelta(seconds=120))

    result = asyncio.run(go())
    assert result["out"] == blob(RESULT_LEN, "sdk-result")
    refs = references(temporal_server.address, wf_id)
    assert refs and all(r["driverName"] == "gcp.gcsdriver" for r in refs), refs
    # The SDK's own object names: the gateway resolved them as they are.
    for r in refs:
        assert r["claimData"]["object_name"] in gcs.names(), r
    assert_objects_ciphertext(gcs)


@pytest.mark.parametrize("compression", [True, False], ids=["zstd", "plain"])
def test_gateway_writes_sdk_reads(temporal_server, gateway_factory, gcs, compression):
    gw = start_gateway(gateway_factory, temporal_server.address, gcs, compression)
    wf_id, tq = f"gi-{uuid.uuid4().hex[:6]}", f"gi-{uuid.uuid4().hex[:8]}"
    data = blob(INPUT_LEN, "gateway-input")

    async def go():
        async with AsyncExitStack() as stack:
            driver = await sdk_driver(stack)
            conv = sdk_converter(driver, compression)
            worker_client = await Client.connect(temporal_server.address, namespace="default", data_converter=conv)
            client = await Client.connect(gw.address, namespace="default")
            async with Worker(worker_client, task_queue=tq, workflows=[InteropWorkflow], activities=[big_result],
                              workflow_runner=UnsandboxedWorkflowRunner()):
                result = await client.execute_workflow(InteropWorkflow.run, args=[data, 0], id=wf_id, task_queue=tq,
                                                       execution_timeout=timedelta(seconds=120))
            # What the SDK's driver writes for the stored payload and the same target. Protobuf
            # serialization is not canonical (map order), so the SDK may serialize the parsed
            # payload to other bytes: its name is compared with its own hash put in.
            import hashlib

            from temporalio.converter import StorageDriverStoreContext, StorageDriverWorkflowInfo

            [ref] = await references_async(temporal_server.address, wf_id)
            raw = gcs.get(ref["claimData"]["object_name"])
            assert ref["claimData"]["hash_value"] == hashlib.sha256(raw).hexdigest()
            # The gateway knows what StartWorkflowExecution carries at its top level: no type, no run id.
            target = StorageDriverWorkflowInfo(namespace="default", type=None, id=wf_id, run_id=None)
            [claim] = await driver.store(StorageDriverStoreContext(target=target), [Payload.FromString(raw)])
            sdk_claim = dict(claim.claim_data)
            sdk_claim["object_name"] = sdk_claim["object_name"].replace(sdk_claim["hash_value"], ref["claimData"]["hash_value"])
            sdk_claim["hash_value"] = ref["claimData"]["hash_value"]
            return result, ref, sdk_claim

    result, ref, sdk_claim = asyncio.run(go())
    assert result == {"in_len": INPUT_LEN, "in_sha": digest(data), "out": ""}
    assert ref["driverName"] == "gcp.gcsdriver"
    assert json.dumps(ref["claimData"], sort_keys=True) == json.dumps(sdk_claim, sort_keys=True), (ref, sdk_claim)
    assert ref["claimData"]["object_name"].startswith(f"v0/ns/default/wt/null/wi/{wf_id}/ri/null/d/sha256/")
    assert_objects_ciphertext(gcs)
