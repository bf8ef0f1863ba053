"""Encryption and compression through the gateway (issue: encrypt and compress every payload).

Every test reads what the server holds directly from the server, bypassing the gateway, and
checks it with a reflective payload walk that is independent of the gateway's own walker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import uuid
from datetime import timedelta

import grpc
import pytest
import zstandard
from temporalio import activity, workflow
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.taskqueue.v1 import message_pb2 as tq
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.api.workflowservice.v1 import service_pb2_grpc
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.converter import DataConverter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import ENCRYPTED, SdkCodec, iter_payloads
from test_workflow_e2e import BLOB, run_histories, scenario

KEYS = {"k1": os.urandom(32), "k2": os.urandom(32)}
SA_NAME = "PgwTeamTag"
SA_KEY = SearchAttributeKey.for_keyword(SA_NAME)


def encrypting_gateway(gateway_factory, upstream: str, active: str = "k1", key_ids=("k1", "k2"),
                       compression: bool = True, extra: dict | None = None) -> rig.Gateway:
    """A started gateway with keys from files (base64), encryption and compression on."""
    gw = gateway_factory(upstream, config={}, start=False, name=f"gw-enc-{active}")
    gw.configure(encryption_config(gw, active, key_ids, compression, extra))
    return gw.start()


def encryption_config(gw: rig.Gateway, active: str, key_ids, compression: bool = True, extra: dict | None = None) -> dict:
    keys = rig.key_files(gw.workdir, {key_id: KEYS[key_id] for key_id in key_ids})
    config = {
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": active, "keys": keys},
        "compression": {"enabled": compression, "min_size": 64},
        "storage": {"enabled": False},
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return config


async def server_history(server: rig.TemporalServer, workflow_id: str):
    """The history as the server holds it: read directly, with no codec."""
    client = await Client.connect(server.address)
    return await client.get_workflow_handle(workflow_id).fetch_history()


def stored_payloads(history) -> list[tuple[str, common.Payload]]:
    out = []
    for event in history.events:
        out.extend(iter_payloads(event))
    return out


def assert_only_ciphertext(history, plaintext_markers: list[bytes]) -> set[str]:
    """Every payload except search attributes is encrypted; no marker appears anywhere.
    Returns the key ids seen."""
    key_ids = set()
    payloads = stored_payloads(history)
    assert payloads, "history has no payloads at all"
    for path, p in payloads:
        if ".search_attributes." in f".{path}.":
            continue
        assert p.metadata.get("encoding") == ENCRYPTED, f"{path} reached the server unencrypted: {dict(p.metadata)}"
        key_ids.add(p.metadata["encryption-key-id"].decode())
    raw = b"".join(e.SerializeToString() for e in history.events)
    for marker in plaintext_markers:
        assert marker not in raw, f"plaintext {marker!r} found in the server's history"
    return key_ids


# ----------------------------------------------------------------------------- full feature workflow


def test_full_workflow_encrypted_at_server_and_plaintext_to_sdk(temporal_server, gateway_factory):
    gw = encrypting_gateway(gateway_factory, temporal_server.address)
    ids: list[str] = []
    out = asyncio.run(scenario(gw.address, "enc", ids=ids))
    assert out["status"] == "COMPLETED"
    res = out["result"]
    assert res["greeting"] == "Hello, Ada!"
    assert res["child"] == {"doubled": 42, "greeting": "Hello, child 21!"}
    assert res["failure"]["cause_details"] == [{"attempt": 3}]
    assert res["added"] == [1, 2, 4] and res["sum"] == 7 and res["label"] == "second"
    assert out["update_add_and_wait"] == 7
    assert out["failing_workflow"] == {"cause": "ApplicationError", "message": "workflow failed: because",
                                       "type": "WfBoom", "details": ["because"]}

    markers = [BLOB[:40].encode(), b"Hello, Ada", b"Hello, child", b"\"second\""]
    assert len(ids) == 4  # main, its child, its continue-as-new child, the failing workflow
    for workflow_id in ids:  # every run of each, the child's and continue-as-new runs included
        runs = asyncio.run(run_histories(temporal_server.address, workflow_id))
        assert len(runs) == (4 if workflow_id.endswith("-countdown") else 1), workflow_id
        for history in runs:
            assert assert_only_ciphertext(history, markers) == {"k1"}


# ----------------------------------------------------------------------------- memo and search attributes


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class MemoWorkflow:
    @workflow.run
    async def run(self, text: str) -> dict:
        shouted = await workflow.execute_activity(shout, text, start_to_close_timeout=timedelta(seconds=30))
        return {"memo": workflow.memo_value("team", type_hint=str), "shouted": shouted}


def test_memo_encrypted_search_attributes_plaintext_and_queryable(temporal_server, gateway_factory):
    gw = encrypting_gateway(gateway_factory, temporal_server.address)
    tag = uuid.uuid4().hex[:10]
    sa_value = f"visible-sa-{tag}"

    async def run():
        client = await Client.connect(gw.address)
        try:  # through the gateway: the operator service is forwarded too
            await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
                namespace="default", search_attributes={SA_NAME: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD}))
        except RPCError as err:
            if err.status != RPCStatusCode.ALREADY_EXISTS:
                raise
        task_queue = f"tq-memo-{tag}"
        async with Worker(client, task_queue=task_queue, workflows=[MemoWorkflow], activities=[shout],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            handle = await client.start_workflow(
                MemoWorkflow.run, f"whisper-{tag}", id=f"memo-{tag}", task_queue=task_queue,
                memo={"team": f"secret-memo-{tag}"},
                search_attributes=TypedSearchAttributes([SearchAttributePair(SA_KEY, sa_value)]))
            result = await handle.result()
            described = await handle.describe()
            memo = await described.memo_value("team", type_hint=str)
            found = []
            for _ in range(50):  # visibility is eventually consistent
                found = [w.id async for w in client.list_workflows(f"{SA_NAME} = '{sa_value}'")]
                if found:
                    break
                await asyncio.sleep(0.2)
            return result, memo, found

    result, memo, found = asyncio.run(run())
    assert result == {"memo": f"secret-memo-{tag}", "shouted": f"WHISPER-{tag}".upper()}
    assert memo == f"secret-memo-{tag}"
    assert found == [f"memo-{tag}"], "a visibility query by search attribute must find the workflow"

    history = asyncio.run(server_history(temporal_server, f"memo-{tag}"))
    # The markers carry letters of their own: the bare hex tag (which may be all digits, so
    # that tag.upper() == tag) is also in the workflow id, task queue and search attribute,
    # which are plaintext by design.
    markers = [f"secret-memo-{tag}", f"whisper-{tag}", f"WHISPER-{tag}".upper()]
    assert_only_ciphertext(history, [m.encode() for m in markers])
    sa_payloads = [p for path, p in stored_payloads(history) if "search_attributes" in path]
    assert sa_payloads and all(sa_value.encode() in p.data for p in sa_payloads), "search attributes must stay plaintext"


# ----------------------------------------------------------------------------- interop with an SDK codec


@activity.defn
async def describe_input(text: str) -> str:
    return f"activity saw {len(text)} chars starting {text[:12]}"


@workflow.defn
class InteropWorkflow:
    @workflow.run
    async def run(self, text: str) -> dict:
        seen = await workflow.execute_activity(describe_input, text, start_to_close_timeout=timedelta(seconds=30))
        return {"echo": text, "activity": seen}


@pytest.mark.parametrize("direction", ["gateway-client-sdk-worker", "sdk-client-gateway-worker"])
def test_interop_with_sdk_codec(temporal_server, gateway_factory, direction):
    gw = encrypting_gateway(gateway_factory, temporal_server.address)
    tag = uuid.uuid4().hex[:10]
    text = f"secret-{tag}-" + "abc" * 500  # compressible: exercises binary/zstd both ways
    sdk_codec = SdkCodec({"k1": KEYS["k1"]}, active="k1")
    sdk_converter = dataclasses.replace(DataConverter.default, payload_codec=sdk_codec)

    async def run():
        via_gateway = await Client.connect(gw.address)
        direct_with_codec = await Client.connect(temporal_server.address, data_converter=sdk_converter)
        worker_client, starter = ((direct_with_codec, via_gateway) if direction == "gateway-client-sdk-worker"
                                  else (via_gateway, direct_with_codec))
        task_queue = f"tq-interop-{tag}"
        async with Worker(worker_client, task_queue=task_queue, workflows=[InteropWorkflow],
                          activities=[describe_input], workflow_runner=UnsandboxedWorkflowRunner()):
            return await starter.execute_workflow(InteropWorkflow.run, text, id=f"interop-{tag}", task_queue=task_queue)

    result = asyncio.run(run())
    assert result == {"echo": text, "activity": f"activity saw {len(text)} chars starting {text[:12]}"}
    assert "k1" in sdk_codec.seen_key_ids, "the SDK codec decoded nothing: the test proved nothing"
    history = asyncio.run(server_history(temporal_server, f"interop-{tag}"))
    assert assert_only_ciphertext(history, [f"secret-{tag}".encode()]) == {"k1"}


# ----------------------------------------------------------------------------- rotation with SIGHUP


@workflow.defn
class RotationWorkflow:
    def __init__(self) -> None:
        self.steps: list[str] = []

    @workflow.run
    async def run(self, rounds: int) -> list[str]:
        for _ in range(rounds):
            await workflow.wait_condition(lambda: len(self.steps) % 2 == 1)
            self.steps.append(await workflow.execute_activity(shout, self.steps[-1],
                                                              start_to_close_timeout=timedelta(seconds=30)))
        return self.steps

    @workflow.signal
    def step(self, text: str) -> None:
        self.steps.append(text)

    @workflow.query
    def progress(self) -> int:
        return len(self.steps)


def test_key_rotation_with_sighup_under_load(temporal_server, gateway_factory):
    gw = encrypting_gateway(gateway_factory, temporal_server.address, active="k1")
    tag = uuid.uuid4().hex[:8]
    count = 8

    async def run():
        client = await Client.connect(gw.address)
        task_queue = f"tq-rot-{tag}"
        async with Worker(client, task_queue=task_queue, workflows=[RotationWorkflow], activities=[shout],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            handles = [await client.start_workflow(RotationWorkflow.run, 2, id=f"rot-{tag}-{i}", task_queue=task_queue)
                       for i in range(count)]
            await asyncio.gather(*(h.signal(RotationWorkflow.step, f"before-{i}") for i, h in enumerate(handles)))
            for h in handles:  # each has answered its first step under k1
                while await h.query(RotationWorkflow.progress) < 2:
                    await asyncio.sleep(0.1)
            # Rotate while the workflows run: k2 becomes active, k1 stays to decrypt.
            gw.config["encryption"]["active_key"] = "k2"
            gw.configure()
            os.kill(gw.proc.pid, signal.SIGHUP)
            await asyncio.sleep(0.5)
            await asyncio.gather(*(h.signal(RotationWorkflow.step, f"after-{i}") for i, h in enumerate(handles)))
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=120)
            # Older histories still decode: read a run's first input through the gateway again.
            replayed = [await h.result() for h in handles[:2]]
            return results, replayed

    results, replayed = asyncio.run(run())
    assert results == [[f"before-{i}", f"BEFORE-{i}", f"after-{i}", f"AFTER-{i}"] for i in range(count)]
    assert replayed == results[:2]
    assert "keys reloaded" in gw.output(), gw.output()[-2000:]
    seen = set()
    for i in range(count):
        seen |= assert_only_ciphertext(asyncio.run(server_history(temporal_server, f"rot-{tag}-{i}")),
                                       [f"before-{i}".encode(), f"AFTER-{i}".encode()])
    assert seen == {"k1", "k2"}, f"expected payloads under both keys, saw {seen}"


# ----------------------------------------------------------------------------- undecodable payloads


def start_with_input(server: rig.TemporalServer, workflow_id: str, payload: common.Payload) -> None:
    """Puts `payload` into a history directly at the server, as a hostile or broken writer could."""
    with rig.channel(server.address) as ch:
        service_pb2_grpc.WorkflowServiceStub(ch).StartWorkflowExecution(wsr.StartWorkflowExecutionRequest(
            namespace="default", workflow_id=workflow_id, workflow_type=common.WorkflowType(name="Nobody"),
            task_queue=tq.TaskQueue(name=f"tq-nobody-{workflow_id}"), request_id=str(uuid.uuid4()),
            input=common.Payloads(payloads=[payload])), timeout=10)


def read_through(gw: rig.Gateway, workflow_id: str) -> grpc.RpcError:
    with rig.channel(gw.address) as ch:
        try:
            service_pb2_grpc.WorkflowServiceStub(ch).GetWorkflowExecutionHistory(wsr.GetWorkflowExecutionHistoryRequest(
                namespace="default", execution=common.WorkflowExecution(workflow_id=workflow_id)), timeout=10)
        except grpc.RpcError as err:
            return err
    pytest.fail("reading an undecodable history through the gateway succeeded")


def encrypted(key_id: str, inner: common.Payload, key: bytes | None = None, tamper: bool = False) -> common.Payload:
    nonce = os.urandom(12)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    sealed = bytearray(AESGCM(key or KEYS[key_id]).encrypt(nonce, inner.SerializeToString(), None))
    if tamper:
        sealed[3] ^= 0x01
    return common.Payload(metadata={"encoding": ENCRYPTED, "encryption-key-id": key_id.encode()}, data=nonce + bytes(sealed))


PLAIN = common.Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')
INPUT_PATH = "history.events.workflow_execution_started_event_attributes.input.payloads"


@pytest.mark.parametrize("case,payload,expected", [
    ("unknown-key", encrypted("k9", PLAIN, key=os.urandom(32)), ["k9", "unknown encryption key"]),
    ("tampered", encrypted("k1", PLAIN, tamper=True), ["k1", "authentication failed"]),
    ("corrupt-zstd", encrypted("k1", common.Payload(metadata={"encoding": b"binary/zstd"}, data=b"\x28\xb5\x2f\xfdnot zstd")),
     ["zstd"]),
    ("decompression-bomb", encrypted("k1", common.Payload(
        metadata={"encoding": b"binary/zstd"}, data=zstandard.ZstdCompressor().compress(bytes(64 * 1024 * 1024)))),
     ["exceeds"]),
])
def test_undecodable_history_fails_with_a_status_naming_the_problem(temporal_server, gateway_factory, case, payload, expected):
    gw = encrypting_gateway(gateway_factory, temporal_server.address,
                            extra={"compression": {"max_decompressed_bytes": 8 * 1024 * 1024}})
    workflow_id = f"bad-{case}-{uuid.uuid4().hex[:8]}"
    start_with_input(temporal_server, workflow_id, payload)
    err = read_through(gw, workflow_id)
    assert err.code() == grpc.StatusCode.INTERNAL, (err.code(), err.details())
    for needle in expected + [INPUT_PATH]:
        assert needle in err.details(), f"{needle!r} not in {err.details()!r}"
