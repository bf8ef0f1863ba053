"""A client that stops reading must not make the gateway grow (issue 22, item 3).

A raw HTTP/2 client announces a stream window of 0 (so the gateway may send it no DATA at all)
and opens many GetWorkflowExecutionHistory streams on a workflow with a large history, through
a gateway that decrypts (so every response is rewritten and buffered in the gateway). The
buffered responses must stay charged to `proxy.max_inflight_bytes` until they are gone: new
RPCs are answered RESOURCE_EXHAUSTED, the gateway's VmRSS stays under the budget plus a fixed
margin, and the budget comes back when the client disconnects or, while it stays connected,
after `proxy.response_send_timeout_ms`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.api.workflowservice.v1 import service_pb2_grpc
from temporalio.client import Client

import rig

KEY = os.urandom(32)
MIB = 1024 * 1024
# The history: SIGNALS signals of PAYLOAD random (incompressible) bytes, about 2 MiB decoded.
PAYLOAD = 128 * 1024
SIGNALS = 16
INFLIGHT = 24 * MIB
# What the process holds besides the budget: code, runtimes, thread stacks, the allocator's
# slack, and the pieces hyper and HTTP/2 hold per stream (at most 64 KiB each with window 0).
RSS_MARGIN = 48 * MIB
STREAMS = 48
HISTORY_PATH = "/temporal.api.workflowservice.v1.WorkflowService/GetWorkflowExecutionHistory"


def decoding_gateway(gateway_factory, upstream: str, extra_proxy: dict | None = None) -> rig.Gateway:
    gw = gateway_factory(upstream, config={}, start=False, name="gw-flow")
    keys = rig.key_files(gw.workdir, {"k1": KEY})
    config = {
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": keys},
        "compression": {"enabled": False},
        "storage": {"enabled": False},
    }
    config["proxy"].update({"max_inflight_bytes": INFLIGHT, **(extra_proxy or {})})
    gw.configure(config)
    return gw.start()


def big_history(address: str) -> str:
    """A workflow nobody runs with SIGNALS large signals, written through the gateway (so the
    server holds them encrypted and every read is decrypted by the gateway)."""
    wid = f"flow-{uuid.uuid4().hex[:8]}"

    async def run():
        client = await Client.connect(address, namespace="default")
        handle = await client.start_workflow("Nobody", id=wid, task_queue=f"none-{uuid.uuid4().hex[:6]}")
        for _ in range(SIGNALS):
            await handle.signal("big", os.urandom(PAYLOAD))

    asyncio.run(run())
    return wid


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def read_history(address: str, wid: str) -> wsr.GetWorkflowExecutionHistoryResponse:
    with rig.channel(address) as ch:
        stub = service_pb2_grpc.WorkflowServiceStub(ch)
        return stub.GetWorkflowExecutionHistory(wsr.GetWorkflowExecutionHistoryRequest(
            namespace="default", execution=common.WorkflowExecution(workflow_id=wid)), timeout=30)


def history_succeeds(address: str, wid: str) -> bool:
    try:
        response = read_history(address, wid)
    except Exception:  # RESOURCE_EXHAUSTED while the budget is still held
        return False
    return len(response.history.events) >= SIGNALS + 1


class StalledClient:
    """An HTTP/2 client with a stream window of 0 that never grants more: the gateway can
    send it headers (and trailers-only answers) but no DATA. A thread keeps reading the
    socket (answering PINGs and SETTINGS) and records each stream's response headers."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.conn.initiate_connection()
        self.lock = threading.Lock()
        self.headers: dict[int, dict[str, str]] = {}
        self.data_received = 0
        self.closed = False
        self.port = port
        self._flush()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            with self.lock:
                for event in self.conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        self.headers.setdefault(event.stream_id, {}).update(dict(event.headers))
                    elif isinstance(event, h2.events.DataReceived):
                        self.data_received += len(event.data)
                try:
                    self._flush()
                except OSError:
                    break
        self.closed = True

    def open_history_streams(self, wid: str, count: int) -> list[int]:
        message = wsr.GetWorkflowExecutionHistoryRequest(
            namespace="default", execution=common.WorkflowExecution(workflow_id=wid)).SerializeToString()
        framed = b"\x00" + struct.pack(">I", len(message)) + message
        ids = []
        with self.lock:
            for _ in range(count):
                sid = self.conn.get_next_available_stream_id()
                self.conn.send_headers(sid, [
                    (":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{self.port}"),
                    (":path", HISTORY_PATH), ("content-type", "application/grpc"), ("te", "trailers"),
                    ("temporal-namespace", "default"),
                ])
                self.conn.send_data(sid, framed, end_stream=True)
                ids.append(sid)
            self._flush()
        return ids

    def outcome(self, ids: list[int]) -> tuple[int, int, list[str]]:
        """(streams whose response is waiting to be sent, streams refused with
        RESOURCE_EXHAUSTED, other statuses)."""
        waiting, exhausted, other = 0, 0, []
        with self.lock:
            for sid in ids:
                h = self.headers.get(sid)
                if h is None:
                    continue
                status = h.get("grpc-status")
                if status is None:
                    waiting += 1
                elif status == "8":
                    exhausted += 1
                else:
                    other.append(f"{status}: {h.get('grpc-message', '')}")
        return waiting, exhausted, other

    def answered(self, ids: list[int]) -> int:
        with self.lock:
            return sum(1 for sid in ids if sid in self.headers)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def stall(gw: rig.Gateway, wid: str) -> tuple[StalledClient, int, int, int]:
    """Opens STREAMS history reads on a stalled connection and waits until each is answered
    (headers), sampling the gateway's VmRSS. Returns (client, waiting, exhausted, peak RSS)."""
    client = StalledClient(gw.port)
    ids = client.open_history_streams(wid, STREAMS)
    peak = vm_rss(gw.proc.pid)
    deadline = time.monotonic() + 90
    while client.answered(ids) < len(ids) and time.monotonic() < deadline:
        peak = max(peak, vm_rss(gw.proc.pid))
        time.sleep(0.02)
    # Whatever is still being rewritten settles; keep sampling a little longer.
    for _ in range(50):
        peak = max(peak, vm_rss(gw.proc.pid))
        time.sleep(0.02)
    waiting, exhausted, other = client.outcome(ids)
    print(f"{len(ids)} streams: {waiting} responses waiting, {exhausted} RESOURCE_EXHAUSTED; "
          f"gateway VmRSS peak {peak / MIB:.1f} MiB (budget {INFLIGHT / MIB:.0f} MiB)")
    assert client.answered(ids) == len(ids), f"only {client.answered(ids)} of {len(ids)} streams answered\n{gw.describe()}"
    assert not other, f"unexpected statuses: {other}"
    assert client.data_received == 0, "the gateway sent DATA past a window of 0"
    return client, waiting, exhausted, peak


