"""`payload-gateway keys audit`: per key id, the payloads, executions and stored objects it
still protects at the server, checked against an independent count.

Workflows run through the gateway under three keys in turn (SIGHUP switches the active key),
some with payloads large enough to be offloaded to a real S3 server (s3s-fs). The test then
counts on its own: it reads every history directly from the server, walks the payloads by
reflection (not with the gateway's walker), follows each storage reference to its object in
the bucket's directory, and reads the key id there. The audit must report the same figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload, WorkflowExecution
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import iter_payloads

KEYS = {kid: os.urandom(32) for kid in ("k1", "k2", "k3")}
BUCKET = "pgw-test"
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"
THRESHOLD = 64 * 1024


@activity.defn
async def echo_len(text: str) -> str:
    return f"{len(text)}:" + text[:4096]


@workflow.defn(name="Audited")
class AuditedWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(echo_len, text, start_to_close_timeout=timedelta(seconds=60))


def audit(gw: rig.Gateway, env: dict) -> dict:
    p = subprocess.run([str(rig.gateway_bin()), "--config", str(gw.config_path), "keys", "audit", "-n", "default", "--json"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert p.returncode == 0, f"keys audit failed ({p.returncode}):\n{p.stderr}"
    return json.loads(p.stdout)["namespaces"]["default"]


def independent_count(server: rig.TemporalServer, s3: rig.S3Server) -> tuple[dict, int]:
    """Per key id: payloads, executions, distinct objects, from the server and the bucket."""

    def key_of(p: Payload) -> str:
        if p.metadata.get("encoding") != b"binary/encrypted":
            return "(not encrypted)"
        return p.metadata["encryption-key-id"].decode()

    async def read():
        client = await Client.connect(server.address)
        per_key = defaultdict(lambda: {"payloads": 0, "executions": set(), "objects": set()})
        executions = 0
        async for wf in client.list_workflows(""):
            executions += 1
            history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
            for event in history.events:
                for path, p in iter_payloads(event):
                    if "search_attributes" in path:
                        continue  # the server indexes these: never encrypted, not walked
                    if p.metadata.get("encoding") == b"json/protobuf" and p.metadata.get("messageType") == REF_TYPE:
                        claim = json.loads(p.data)["claimData"]
                        obj = s3.root / claim["bucket"] / claim["key"]
                        key = key_of(Payload.FromString(obj.read_bytes()))
                        per_key[key]["objects"].add(claim["key"])
                    else:
                        key = key_of(p)
                    per_key[key]["payloads"] += 1
                    per_key[key]["executions"].add((wf.id, wf.run_id))
        return per_key, executions

    per_key, executions = asyncio.run(read())
    return ({k: {"payloads": v["payloads"], "executions": len(v["executions"]), "objects": len(v["objects"])}
             for k, v in per_key.items()}, executions)


def test_keys_audit_counts_payloads_executions_and_objects_per_key(dedicated_temporal_server, s3_server, gateway_factory):
    server, s3 = dedicated_temporal_server, s3_server
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    gw = gateway_factory(server.address, config={}, start=False, extra_env=env, name="gw-audit")
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": rig.key_files(gw.workdir, KEYS)},
        "compression": {"enabled": True, "min_size": 64},
        "storage": {
            "enabled": True, "driver": "aws.s3driver", "threshold": THRESHOLD,
            "drivers": [{"name": "aws.s3driver", "kind": "s3", "bucket": BUCKET, "endpoint": s3.endpoint,
                         "region": "us-east-1", "force_path_style": True, "timeout_ms": 5000}],
        },
    }).start()
    tag = uuid.uuid4().hex[:6]
    # Per phase: (active key, small workflows, large workflows). Large inputs are offloaded.
    phases = [("k1", 3, 1), ("k2", 2, 2), ("k3", 4, 0)]

    async def run():
        client = await Client.connect(gw.address)
        tq = f"tq-audit-{tag}"
        async with Worker(client, task_queue=tq, workflows=[AuditedWorkflow], activities=[echo_len],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            for n, (key, small, large) in enumerate(phases):
                if n:
                    reloads = gw.output().count("keys reloaded")
                    gw.config["encryption"]["active_key"] = key
                    gw.configure()
                    os.kill(gw.proc.pid, signal.SIGHUP)
                    rig.wait_until(lambda: gw.output().count("keys reloaded") > reloads, 10, what="SIGHUP reload")
                inputs = [f"small-{key}-{i}" for i in range(small)]
                inputs += [os.urandom(THRESHOLD).hex() for _ in range(large)]  # 128 KiB of hex: offloaded
                for i, text in enumerate(inputs):
                    result = await client.execute_workflow(AuditedWorkflow.run, text, id=f"audit-{tag}-{key}-{i}", task_queue=tq)
                    assert result.startswith(f"{len(text)}:")

    asyncio.run(run())
    expected, executions = independent_count(server, s3)
    assert set(expected) == {"k1", "k2", "k3"}, f"every payload should be encrypted, by phase: {expected}"
    assert expected["k1"]["objects"] >= 1 and expected["k2"]["objects"] >= 2, expected
    assert executions == sum(s + l for _, s, l in phases)

    # Visibility is eventually consistent: the audit lists executions the way the test did.
    deadline = time.monotonic() + 30
    while True:
        report = audit(gw, env)
        if report["executions"] == executions or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert report["executions"] == executions, report
    got = {k: {f: v[f] for f in ("payloads", "executions", "objects")} for k, v in report["keys"].items()}
    assert got == expected, f"audit {got}\nindependent {expected}"
    for key in ("k1", "k2", "k3"):
        assert report["keys"][key]["newest_event"], report["keys"][key]
    # k3 was active last: its newest event is the newest of all.
    assert report["keys"]["k3"]["newest_event"] >= report["keys"]["k1"]["newest_event"]

    # Retirement (SECURITY.md "Retiring a key"): once what k1 protects is gone from the server
    # (retention would do it; here the executions are deleted), the audit no longer lists k1,
    # k1 is removed by SIGHUP, and everything left still decodes.
    async def delete_k1_executions():
        client = await Client.connect(gw.address)
        for i in range(phases[0][1] + phases[0][2]):
            await client.workflow_service.delete_workflow_execution(wsr.DeleteWorkflowExecutionRequest(
                namespace="default", workflow_execution=WorkflowExecution(workflow_id=f"audit-{tag}-k1-{i}")))

    asyncio.run(delete_k1_executions())
    deadline = time.monotonic() + 60
    while "k1" in (report := audit(gw, env))["keys"] and time.monotonic() < deadline:
        time.sleep(1)
    assert "k1" not in report["keys"], report
    assert set(report["keys"]) == {"k2", "k3"}, report
    reloads = gw.output().count("keys reloaded")
    gw.config["encryption"]["keys"] = [k for k in gw.config["encryption"]["keys"] if k["id"] != "k1"]
    gw.configure()
    os.kill(gw.proc.pid, signal.SIGHUP)
    rig.wait_until(lambda: gw.output().count("keys reloaded") > reloads, 10, what="SIGHUP reload")

    async def read_everything_back():
        client = await Client.connect(gw.address)
        seen = 0
        async for wf in client.list_workflows(""):
            handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
            assert (await handle.result()).count(":") >= 1
            for event in (await handle.fetch_history()).events:
                for _, p in iter_payloads(event):
                    assert p.metadata.get("encoding") != b"binary/encrypted", f"{wf.id}: not decoded"
            seen += 1
        return seen

    assert asyncio.run(read_everything_back()) == executions - (phases[0][1] + phases[0][2])


def test_keys_audit_names_an_unreachable_upstream(workdir):
    cfg = rig.new_tmpdir(workdir, "audit-down-") / "gw.toml"
    port = rig.free_port()
    cfg.write_text(rig.render_toml({"proxy": {"upstream": f"127.0.0.1:{port}", "connect_timeout_ms": 500},
                                    "encryption": {"enabled": False}, "storage": {"enabled": False}}))
    p = subprocess.run([str(rig.gateway_bin()), "--config", str(cfg), "keys", "audit", "-n", "default"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p
    assert "keys audit failed" in p.stderr and f"127.0.0.1:{port}" in p.stderr and "grpc-status 14" in p.stderr, p.stderr
