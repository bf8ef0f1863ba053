"""The three key-encryption-key backends end to end, side by side in one gateway: a namespace
whose data keys are wrapped by an AWS KMS key (moto_server, the AWS KMS API), one by an AES key
on a PKCS#11 token (SoftHSM2, a token made here in a temporary directory) and one by the
reference gRPC KMSService (tests/kms_sidecar.py, started here), with offload to S3 (s3s-fs) on
and a small threshold. Workflows run with the Python SDK through the gateway; the server's
history and the bucket are read directly (no gateway) and hold only ciphertext and wrapped data
keys; 200 activities per namespace cost a handful of KEK calls, counted at the KEK side where
the KEK has a server (moto's request recorder, the sidecar's per-call log lines); the temporal
CLI decodes through the codec endpoint.

Skipped for the PKCS#11 namespace, with a message, when libsofthsm2.so is absent, except under
CI=true (scripts/setup.sh installs softhsm2 and opensc), where its absence fails."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import iter_payloads

MARKER = "PGW-KEK-BACKEND-PLAINTEXT"
BUCKET = "pgw-test"
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"
ACTIVITIES = 200
OFFLOAD_THRESHOLD = 4096
SOFTHSM_MODULE = Path(os.environ.get("PGW_SOFTHSM_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
HSM_TOKEN, HSM_PIN, HSM_SO_PIN = "pgw-e2e", "4321-user", "8765-so"
BACKENDS = ("awskms", "pkcs11", "grpc")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def softhsm_missing() -> str | None:
    """Why the PKCS#11 namespace cannot run here (None: it can); fails under CI=true."""
    if SOFTHSM_MODULE.is_file():
        return None
    why = f"{SOFTHSM_MODULE} is absent (apt-get install softhsm2 opensc, or run scripts/setup.sh)"
    if in_ci():
        pytest.fail(f"{why}: required under CI=true", pytrace=False)
    return why


@activity.defn(name="kek_echo")
async def kek_echo(ns: str, i: int) -> str:
    return f"{MARKER}-{ns}-activity-{i}"


@workflow.defn(name="KekBackendsW")
class ManyActivities:
    @workflow.run
    async def run(self, ns: str, n: int, parallel: int, data: str) -> dict:
        out: list[str] = []
        for start in range(0, n, parallel):
            out += await asyncio.gather(*(
                workflow.execute_activity(kek_echo, args=[ns, i], start_to_close_timeout=timedelta(seconds=60))
                for i in range(start, min(n, start + parallel))))
        # The result is large too (offloaded): a marker past the threshold on the way back.
        return {"results": len(out), "last": out[-1], "echo": data}


# ----------------------------------------------------------------------------- the KEK side


class Sidecar:
    """tests/kms_sidecar.py as a ManagedProcess on a free loopback port (cleartext: loopback);
    counts the calls it logged, one line per call."""

    def __init__(self, workdir: Path, key_id: str):
        self.port = rig.free_port()
        self.address = f"127.0.0.1:{self.port}"
        script = Path(__file__).resolve().parent / "kms_sidecar.py"
        self.proc = rig.ManagedProcess(
            "kms-sidecar", [sys.executable, str(script), "--listen", self.address, "--key-file",
                            str(workdir / "sidecar-kek.bin"), "--key-id", key_id],
            workdir / "kms-sidecar.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rig.wait_until(lambda: "listening on" in self.proc.output() or not self.proc.alive(), 30,
                       what="the KMS sidecar listening")
        if not self.proc.alive():
            raise RuntimeError(f"kms_sidecar.py exited early\n{self.proc.describe()}")

    def calls(self, namespace: str) -> int:
        pattern = re.compile(rf"^kms-sidecar: (Encrypt|Decrypt) .*namespace='{re.escape(namespace)}' ")
        return sum(1 for line in self.proc.output().splitlines() if pattern.match(line))

    def stop(self) -> None:
        self.proc.stop(timeout=5)


