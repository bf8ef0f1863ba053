"""Envelope encryption end to end: the gateway's KEK is a key in a real KMS-compatible server
(moto_server, AWS KMS API), reached through the AWS SDK's standard endpoint variable
(AWS_ENDPOINT_URL_KMS) with dummy credentials; workflows run with the Python SDK through the
gateway. KMS calls are counted at the KMS server (moto's request recorder), not in our
metrics; history and bucket are read directly."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.request
import uuid
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload, Payloads, WorkflowType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import StartWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import iter_payloads

MARKER = "PGW-ENVELOPE-PLAINTEXT"
BUCKET = "pgw-test"
STATIC_KEY = base64.b64encode(bytes(range(32))).decode()
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"


@activity.defn
async def echo(i: int) -> str:
    return f"{MARKER}-activity-{i}"


@workflow.defn(name="EnvW")
class ManyActivities:
    @workflow.run
    async def run(self, n: int, parallel: int, pause_s: float, data: str) -> dict:
        out: list[str] = []
        for start in range(0, n, parallel):
            batch = [workflow.execute_activity(echo, i, start_to_close_timeout=timedelta(seconds=60))
                     for i in range(start, min(n, start + parallel))]
            out += await asyncio.gather(*batch)
            if pause_s:
                await workflow.sleep(pause_s)
        return {"results": len(out), "last": out[-1], "data_len": len(data)}


def kek_uri(arn: str) -> str:
    return f"awskms:///{arn}"


def envelope_config(gw: rig.Gateway, keks: dict[str, str], active: str, s3: rig.S3Server | None = None,
                    rotation_s: int = 3600, timeout_ms: int = 2000) -> dict:
    keys = [{"id": kid, "kms": kek_uri(arn)} for kid, arn in keks.items()]
    keys.append({"id": "k1", "env": "PGW_TEST_STATIC_KEY"})  # static keys keep working alongside
    return {
        **gw.listener_sections(codec_server=True),
        "encryption": {"enabled": True, "active_key": active, "keys": keys, "dek_rotation_s": rotation_s,
                       "kms_timeout_ms": timeout_ms},
        "compression": {"enabled": True},
        "storage": s3.storage_section(BUCKET, 64 * 1024, 5000) if s3 is not None else {"enabled": False},
    }


def start_gateway(gateway_factory, upstream: str, kms: rig.KmsServer, keks: dict[str, str], active: str,
                  s3: rig.S3Server | None = None, **kw) -> rig.Gateway:
    env = {**kms.gateway_env(), "PGW_TEST_STATIC_KEY": STATIC_KEY}
    if s3 is not None:
        # The S3 driver gets its endpoint from the config; its credentials from the same chain.
        env.update(s3.env())
    return gateway_factory(upstream, extra_env=env, config=lambda gw: envelope_config(gw, keks, active, s3, **kw))


async def run_many(address: str, n: int, parallel: int = 20, pause_s: float = 0.0, data: str = "",
                   wf_id: str | None = None) -> tuple[str, dict]:
    tq = f"env-{uuid.uuid4().hex[:8]}"
    wf_id = wf_id or f"env-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(address, namespace="default")
    async with Worker(client, task_queue=tq, workflows=[ManyActivities], activities=[echo],
                      workflow_runner=UnsandboxedWorkflowRunner(), max_concurrent_activities=parallel):
        result = await client.execute_workflow(ManyActivities.run, args=[n, parallel, pause_s, data], id=wf_id,
                                               task_queue=tq, execution_timeout=timedelta(seconds=120))
    return wf_id, result


async def raw_history(address: str, wf_id: str):
    direct = await Client.connect(address, namespace="default")
    return await direct.get_workflow_handle(wf_id).fetch_history()


def raw_bytes(history) -> bytes:
    return b"".join(e.SerializeToString() for e in history.events)


def envelope_payloads(history, kek_ids: set[str]) -> list[Payload]:
    """Every payload of a raw history: each must be envelope-encrypted under one of `kek_ids`
    (or a storage reference, whose object the bucket checks cover); returns the encrypted ones."""
    assert MARKER.encode() not in raw_bytes(history), "plaintext marker in the server's history"
    found = []
    for event in history.events:
        for path, p in iter_payloads(event):
            if p.metadata.get("messageType") == REF_TYPE:
                continue
            assert p.metadata.get("encoding") == b"binary/encrypted", f"{path}: {dict(p.metadata)}"
            assert p.metadata["encryption-key-id"].decode() in kek_ids, f"{path}: {p.metadata['encryption-key-id']}"
            assert len(p.metadata["encryption-dek"]) > 32 and len(p.metadata["encryption-dek-id"]) == 32, path
            found.append(p)
    return found


def kms_ops(kms: rig.KmsServer) -> int:
    calls = kms.calls()
    return sum(v for k, v in calls.items() if k in ("Encrypt", "Decrypt", "GenerateDataKey", "ReEncrypt"))


def codec_decode(gw: rig.Gateway, payloads: list[Payload]) -> list[dict]:
    body = json.dumps({"payloads": [{"metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                                     "data": base64.b64encode(p.data).decode()} for p in payloads]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{gw.codec_port}/decode", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "X-Namespace": "default"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["payloads"]


def test_envelope_keys_with_offload_few_kms_calls(temporal_server, gateway_factory, kms_server, s3_server):
    arn = kms_server.create_key()
    gw = start_gateway(gateway_factory, temporal_server.address, kms_server, {"payments-kek": arn}, "payments-kek",
                       s3=s3_server)
    before = kms_ops(kms_server)
    big = "".join(MARKER + os.urandom(2000).hex() for _ in range(75))  # ~300 KB, ~150 KB zstd: offloaded
    wf_id, result = asyncio.run(run_many(gw.address, 200, data=big))
    assert result == {"results": 200, "last": f"{MARKER}-activity-199", "data_len": len(big)}
    # 200 activities (hundreds of encrypted payloads each way): a handful of KMS calls,
    # counted by the KMS server.
    calls = kms_ops(kms_server) - before
    assert 1 <= calls <= 5, f"{calls} KMS calls at the server: {kms_server.calls()}"

    history = asyncio.run(raw_history(temporal_server.address, wf_id))
    encrypted = envelope_payloads(history, {"payments-kek"})
    assert len(encrypted) >= 400
    refs = [p for e in history.events for _, p in iter_payloads(e) if p.metadata.get("messageType") == REF_TYPE]
    assert refs, "the large input was not offloaded"
    objects = [p for p in (s3_server.root / BUCKET).rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert objects
    for o in objects:
        data = o.read_bytes()
        assert MARKER.encode() not in data, f"plaintext in {o}"
        assert b"encryption-dek" in data and b"payments-kek" in data, o

    # The codec endpoint (Web UI, CLI) decodes envelope payloads.
    decoded = codec_decode(gw, encrypted[-10:])
    texts = [base64.b64decode(p["data"]).decode() for p in decoded]
    assert any(MARKER in t for t in texts), texts
    # Our own metrics agree: one wrap, no unwrap (data keys made here are cached).
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'pgw_kms_calls_total{provider="awskms",operation="wrap",result="ok"}' in metrics, metrics[-3000:]
    assert 'operation="unwrap"' not in metrics
    assert 'pgw_dek_age_seconds{key_id="payments-kek"}' in metrics
    # A fresh gateway (empty data-key cache) unwraps each data key once, at the KMS.
    gw.stop()
    gw2 = start_gateway(gateway_factory, temporal_server.address, kms_server, {"payments-kek": arn}, "payments-kek",
                        s3=s3_server)
    decrypts = kms_server.calls().get("Decrypt", 0)
    handle_result = asyncio.run(_result_through(gw2.address, wf_id))
    assert handle_result["last"] == f"{MARKER}-activity-199"
    assert kms_server.calls().get("Decrypt", 0) - decrypts == 1


async def _result_through(address: str, wf_id: str) -> dict:
    client = await Client.connect(address, namespace="default")
    return await client.get_workflow_handle(wf_id).result()


def test_dek_rotation_within_one_workflow(temporal_server, gateway_factory, kms_server):
    arn = kms_server.create_key()
    gw = start_gateway(gateway_factory, temporal_server.address, kms_server, {"kek": arn}, "kek", rotation_s=2)
    wf_id, result = asyncio.run(run_many(gw.address, 24, parallel=4, pause_s=0.8))
    assert result["results"] == 24
    encrypted = envelope_payloads(asyncio.run(raw_history(temporal_server.address, wf_id)), {"kek"})
    dek_ids = {p.metadata["encryption-dek-id"] for p in encrypted}
    wrapped = {p.metadata["encryption-dek"] for p in encrypted}
    assert len(dek_ids) >= 2 and len(wrapped) == len(dek_ids), f"{len(dek_ids)} data keys"
    # Every payload of the run decodes through the gateway (the result above did; the whole
    # history too, with the data keys of every rotation).
    through = asyncio.run(raw_history(gw.address, wf_id))
    assert MARKER.encode() in raw_bytes(through)
    for e in through.events:
        for path, p in iter_payloads(e):
            assert p.metadata.get("encoding") != b"binary/encrypted", path


def _start_raw(address: str, tq: str):
    async def go():
        client = await Client.connect(address, namespace="default")
        await client.workflow_service.start_workflow_execution(StartWorkflowExecutionRequest(
            namespace="default", workflow_id=f"raw-{uuid.uuid4().hex[:8]}", workflow_type=WorkflowType(name="Nobody"),
            task_queue=TaskQueue(name=tq), request_id=str(uuid.uuid4()),
            input=Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=f'"{MARKER}-raw"'.encode())])),
            retry=False)
    return asyncio.run(go())


def test_kms_unreachable_mid_load(temporal_server, gateway_factory, kms_server):
    arn = kms_server.create_key()
    gw = start_gateway(gateway_factory, temporal_server.address, kms_server, {"payments-kek": arn}, "payments-kek",
                       rotation_s=6, timeout_ms=500)
    first_id, _ = asyncio.run(run_many(gw.address, 4, parallel=4))
    made = time.monotonic()  # the data key was made at the first start, just before
    kms_server.pause()
    try:
        # Within the data key's lifetime: workflows go on with the current and cached keys.
        wf_id, result = asyncio.run(run_many(gw.address, 8, parallel=8))
        assert result["results"] == 8
        assert time.monotonic() - made < 5, "the run took longer than the data key lives"
        # Past expiry: new encryption fails closed, UNAVAILABLE naming the key; nothing is
        # forwarded.
        time.sleep(max(0.0, made + 6.5 - time.monotonic()))
        tq = f"none-{uuid.uuid4().hex[:6]}"
        with pytest.raises(RPCError) as err:
            _start_raw(gw.address, tq)
        assert err.value.status == RPCStatusCode.UNAVAILABLE, err.value
        assert "payments-kek" in err.value.message, err.value.message
        # Decryption of cached data keys still works: the earlier run reads back.
        assert asyncio.run(_result_through(gw.address, first_id))["results"] == 4
    finally:
        kms_server.resume()
    time.sleep(1.2)  # failed attempts are answered from memory for a second
    wf_id2, result2 = asyncio.run(run_many(gw.address, 4, parallel=4))
    assert result2["results"] == 4
    for wid in (first_id, wf_id, wf_id2):
        envelope_payloads(asyncio.run(raw_history(temporal_server.address, wid)), {"payments-kek"})


def test_kek_change_by_sighup_under_load(temporal_server, gateway_factory, kms_server):
    arn_a, arn_b = kms_server.create_key("old"), kms_server.create_key("new")
    keks = {"kek-a": arn_a, "kek-b": arn_b}
    gw = start_gateway(gateway_factory, temporal_server.address, kms_server, keks, "kek-a")

    async def load():
        tq = f"env-{uuid.uuid4().hex[:8]}"
        client = await Client.connect(gw.address, namespace="default")
        async with Worker(client, task_queue=tq, workflows=[ManyActivities], activities=[echo],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            async def reload_midway():
                await asyncio.sleep(1.5)
                gw.config["encryption"]["active_key"] = "kek-b"  # kek-a stays: decrypt only
                gw.configure()
                os.kill(gw.proc.pid, signal.SIGHUP)

            handles = []
            reloader = asyncio.create_task(reload_midway())
            for wave in range(6):
                handles.append(asyncio.gather(*(_started(client, tq, wave * 4 + j) for j in range(4))))
                await asyncio.sleep(0.6)
            await reloader
            started = [h for wave in await asyncio.gather(*handles) for h in wave]
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in started)), timeout=90)
            return started, results

    started, results = asyncio.run(load())
    assert all(r["results"] == 6 for r in results)
    assert "reloaded" in gw.output()
    seen = set()
    for h in started:
        hist = asyncio.run(raw_history(temporal_server.address, h.id))
        for p in envelope_payloads(hist, {"kek-a", "kek-b"}):
            seen.add(p.metadata["encryption-key-id"].decode())
    assert seen == {"kek-a", "kek-b"}, seen
    # New payloads use the new KEK; old ones still decode through the gateway.
    last = asyncio.run(raw_history(temporal_server.address, started[-1].id))
    assert {p.metadata["encryption-key-id"] for p in envelope_payloads(last, keks.keys())} == {b"kek-b"}
    first = asyncio.run(raw_history(gw.address, started[0].id))
    assert MARKER.encode() in raw_bytes(first)


async def _started(client: Client, tq: str, i: int):
    return await client.start_workflow(ManyActivities.run, args=[6, 2, 0.0, f"{MARKER}-{i}"],
                                       id=f"sighup-{uuid.uuid4().hex[:8]}", task_queue=tq,
                                       execution_timeout=timedelta(seconds=60))
