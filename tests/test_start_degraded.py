"""Start degraded, never open (issue 25, item 3).

The KMS-compatible server (moto_server, the AWS KMS API) is down when the gateway starts. One
namespace encrypts with an AWS KMS key-encryption key (`aws-kek`, named by an alias ARN), another
with a keyring key (`k1`). The gateway must start and serve: the keyring namespace's workflows
run; the KMS namespace's RPCs fail with UNAVAILABLE naming `aws-kek`, and nothing of them reaches
the server (its history is read directly, without the gateway); `/ready` (and `/readyz`) lists
the KMS key service as unavailable beside the upstream and the storage driver (s3s-fs), both
ok, and stays 200 (the upstream is up). Then moto starts on the
same port with the key made under the same alias and, without restarting the gateway, the KMS
namespace works and `/ready` shows the key service ok."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution, WorkflowType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (DescribeNamespaceRequest, GetWorkflowExecutionHistoryRequest,
                                               ListWorkflowExecutionsRequest, RegisterNamespaceRequest,
                                               StartWorkflowExecutionRequest)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import iter_payloads

MARKER = "PGW-DEGRADED-PLAINTEXT"
KEK_ID = "aws-kek"
ALIAS = "alias/pgw-degraded"
ACCOUNT = "123456789012"  # moto's default account


@activity.defn(name="degraded_echo")
async def degraded_echo(text: str) -> str:
    return f"{text}-echoed"


@workflow.defn(name="DegradedW")
class DegradedW:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(degraded_echo, text, start_to_close_timeout=timedelta(seconds=30))


def ready(gw: rig.Gateway, path: str = "/ready") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def kms_line(body: str) -> str:
    lines = [line for line in body.splitlines() if line.startswith(f"kms {KEK_ID} ")]
    assert len(lines) == 1, f"/ready lists the key service of {KEK_ID} once:\n{body}"
    return lines[0]


async def register(client: Client, name: str) -> None:
    await client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=name, workflow_execution_retention_period=Duration(seconds=24 * 3600)))
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=name))
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_workflow(gw: rig.Gateway, ns: str, text: str) -> tuple[str, str]:
    """Runs DegradedW in `ns` through the gateway; returns (workflow id, result)."""
    client = await Client.connect(gw.address, namespace=ns)
    queue = f"degraded-{uuid.uuid4().hex[:8]}"
    wf_id = f"degraded-{ns}-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[DegradedW], activities=[degraded_echo],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        result = await client.execute_workflow(DegradedW.run, text, id=wf_id, task_queue=queue,
                                               execution_timeout=timedelta(seconds=60))
    return wf_id, result


async def server_payloads(direct: Client, ns: str, wf_id: str) -> list[Payload]:
    history = await direct.workflow_service.get_workflow_execution_history(GetWorkflowExecutionHistoryRequest(
        namespace=ns, execution=WorkflowExecution(workflow_id=wf_id)))
    return [p for event in history.history.events for _, p in iter_payloads(event)]


def test_start_with_the_kms_down_then_recover(temporal_server, gateway_factory, workdir, request, s3_server):
    kms = rig.KmsServer(rig.new_tmpdir(workdir, "kms-degraded-"))
    request.addfinalizer(kms.stop)
    assert not rig.port_accepts(kms.port), "the KMS server must be down at start"
    ns_kms, ns_ring = f"deg-kms-{uuid.uuid4().hex[:6]}", f"deg-ring-{uuid.uuid4().hex[:6]}"
    arn = f"arn:aws:kms:{kms.REGION}:{ACCOUNT}:{ALIAS}"
    key = os.urandom(32)

    gw = gateway_factory(temporal_server.address, name="degraded-gw",
                         # s3s-fs's credentials (moto takes any).
                         extra_env={**kms.gateway_env(), **s3_server.env(), "PGW_TEST_DEGRADED_K1": rig.b64(key)},
                         config=lambda g: {
                             **g.listener_sections(),
                             "encryption": {"enabled": True, "active_key": "k1", "kms_timeout_ms": 2000,
                                            "keys": [{"id": "k1", "env": "PGW_TEST_DEGRADED_K1"},
                                                     {"id": KEK_ID, "kms": f"awskms:///{arn}"}]},
                             "compression": {"enabled": False},
                             "storage": s3_server.storage_section("pgw-test", 64 * 1024, 5000),
                             "namespaces": {ns_kms: {"active_key": KEK_ID}, ns_ring: {"active_key": "k1"}},
                         })
    assert gw.proc is not None and gw.proc.alive(), gw.describe()

    async def scenario() -> None:
        direct = await Client.connect(temporal_server.address)
        await register(direct, ns_kms)
        await register(direct, ns_ring)

        # 1. The keyring namespace works while the KMS is down.
        wf_id, result = await run_workflow(gw, ns_ring, f"{MARKER}-ring")
        assert result == f"{MARKER}-ring-echoed"
        payloads = await server_payloads(await Client.connect(temporal_server.address, namespace=ns_ring), ns_ring, wf_id)
        assert payloads and all(p.metadata.get("encoding") == b"binary/encrypted"
                                and p.metadata.get("encryption-key-id") == b"k1" for p in payloads), payloads

        # 2. The KMS namespace fails UNAVAILABLE naming the key; nothing reaches the server.
        through = await Client.connect(gw.address, namespace=ns_kms)
        blocked_id = f"degraded-blocked-{uuid.uuid4().hex[:8]}"
        start = StartWorkflowExecutionRequest(
            namespace=ns_kms, workflow_id=blocked_id, workflow_type=WorkflowType(name="DegradedW"),
            task_queue=TaskQueue(name="degraded-nobody"), request_id=str(uuid.uuid4()),
            input=Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=f'"{MARKER}-kms"'.encode())]))
        for _ in range(3):
            with pytest.raises(RPCError) as err:
                await through.workflow_service.start_workflow_execution(start, retry=False)
            assert err.value.status == RPCStatusCode.UNAVAILABLE, err.value
            assert KEK_ID in err.value.message, err.value.message
        direct_kms = await Client.connect(temporal_server.address, namespace=ns_kms)
        listed = await direct_kms.workflow_service.list_workflow_executions(
            ListWorkflowExecutionsRequest(namespace=ns_kms))
        assert not listed.executions, "nothing of the KMS namespace reached the server"
        with pytest.raises(RPCError) as err:
            await server_payloads(direct_kms, ns_kms, blocked_id)
        assert err.value.status == RPCStatusCode.NOT_FOUND

        # 3. Readiness: 200 (the upstream is up), the KMS key service listed as unavailable.
        for path in ("/ready", "/readyz"):
            status, body = ready(gw, path)
            assert status == 200, body
            assert body.startswith("ready (degraded:"), body
            assert f"upstream {temporal_server.address}: ok" in body, body
            assert "storage aws.s3driver: ok" in body, body
            assert ": unavailable (" in kms_line(body), body

        # 4. The KMS comes back on the same port, the key under the same alias; no restart.
        kms.start()
        client = kms.client()
        key_id = client.create_key(Description="pgw degraded KEK")["KeyMetadata"]["KeyId"]
        client.create_alias(AliasName=ALIAS, TargetKeyId=key_id)
        rig.wait_until(lambda: kms_line(ready(gw)[1]).endswith(": ok"), timeout=60, interval=0.5,
                       what="/ready showing the KMS key service ok")
        status, body = ready(gw)
        assert status == 200 and body.startswith("ready\n"), body

        wf_id, result = await run_workflow(gw, ns_kms, f"{MARKER}-kms")
        assert result == f"{MARKER}-kms-echoed"
        payloads = await server_payloads(direct_kms, ns_kms, wf_id)
        assert payloads and all(p.metadata.get("encoding") == b"binary/encrypted"
                                and p.metadata.get("encryption-key-id") == KEK_ID.encode() for p in payloads), payloads
        assert not any(MARKER.encode() in p.SerializeToString() for p in payloads)
        assert gw.proc.alive() and "panicked" not in gw.output()

    asyncio.run(scenario())


HSM_MODULE = Path(os.environ.get("PGW_SOFTHSM_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))


def test_start_with_the_hsm_token_absent(temporal_server, gateway_factory, workdir):
    """A PKCS#11 KEK whose token is not there at start (SoftHSM2 with an empty token directory,
    as a network HSM not connected yet): the gateway starts (before: it refused the
    configuration, "no initialized token matches"), `/ready` names the key service unavailable,
    its namespace fails UNAVAILABLE naming the key, the keyring namespace works."""
    if not HSM_MODULE.is_file():
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"{HSM_MODULE} is absent: required under CI=true", pytrace=False)
        pytest.skip(f"{HSM_MODULE} is absent (apt-get install softhsm2, or run scripts/setup.sh)")
    hsm_dir = rig.new_tmpdir(workdir, "hsm-absent-")
    (hsm_dir / "tokens").mkdir()
    conf = hsm_dir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {hsm_dir / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin = hsm_dir / "pin"
    pin.write_text("pgw-secret-pin-7f3e\n")
    pin.chmod(0o600)
    uri = f"pkcs11:token=pgw-absent;object=kek?module-path={HSM_MODULE}&pin-source=file:{pin}"
    ns_hsm, ns_ring = f"deg-hsm-{uuid.uuid4().hex[:6]}", f"deg-ring-{uuid.uuid4().hex[:6]}"
    gw = gateway_factory(temporal_server.address, name="degraded-hsm-gw",
                         extra_env={"SOFTHSM2_CONF": str(conf), "PGW_TEST_DEGRADED_K1": rig.b64(os.urandom(32))},
                         config=lambda g: {
                             **g.listener_sections(),
                             "encryption": {"enabled": True, "active_key": "k1",
                                            "keys": [{"id": "k1", "env": "PGW_TEST_DEGRADED_K1"},
                                                     {"id": "hsm-kek", "kms": uri}]},
                             "compression": {"enabled": False},
                             "storage": {"enabled": False},
                             "namespaces": {ns_hsm: {"active_key": "hsm-kek"}, ns_ring: {"active_key": "k1"}},
                         })
    assert gw.proc is not None and gw.proc.alive(), gw.describe()

    async def scenario() -> None:
        direct = await Client.connect(temporal_server.address)
        await register(direct, ns_hsm)
        await register(direct, ns_ring)
        _, result = await run_workflow(gw, ns_ring, f"{MARKER}-ring")
        assert result == f"{MARKER}-ring-echoed"
        through = await Client.connect(gw.address, namespace=ns_hsm)
        start = StartWorkflowExecutionRequest(
            namespace=ns_hsm, workflow_id=f"degraded-hsm-{uuid.uuid4().hex[:8]}",
            workflow_type=WorkflowType(name="DegradedW"), task_queue=TaskQueue(name="degraded-nobody"),
            request_id=str(uuid.uuid4()),
            input=Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=f'"{MARKER}-hsm"'.encode())]))
        with pytest.raises(RPCError) as err:
            await through.workflow_service.start_workflow_execution(start, retry=False)
        assert err.value.status == RPCStatusCode.UNAVAILABLE, err.value
        assert "hsm-kek" in err.value.message and "pgw-secret-pin" not in err.value.message, err.value.message
        listed = await (await Client.connect(temporal_server.address, namespace=ns_hsm)).workflow_service \
            .list_workflow_executions(ListWorkflowExecutionsRequest(namespace=ns_hsm))
        assert not listed.executions, "nothing of the HSM namespace reached the server"

    asyncio.run(scenario())
    status, body = ready(gw)
    assert status == 200 and body.startswith("ready (degraded:"), body
    line = [line for line in body.splitlines() if line.startswith("kms hsm-kek (pkcs11): ")]
    assert line and "unavailable (" in line[0] and "no initialized token matches" in line[0], body
    assert "pgw-secret-pin" not in body