def make_softhsm_token(workdir: Path) -> tuple[dict, str]:
    """A SoftHSM2 token in `workdir` holding an AES-256 KEK (sensitive, never extractable), made
    as the README tells an operator to; returns (env for the gateway, the key URI)."""
    tokens = workdir / "tokens"
    tokens.mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    tool_env = {**os.environ, **env}
    for argv in (["softhsm2-util", "--init-token", "--free", "--label", HSM_TOKEN, "--pin", HSM_PIN,
                  "--so-pin", HSM_SO_PIN],
                 ["pkcs11-tool", "--module", str(SOFTHSM_MODULE), "--token-label", HSM_TOKEN, "--login",
                  "--pin", HSM_PIN, "--keygen", "--key-type", "AES:32", "--label", "kek", "--id", "01",
                  "--sensitive", "--private"]):
        out = subprocess.run(argv, env=tool_env, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0, f"{argv[0]} failed: {out.stdout}{out.stderr}"
    pin = workdir / "hsm-pin"
    fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(HSM_PIN + "\n")
    return env, f"pkcs11:token={HSM_TOKEN};object=kek?module-path={SOFTHSM_MODULE}&pin-source=file:{pin}"


def metrics_text(gw: rig.Gateway) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


def kms_metric_calls(gw: rig.Gateway, provider: str) -> int:
    """pgw_kms_calls_total summed over operations and results for `provider`."""
    total = 0
    for line in metrics_text(gw).splitlines():
        if line.startswith("pgw_kms_calls_total{") and f'provider="{provider}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def moto_kms_ops(kms: rig.KmsServer) -> int:
    return sum(v for k, v in kms.calls().items() if k in ("Encrypt", "Decrypt", "GenerateDataKey", "ReEncrypt"))


# ----------------------------------------------------------------------------- the stack


@dataclass
class Run:
    backend: str
    namespace: str
    kek_id: str
    wf_id: str = ""
    result: dict = field(default_factory=dict)
    kek_calls: int = -1  # counted at the KEK side (pkcs11: the gateway's metric, see below)


@dataclass
class Stack:
    server: rig.TemporalServer
    gw: rig.Gateway
    s3: rig.S3Server
    runs: dict[str, Run]
    data: str
    skipped: dict[str, str]


async def register_namespace(address: str, name: str) -> None:
    client = await Client.connect(address, namespace="default")
    await client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=name, workflow_execution_retention_period=Duration(seconds=24 * 3600)))
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=name))
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_workflow(address: str, run: Run, data: str) -> None:
    client = await Client.connect(address, namespace=run.namespace)
    tq = f"kek-{run.backend}-{uuid.uuid4().hex[:6]}"
    run.wf_id = f"kek-{run.backend}-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=tq, workflows=[ManyActivities], activities=[kek_echo],
                      workflow_runner=UnsandboxedWorkflowRunner(), max_concurrent_activities=20):
        run.result = await client.execute_workflow(
            ManyActivities.run, args=[run.namespace, ACTIVITIES, 20, data], id=run.wf_id, task_queue=tq,
            execution_timeout=timedelta(seconds=150))


