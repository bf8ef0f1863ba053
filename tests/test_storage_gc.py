"""`payload-gateway storage gc` (issue 25, item 4): mark and sweep of offloaded objects, over a
bucket written by the gateway and by the Python SDK's own ExternalStorage with its S3 driver
(s3s-fs as the store, SDK defaults: the SDK offloads from 256 KiB).

One namespace of the shared dev server holds, each with its objects in the bucket:
- an open workflow (waiting for a signal), offloaded by the gateway;
- a closed workflow (within retention), offloaded by the gateway;
- a closed workflow whose client and worker used the SDK's ExternalStorage straight to the
  server (SDK-written references and objects);
- a gateway-offloaded and an SDK-offloaded workflow that are then deleted at the server;
- an object written just before the collector runs that no history references yet.

The dry run (the default) reports and deletes nothing; `--delete` with a short `--grace` deletes
exactly the deleted executions' objects; the open workflow then completes (its objects still
read) and the closed ones' results still resolve. A run whose upstream cannot be read exits
non-zero and deletes nothing. The bucket is read on disk (s3s-fs), not through the gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

from google.protobuf.duration_pb2 import Duration
from temporalio import activity, workflow
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import (DeleteWorkflowExecutionRequest, DescribeNamespaceRequest,
                                               DescribeWorkflowExecutionRequest, RegisterNamespaceRequest)
from temporalio.client import Client
from temporalio.converter import DataConverter, ExternalStorage
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig

BUCKET = "pgw-test"
THRESHOLD = 1024          # the gateway offloads from 1 KiB
SDK_SIZE = 300 * 1024     # past the SDK's default threshold of 256 KiB
GRACE_S = 20
KEY = os.urandom(32)


@activity.defn(name="gc_grow")
async def gc_grow(text: str) -> str:
    return text + "-grown"


@workflow.defn(name="GcW")
class GcW:
    def __init__(self) -> None:
        self.finish = False

    @workflow.signal
    def done(self) -> None:
        self.finish = True

    @workflow.run
    async def run(self, text: str, wait: bool) -> str:
        grown = await workflow.execute_activity(gc_grow, text, start_to_close_timeout=timedelta(seconds=30))
        if wait:
            await workflow.wait_condition(lambda: self.finish)
        return grown


def objects(s3: rig.S3Server) -> dict[str, float]:
    """Every object in the bucket (key -> mtime), read on disk."""
    root = s3.root / BUCKET
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


async def register(client: Client, ns: str) -> None:
    await client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=ns, workflow_execution_retention_period=Duration(seconds=24 * 3600)))
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=ns))
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def sdk_converter(s3: rig.S3Server, stack) -> DataConverter:
    """The SDK's own ExternalStorage with its S3 driver, defaults otherwise."""
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
    return dataclasses.replace(DataConverter.default, external_storage=storage)


def gc(gw: rig.Gateway, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    argv = [str(rig.gateway_bin()), "--config", str(config or gw.config_path), "storage", "gc", *args]
    env = {**os.environ, **gw.extra_env}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=gw.workdir)


