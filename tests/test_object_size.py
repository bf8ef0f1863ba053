"""An object larger than its reference declares is refused before its body is read (issue 22).

A reference carries the size of the payload it stands for (`external_payloads[0].size_bytes`).
The gateway charges that size to the request's memory budget before fetching; an object that
is larger must then be refused from the store's metadata (`Content-Length`, a file's length),
not after it was read whole, or references declaring a few bytes each let concurrent RPCs
pull `max_payload_size` (50 MiB) apiece into memory.

The attack, through the real gateway: a hash-valid object of several MiB in the bucket, and a
workflow started directly on the server whose input is a reference to it declaring 1,000
bytes. Reading the history through the gateway must fail with DATA_LOSS naming the sizes,
while a relay in front of the store (S3 on s3s-fs, GCS on fake-gcs-server, Azure on Azurite)
sees almost none of the object go by; with the filesystem driver, the gateway's file reads
(`/proc/<pid>/io`, `rchar`) stay small for a 256 MiB sparse object. The same reference
declaring the object's true size is resolved (the relay sees the whole object): the
measurement can tell a read from a refusal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.service import RPCError, RPCStatusCode

import rig
from conftest import _attach
from raw_rpc import history_raw, start_raw
from test_offload import BUCKET, REF_TYPE, AzureStore, GcsStore, S3Store, Store

DECLARED = 1000
# What may cross the relay while an oversized object is refused: response headers and the few
# paced chunks in flight before the gateway closes the connection.
REFUSED_BUDGET = 2 << 20


class PacedRelay:
    """A TCP relay in front of a store that counts the bytes the store sends toward the
    gateway, forwarding them at a steady pace (16 KiB every 5 ms) so that what the gateway
    leaves unread is not buffered ahead of it."""

    CHUNK = 16 * 1024
    PAUSE = 0.005

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._received = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return

        def upward() -> None:
            try:
                while data := client.recv(65536):
                    server.sendall(data)
            except OSError:
                pass
            try:
                server.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=upward, daemon=True).start()
        try:
            while data := server.recv(self.CHUNK):
                client.sendall(data)
                with self._lock:
                    self._received += len(data)
                time.sleep(self.PAUSE)
        except OSError:
            pass
        finally:
            server.close()
            client.close()

    @property
    def received(self) -> int:
        with self._lock:
            return self._received

    def reset(self) -> None:
        with self._lock:
            self._received = 0

    def stop(self) -> None:
        self._closed = True
        self.listener.close()


def relayed_store(kind: str, workdir: Path, request):
    """The emulator of `kind` with bucket BUCKET and a relay in front: (Store, emulator, relay,
    the gateway's driver settings pointing at the relay)."""
    if kind == "s3":
        server = rig.S3Server(rig.new_tmpdir(workdir, "s3-"))
        server.make_bucket(BUCKET)
        relay = PacedRelay(server.port)
        server.start()
        store: Store = S3Store(server)
        endpoint = f"http://127.0.0.1:{relay.port}"
    elif kind == "gcs":
        server = rig.GcsServer(rig.new_tmpdir(workdir, "gcs-"))
        relay = PacedRelay(server.port)
        # XML API requests are routed by Host: the relay's address is the public host.
        server.host = f"127.0.0.1:{relay.port}"
        server.start()
        store = GcsStore(server)
        endpoint = f"http://127.0.0.1:{relay.port}"
    else:
        server = rig.AzuriteServer(rig.new_tmpdir(workdir, "azurite-"))
        relay = PacedRelay(server.port)
        server.start()
        store = AzureStore(server)
        endpoint = f"http://127.0.0.1:{relay.port}/{server.account}"
    _attach(request, server.proc)
    if kind != "s3":
        store.make_bucket(BUCKET)
    # The paced relay makes a whole object take seconds: allow a minute per operation.
    settings = {**store.driver_config(timeout_ms=60_000), "endpoint": endpoint}
    return store, server, relay, settings


@pytest.fixture(params=["s3", "gcs", "azure"])
def relayed(request, workdir):
    store, server, relay, settings = relayed_store(request.param, workdir, request)
    yield store, relay, settings
    relay.stop()
    server.stop()


def start_gateway(gateway_factory, upstream: str, driver: dict, env: dict) -> rig.Gateway:
    gw = gateway_factory(upstream, config={}, start=False, extra_env=env)
    return gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": False},
        "storage": {"enabled": True, "driver": driver["name"], "threshold": 256 * 1024, "drivers": [driver]},
    }).start()