@pytest.fixture(scope="module")
def stack(temporal_server, workdir):
    """One gateway, three namespaces (one per KEK backend), offload on; each namespace has run
    one workflow of 200 activities, its KEK calls counted around it."""
    base = rig.new_tmpdir(workdir, "kek-backends-")
    procs: list = []
    try:
        kms = rig.KmsServer(base / "moto")
        procs.append(kms)
        kms.start()
        s3 = rig.S3Server(base / "s3")
        s3.make_bucket(BUCKET)
        procs.append(s3)
        s3.start()
        sidecar = Sidecar(base, "svc-kek")
        procs.append(sidecar)

        suffix = uuid.uuid4().hex[:6]
        runs = {"awskms": Run("awskms", "default", "aws-kek"),
                "pkcs11": Run("pkcs11", f"kek-hsm-{suffix}", "hsm-kek"),
                "grpc": Run("grpc", f"kek-svc-{suffix}", "svc-kek")}
        skipped: dict[str, str] = {}
        keys = [{"id": "aws-kek", "kms": f"awskms:///{kms.create_key('pgw kek-backends')}"},
                {"id": "svc-kek", "kms": "grpc://sidecar"}]
        env = {**kms.gateway_env(), "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
        why = softhsm_missing()
        if why is None:
            hsm_dir = base / "softhsm"
            hsm_dir.mkdir()
            hsm_env, hsm_uri = make_softhsm_token(hsm_dir)
            env.update(hsm_env)
            keys.append({"id": "hsm-kek", "kms": hsm_uri})
        else:
            skipped["pkcs11"] = why
            del runs["pkcs11"]
        for run in runs.values():
            if run.namespace != "default":
                asyncio.run(register_namespace(temporal_server.address, run.namespace))

        gw = rig.Gateway(base / "gateway", temporal_server.address, extra_env=env, name="gateway-kek")
        procs.append(gw)
        config = {
            **gw.listener_sections(codec_server=True),
            "encryption": {"enabled": True, "active_key": "aws-kek", "keys": keys},
            "compression": {"enabled": True},
            "storage": {
                "enabled": True, "driver": "aws.s3driver", "threshold": OFFLOAD_THRESHOLD,
                "drivers": [{"name": "aws.s3driver", "kind": "s3", "bucket": BUCKET, "endpoint": s3.endpoint,
                             "region": "us-east-1", "force_path_style": True, "timeout_ms": 5000}],
            },
            "kms_servers.sidecar": {"address": sidecar.address, "tls": False},
        }
        for run in runs.values():
            config[f"namespaces.{run.namespace}"] = {"encryption": True, "active_key": run.kek_id}
        gw.configure(config).start()

        # Random hex does not compress: past the offload threshold after zstd, on the way in
        # (workflow input) and out (result).
        data = "".join(f"{MARKER}-{os.urandom(1000).hex()}" for _ in range(8))
        counters = {"awskms": lambda r: moto_kms_ops(kms),
                    "grpc": lambda r: sidecar.calls(r.namespace),
                    # A token has no server log to count at: the gateway's own metric (recorded
                    # for every provider where the data-key manager calls a KEK) is the count.
                    "pkcs11": lambda r: kms_metric_calls(gw, "pkcs11")}
        before = {b: counters[b](r) for b, r in runs.items()}

        async def all_runs():
            await asyncio.gather(*(run_workflow(gw.address, r, data) for r in runs.values()))

        asyncio.run(all_runs())
        for b, r in runs.items():
            r.kek_calls = counters[b](r) - before[b]
        yield Stack(temporal_server, gw, s3, runs, data, skipped)
    except BaseException:
        for p in procs:
            describe = getattr(p, "describe", None) or getattr(getattr(p, "proc", None), "describe", None)
            if describe is not None:
                print(describe(), file=sys.stderr)
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def run_for(stack: Stack, backend: str) -> Run:
    if backend in stack.skipped:
        pytest.skip(stack.skipped[backend])
    return stack.runs[backend]


async def history(address: str, namespace: str, wf_id: str):
    client = await Client.connect(address, namespace=namespace)
    return await client.get_workflow_handle(wf_id).fetch_history()


def bucket_objects(stack: Stack, namespace: str) -> list[Path]:
    root = stack.s3.root / BUCKET
    return [p for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and f"/ns/{namespace}/" in f"/{p.relative_to(root)}"]


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_and_bucket_hold_only_ciphertext(stack, backend):
    run = run_for(stack, backend)
    assert run.result == {"results": ACTIVITIES, "last": f"{MARKER}-{run.namespace}-activity-{ACTIVITIES - 1}",
                          "echo": stack.data}, "the result does not decode through the gateway"

    raw = asyncio.run(history(stack.server.address, run.namespace, run.wf_id))
    assert MARKER.encode() not in b"".join(e.SerializeToString() for e in raw.events), \
        "plaintext marker in the server's history"
    encrypted, refs = [], []
    for event in raw.events:
        for path, p in iter_payloads(event):
            if p.metadata.get("messageType") == REF_TYPE:
                refs.append(p)
                continue
            assert p.metadata.get("encoding") == b"binary/encrypted", f"{path}: {dict(p.metadata)}"
            assert p.metadata.get("encryption-key-id") == run.kek_id.encode(), f"{path}: {dict(p.metadata)}"
            assert len(p.metadata.get("encryption-dek", b"")) > 32, path
            encrypted.append(p)
    assert len(encrypted) >= 2 * ACTIVITIES, len(encrypted)
    assert len(refs) >= 2, "the workflow input and result were not offloaded"

    objects = bucket_objects(stack, run.namespace)
    assert len(objects) >= 2, f"no objects under ns/{run.namespace}/ in the bucket"
    for o in objects:
        blob = o.read_bytes()
        assert MARKER.encode() not in blob, f"plaintext in {o}"
        decoded = Payload.FromString(blob)
        assert decoded.metadata.get("encoding") == b"binary/encrypted", (o, dict(decoded.metadata))
        assert decoded.metadata.get("encryption-key-id") == run.kek_id.encode(), (o, dict(decoded.metadata))
        assert len(decoded.metadata.get("encryption-dek", b"")) > 32, o

    # Through the gateway the whole history decodes (offloaded payloads resolved).
    through = asyncio.run(history(stack.gw.address, run.namespace, run.wf_id))
    plain = b"".join(e.SerializeToString() for e in through.events)
    assert f"{MARKER}-{run.namespace}-activity-7".encode() in plain
    for event in through.events:
        for path, p in iter_payloads(event):
            assert p.metadata.get("encoding") != b"binary/encrypted", path


@pytest.mark.parametrize("backend", BACKENDS)
def test_200_activities_make_a_handful_of_kek_calls(stack, backend):
    run = run_for(stack, backend)
    # One wrap for the namespace's first data key; no unwrap (the gateway made and caches the
    # key); a background replacement at most. Counted by the KEK's server for awskms (moto's
    # request recorder) and grpc (the sidecar's log, this namespace's lines); for pkcs11 by
    # pgw_kms_calls_total{provider="pkcs11"} (SoftHSM2 is a library in the gateway's process:
    # there is no server to count at).
    assert 1 <= run.kek_calls <= 5, f"{backend}: {run.kek_calls} KEK calls for {ACTIVITIES} activities"
    assert f'pgw_kms_calls_total{{provider="{backend}",operation="wrap",result="ok"}}' in metrics_text(stack.gw)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([rig.temporal_bin(), "--color", "never", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def shown_payloads(cli_json: str) -> list[tuple[bytes, bytes]]:
    """(encoding, data) of every payload in `temporal ... --output json` output."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            md = node.get("metadata")
            if isinstance(md, dict) and "encoding" in md:
                found.append((base64.b64decode(md["encoding"]), base64.b64decode(node.get("data", ""))))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(cli_json))
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_decodes_through_codec_endpoint(stack, backend):
    run = run_for(stack, backend)
    marker = f"{MARKER}-{run.namespace}-activity-".encode()
    base = ["workflow", "show", "--workflow-id", run.wf_id, "--namespace", run.namespace,
            "--address", stack.server.address, "--output", "json"]

    raw = cli(*base)
    assert raw.returncode == 0, raw.stderr
    assert MARKER not in raw.stdout
    raw_payloads = shown_payloads(raw.stdout)
    assert raw_payloads and not any(MARKER.encode() in data for _, data in raw_payloads)

    # `{namespace}` is substituted by the CLI: the gateway sees /<namespace>/decode and
    # decrypts with that namespace's key.
    decoded = cli(*base, "--codec-endpoint", f"http://127.0.0.1:{stack.gw.codec_port}/{{namespace}}")
    assert decoded.returncode == 0, decoded.stderr
    payloads = shown_payloads(decoded.stdout)
    assert len(payloads) == len(raw_payloads)
    assert not any(enc == b"binary/encrypted" for enc, _ in payloads), payloads[:3]
    assert sum(1 for _, data in payloads if marker in data) >= ACTIVITIES, "activity results not decoded"