def test_storage_gc(temporal_server, gateway_factory, s3_server):
    ns = f"gc-{uuid.uuid4().hex[:8]}"
    gw = rig.encrypting_gateway(gateway_factory, temporal_server.address, KEY, "PGW_TEST_GC_KEY", "k1",
                                extra_env=s3_server.env(), compression={"enabled": False},
                                storage=s3_server.storage_section(BUCKET, THRESHOLD, 10000))
    made: dict[str, set[str]] = {}
    ids: dict[str, str] = {}

    async def run_one(name: str, client: Client, worker_client: Client, text: str, wait: bool = False):
        before = set(objects(s3_server))
        queue = f"gc-{name}-{uuid.uuid4().hex[:6]}"
        wf_id = ids[name] = f"gc-{name}-{uuid.uuid4().hex[:6]}"
        async with Worker(worker_client, task_queue=queue, workflows=[GcW], activities=[gc_grow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            handle = await client.start_workflow(GcW.run, args=[text, wait], id=wf_id, task_queue=queue)
            if wait:
                # Open: once the activity result is in history, the workflow waits for its signal.
                deadline = time.monotonic() + 60
                while not any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                              for e in (await handle.fetch_history()).events):
                    assert time.monotonic() < deadline, "the open workflow's activity"
                    await asyncio.sleep(0.2)
            else:
                assert await handle.result() == text + "-grown"
        made[name] = set(objects(s3_server)) - before
        assert made[name], f"{name}: nothing was offloaded"

    async def delete(direct: Client, name: str) -> None:
        execution = WorkflowExecution(workflow_id=ids[name])
        await direct.workflow_service.delete_workflow_execution(
            DeleteWorkflowExecutionRequest(namespace=ns, workflow_execution=execution))
        deadline = time.monotonic() + 60
        while True:
            try:
                await direct.workflow_service.describe_workflow_execution(
                    DescribeWorkflowExecutionRequest(namespace=ns, execution=execution))
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return
                raise
            assert time.monotonic() < deadline, f"{name} not deleted"
            await asyncio.sleep(0.5)

    async def setup() -> None:
        from contextlib import AsyncExitStack
        direct = await Client.connect(temporal_server.address, namespace=ns)
        await register(direct, ns)
        through = await Client.connect(gw.address, namespace=ns)
        big = lambda tag: f"{tag}-" + os.urandom(4 * THRESHOLD).hex()  # noqa: E731
        await run_one("open", through, through, big("open"), wait=True)
        await run_one("closed", through, through, big("closed"))
        await run_one("deleted", through, through, big("deleted"))
        async with AsyncExitStack() as stack:
            conv = await sdk_converter(s3_server, stack)
            sdk = await Client.connect(temporal_server.address, namespace=ns, data_converter=conv)
            sdk_big = lambda tag: f"{tag}-" + os.urandom(SDK_SIZE // 2).hex()  # noqa: E731
            await run_one("sdk-closed", sdk, sdk, sdk_big("sdk-closed"))
            await run_one("sdk-deleted", sdk, sdk, sdk_big("sdk-deleted"))
        await delete(direct, "deleted")
        await delete(direct, "sdk-deleted")

    asyncio.run(setup())
    for name in ("sdk-closed", "sdk-deleted"):
        assert all(k.startswith(f"v0/ns/{ns}/") for k in made[name]), made[name]
    keep = made["open"] | made["closed"] | made["sdk-closed"]
    gone = made["deleted"] | made["sdk-deleted"]
    # Everything made so far is older than the grace period; the young object is not.
    oldest_allowed = time.time() - GRACE_S
    while max(objects(s3_server)[k] for k in keep | gone) > oldest_allowed:
        time.sleep(0.5)
        oldest_allowed = time.time() - GRACE_S
    young_data = b"uploaded, reference not in history yet"
    young = f"v0/ns/{ns}/wt/GcW/wi/young/ri/null/d/sha256/{hashlib.sha256(young_data).hexdigest()}"
    (s3_server.root / BUCKET / young).parent.mkdir(parents=True, exist_ok=True)
    (s3_server.root / BUCKET / young).write_bytes(young_data)
    sizes = {k: (s3_server.root / BUCKET / k).stat().st_size for k in keep | gone | {young}}
    before = objects(s3_server)

    # Fail safe: an upstream that cannot be read deletes nothing and exits non-zero.
    broken = gw.workdir / "gc-broken.toml"
    cfg = json.loads(json.dumps(gw.config))
    cfg["proxy"]["upstream"] = f"127.0.0.1:{rig.free_port()}"
    broken.write_text(rig.render_toml(cfg))
    failed = gc(gw, "--namespace", ns, "--delete", "--grace", f"{GRACE_S}s", config=broken)
    assert failed.returncode not in (0, None), failed
    assert "nothing was deleted" in failed.stderr, failed.stderr
    assert objects(s3_server) == before

    # Dry run (the default): counts and bytes, nothing deleted.
    dry = gc(gw, "--namespace", ns, "--grace", f"{GRACE_S}s", "--json")
    assert dry.returncode == 0, dry
    report = json.loads(dry.stdout)
    assert report["deleted"] is False
    d = report["drivers"]["aws.s3driver"]
    assert d["bucket"] == BUCKET
    assert d["referenced"] == {"objects": len(keep), "bytes": sum(sizes[k] for k in keep)}, (d, made)
    assert d["young"] == {"objects": 1, "bytes": len(young_data)}, d
    assert d["unreferenced"] == {"objects": len(gone), "bytes": sum(sizes[k] for k in gone)}, (d, made)
    assert d["deleted"] == {"objects": 0, "bytes": 0}, d
    assert report["namespaces"][ns]["executions"] >= 3, report
    assert report["namespaces"][ns]["references"] >= len(keep), report
    assert objects(s3_server) == before
    text = gc(gw, "-n", ns, "--grace", f"{GRACE_S}s")
    assert text.returncode == 0 and f"would delete {len(gone)} objects" in " ".join(text.stdout.split()), text.stdout

    # The default grace (retention 1 day + 1 day) keeps everything.
    default = json.loads(gc(gw, "--namespace", ns, "--json").stdout)
    assert default["namespaces"][ns]["grace_s"] == 2 * 24 * 3600
    assert default["drivers"]["aws.s3driver"]["unreferenced"]["objects"] == 0

    # --delete: exactly the deleted executions' objects go (the young object just uploaded).
    os.utime(s3_server.root / BUCKET / young)
    swept = gc(gw, "--all-namespaces", "--delete", "--grace", f"{GRACE_S}s", "--json")
    assert swept.returncode == 0, swept
    assert json.loads(swept.stdout)["drivers"]["aws.s3driver"]["deleted"]["objects"] >= len(gone)
    left = set(objects(s3_server))
    assert not (gone & left), gone & left
    assert keep | {young} <= left, (keep | {young}) - left

    # What was kept still works: the open workflow finishes, the closed ones' results resolve.
    async def after() -> None:
        from contextlib import AsyncExitStack
        through = await Client.connect(gw.address, namespace=ns)
        queue_handle = through.get_workflow_handle(ids["open"])
        # Its worker is gone: a new one on the task queue it was started on.
        desc = await queue_handle.describe()
        async with Worker(through, task_queue=desc.task_queue, workflows=[GcW], activities=[gc_grow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            await queue_handle.signal(GcW.done)
            assert (await queue_handle.result()).endswith("-grown")
        assert (await through.get_workflow_handle(ids["closed"]).result()).startswith("closed-")
        async with AsyncExitStack() as stack:
            conv = await sdk_converter(s3_server, stack)
            sdk = await Client.connect(temporal_server.address, namespace=ns, data_converter=conv)
            assert (await sdk.get_workflow_handle(ids["sdk-closed"]).result()).startswith("sdk-closed-")

    asyncio.run(after())