def reference(driver: str, claim: dict, declared: int) -> Payload:
    data = json.dumps({"claimData": claim, "driverName": driver}, separators=(",", ":")).encode()
    p = Payload(metadata={"encoding": b"json/protobuf", "messageType": REF_TYPE}, data=data)
    p.external_payloads.add().size_bytes = declared
    return p


def start_with_reference(server_address: str, ref: Payload) -> str:
    wf_id = f"size-{uuid.uuid4().hex[:8]}"
    asyncio.run(start_raw(server_address, wf_id, ref))
    return wf_id


def assert_larger_than_declared(err: RPCError, size: int) -> None:
    assert err.status == RPCStatusCode.DATA_LOSS, f"{err.status}: {err}"
    assert f"stored object of {size} bytes is larger than the {DECLARED} bytes its reference declares" in str(err), err


def test_cloud_object_larger_than_declared_is_refused_unread(temporal_server, gateway_factory, relayed):
    store, relay, settings = relayed
    gw = start_gateway(gateway_factory, temporal_server.address, settings, store.env())
    # A valid serialized payload of 8 MiB, stored where a claim can name it with its true hash.
    obj = Payload(metadata={"encoding": b"binary/plain"}, data=os.urandom(8 << 20)).SerializeToString()
    digest = hashlib.sha256(obj).hexdigest()
    name = f"v0/ns/default/d/sha256/{digest}"
    store.put(name, obj)
    claim = {store.bucket_field: BUCKET, store.key_field: name, "hash_algorithm": "sha256", "hash_value": digest}

    forged = start_with_reference(temporal_server.address, reference(store.driver, claim, DECLARED))
    relay.reset()
    with pytest.raises(RPCError) as err:
        asyncio.run(history_raw(gw.address, forged))
    refused = relay.received
    assert_larger_than_declared(err.value, len(obj))
    assert refused < REFUSED_BUDGET, \
        f"{refused} bytes of a {len(obj)}-byte object crossed the relay although its size was known from the headers"

    # Control: the same object, its size declared, is read whole and resolved.
    honest = start_with_reference(temporal_server.address, reference(store.driver, claim, len(obj)))
    relay.reset()
    history = asyncio.run(history_raw(gw.address, honest))
    read = relay.received
    resolved = history.history.events[0].workflow_execution_started_event_attributes.input.payloads[0]
    assert resolved.SerializeToString() == obj
    assert read >= len(obj), f"only {read} bytes crossed the relay for a resolved {len(obj)}-byte object"
    print(f"{store.kind}: refused after {refused} bytes from the store; resolved after {read}")


def io_counters(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_filesystem_object_larger_than_declared_is_refused_unread(temporal_server, gateway_factory, workdir):
    root = rig.new_tmpdir(workdir, "fs-store-")
    driver = {"name": "local", "kind": "filesystem", "root": str(root), "max_payload_size": 1 << 30}
    gw = start_gateway(gateway_factory, temporal_server.address, driver, {})
    # A 256 MiB sparse object (zeros: its hash is known without writing them).
    size = 256 << 20
    digest = hashlib.sha256(bytes(size)).hexdigest()
    name = f"v0/ns/default/d/sha256/{digest}"
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    claim = {"key": name, "hash_algorithm": "sha256", "hash_value": digest}

    forged = start_with_reference(temporal_server.address, reference("local", claim, DECLARED))
    pid = gw.proc.pid
    before = io_counters(pid)["rchar"]
    with pytest.raises(RPCError) as err:
        asyncio.run(history_raw(gw.address, forged))
    read = io_counters(pid)["rchar"] - before
    peak = peak_rss_kib(pid)
    assert_larger_than_declared(err.value, size)
    assert read < 16 << 20, f"the gateway read {read} bytes for an object refused from its length"
    assert peak < 200 * 1024, f"gateway peak RSS {peak} KiB"
    print(f"filesystem: {read} bytes read, peak RSS {peak} KiB")
