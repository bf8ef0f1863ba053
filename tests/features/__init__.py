"""Shared helpers of the feature suite (tests/test_features_*.py): a gateway with encryption,
compression and offload to s3s-fs on, direct (gateway-bypassing) history reads, and a check that
the server holds no plaintext."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import uuid
from pathlib import Path
from typing import Iterable, Optional

from temporalio.api.common.v1 import Payload
from temporalio.client import Client

import rig
from sdk_codec import ENCRYPTED, iter_payloads

KEYS = {"k1": bytes(range(32)), "k2": bytes(range(100, 132))}
BUCKET = "pgw-test"
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"
THRESHOLD = 64 * 1024
MARKER = "PGW-FEATURE-PLAINTEXT"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def blob(n: int, seed: str) -> str:
    """`n` chars: MARKER every 4 KiB between hex of seeded random bytes (compresses only ~2x,
    so a 300 KB blob is still ~150 KB after zstd and is offloaded)."""
    rnd = random.Random(seed)
    out, size = [], 0
    while size < n:
        chunk = MARKER + rnd.randbytes(2048).hex()
        out.append(chunk)
        size += len(chunk)
    return "".join(out)[:n]


def sha(s) -> str:
    return hashlib.sha256(s if isinstance(s, bytes) else s.encode()).hexdigest()


def gateway_config(gw: rig.Gateway, s3: Optional[rig.S3Server], active: str = "k1", namespaces: Optional[dict] = None,
                   threshold: int = THRESHOLD, extra: Optional[dict] = None) -> dict:
    config = {
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": active, "keys": rig.key_files(gw.workdir, KEYS)},
        "compression": {"enabled": True, "min_size": 64},
    }
    if s3 is not None:
        config["storage"] = {
            "enabled": True, "driver": "aws.s3driver", "threshold": threshold,
            "drivers": [{"name": "aws.s3driver", "kind": "s3", "bucket": BUCKET, "endpoint": s3.endpoint,
                         "region": "us-east-1", "force_path_style": True, "timeout_ms": 10000,
                         "max_payload_size": 128 * 1024 * 1024}],
        }
    else:
        config["storage"] = {"enabled": False}
    for ns, values in (namespaces or {}).items():
        config[f"namespaces.{ns}"] = dict(values)
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return config


def s3_env(s3: Optional[rig.S3Server]) -> dict:
    if s3 is None:
        return {}
    return {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}


def full_gateway(gateway_factory, upstream: str, s3: Optional[rig.S3Server], name: str = "gw-feat", **kw) -> rig.Gateway:
    """A started gateway: encryption (keys k1, k2), compression, offload to s3s-fs at `threshold`."""
    gw = gateway_factory(upstream, config={}, start=False, name=name, extra_env=s3_env(s3))
    gw.configure(gateway_config(gw, s3, **kw))
    return gw.start()


async def server_history(server_address: str, workflow_id: str, namespace: str = "default", run_id: Optional[str] = None):
    """The history as the server holds it: read directly from the server, no codec, no gateway."""
    client = await Client.connect(server_address, namespace=namespace)
    return await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()


def assert_no_plaintext(history, markers: Iterable[bytes], s3: Optional[rig.S3Server] = None) -> dict:
    """Every payload in the history (except search attributes) is either AES-GCM ciphertext or an
    external storage reference; no marker appears anywhere in the raw history bytes, nor in any
    object of the bucket. Returns {"key_ids": set, "refs": int, "encrypted": int, "bytes": int}."""
    key_ids, refs, encrypted = set(), 0, 0
    found = False
    for event in history.events:
        for path, p in iter_payloads(event):
            if ".search_attributes." in f".{path}.":
                continue
            found = True
            if p.metadata.get("messageType") == REF_TYPE:
                ref = json.loads(p.data)
                assert ref["driverName"] == "aws.s3driver", ref
                refs += 1
                continue
            assert p.metadata.get("encoding") == ENCRYPTED, \
                f"event {event.event_id} {path} reached the server unencrypted: {dict(p.metadata)} {p.data[:80]!r}"
            key_ids.add(p.metadata["encryption-key-id"].decode())
            encrypted += 1
    assert found, "history has no payloads at all"
    raw = b"".join(e.SerializeToString() for e in history.events)
    markers = list(markers)
    for marker in markers:
        assert marker not in raw, f"plaintext {marker!r} found in the server's history"
    if s3 is not None:
        assert_bucket_ciphertext(s3, markers)
    return {"key_ids": key_ids, "refs": refs, "encrypted": encrypted, "bytes": len(raw)}


def bucket_objects(s3: rig.S3Server) -> list[Path]:
    root = s3.root / BUCKET
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def assert_bucket_ciphertext(s3: rig.S3Server, markers: Iterable[bytes]) -> None:
    for obj in bucket_objects(s3):
        data = obj.read_bytes()
        stored = Payload.FromString(data)
        assert stored.metadata.get("encoding") == ENCRYPTED, f"{obj} holds a non-encrypted payload"
        for marker in markers:
            assert marker not in data, f"plaintext {marker!r} in {obj}"


def b64_variants(marker: bytes) -> list[bytes]:
    """The marker as it appears inside base64 text at each of the 3 alignments (Workflow Streams
    items travel as base64 of a serialized Payload inside a JSON payload)."""
    out = []
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + marker)
        start = (pad * 4 + 2) // 3 + 1   # skip characters touched by the padding bytes
        out.append(enc[start:len(enc) - 4])
    return [v for v in out if len(v) >= 8]