def test_a_stalled_reader_runs_into_the_budget_and_disconnecting_returns_it(temporal_server, gateway_factory):
    gw = decoding_gateway(gateway_factory, temporal_server.address)
    wid = big_history(gw.address)
    first = read_history(gw.address, wid)
    size = first.ByteSize()
    assert size > SIGNALS * PAYLOAD, size
    assert STREAMS * size > 3 * INFLIGHT, "the test must ask for far more than the budget"

    client, waiting, exhausted, peak = stall(gw, wid)
    try:
        # At most what fits the budget waits in the gateway; the rest is refused.
        assert exhausted > 0, f"no RESOURCE_EXHAUSTED: {waiting} responses of {size} bytes buffered for a client that reads nothing"
        assert waiting * size <= INFLIGHT + size, (waiting, size)
        assert peak < INFLIGHT + RSS_MARGIN, f"VmRSS peaked at {peak / MIB:.1f} MiB (budget {INFLIGHT / MIB:.0f} MiB + margin {RSS_MARGIN / MIB:.0f} MiB)"
        # While the stalled client holds the budget, a normal read is refused too.
        assert not history_succeeds(gw.address, wid), "the budget held by the stalled streams was not counted"
    finally:
        client.close()
    # The client is gone: its buffered responses are dropped and the budget is back.
    rig.wait_until(lambda: history_succeeds(gw.address, wid), timeout=20, interval=0.5,
                   what="a history read after the stalled client disconnected")
    assert gw.proc.alive()


def test_the_send_timeout_returns_the_budget_of_a_client_that_stays_connected(temporal_server, gateway_factory):
    gw = decoding_gateway(gateway_factory, temporal_server.address, {"response_send_timeout_ms": 3000})
    wid = big_history(gw.address)
    client, waiting, exhausted, peak = stall(gw, wid)
    try:
        assert exhausted > 0 and waiting > 0, (waiting, exhausted)
        assert peak < INFLIGHT + RSS_MARGIN, f"VmRSS peaked at {peak / MIB:.1f} MiB"
        stalled_at = time.monotonic()
        # The stalled client stays connected and still reads nothing; after the send timeout
        # the unsent responses are freed even though hyper never polls their bodies again.
        rig.wait_until(lambda: history_succeeds(gw.address, wid), timeout=20, interval=0.5,
                       what="a history read after the send timeout")
        assert not client.closed, "the stalled connection was closed; the test is about the timeout"
        assert time.monotonic() - stalled_at < 15
        assert "proxy.response_send_timeout_ms" in gw.output()
        # The budget is not held any more: a second burst is again served up to the budget.
        ids = client.open_history_streams(wid, 4)
        rig.wait_until(lambda: client.answered(ids) == len(ids), timeout=30, what="a second burst answered")
        w2, _, _ = client.outcome(ids)
        assert w2 > 0, "the budget did not come back for the stalled connection's new streams"
    finally:
        client.close()
    assert gw.proc.alive()
