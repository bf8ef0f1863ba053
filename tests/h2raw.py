"""A raw HTTP/2 gRPC client (PyPI `h2`) for tests that put exact bytes on the wire.

grpcio and the SDKs frame and compress messages themselves and refuse malformed paths; the
parser-differential tests need what they cannot send: a compressed frame holding two gzip
members, bytes after the message, an empty compressed frame, an unknown `grpc-encoding`, a
`:path` without its leading `/` or with a query string. `call` opens one cleartext HTTP/2
connection (prior knowledge, as gRPC does), sends one request with the given headers and body
bytes unchanged, and returns what came back: the HTTP status, headers, the body's gRPC
messages and the `grpc-status` / `grpc-message` from the trailers (or a trailers-only
response), or the RST_STREAM / GOAWAY error code when the peer reset instead.
"""

from __future__ import annotations

import gzip
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions

# gRPC status codes by number (the names grpcio uses).
CODES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
         6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
         10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
         15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


def frame(message: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: flag (1 = compressed), 4-byte big-endian length, bytes."""
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


def gzip_member(data: bytes) -> bytes:
    """`data` as one complete gzip member (header, deflate stream, CRC32 and size trailer)."""
    return gzip.compress(data, mtime=0)


@dataclass
class Reply:
    """What the peer answered to one request."""

    http_status: Optional[int] = None
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: Optional[int] = None  # RST_STREAM or GOAWAY error code, when the stream was reset
    timed_out: bool = False

    @property
    def grpc_status(self) -> Optional[int]:
        """`grpc-status` from the trailers, or from the headers of a trailers-only response."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return int(value) if value is not None else None

    @property
    def code(self) -> str:
        """The gRPC status name (`OK`, `PERMISSION_DENIED`, ...), or what happened instead."""
        if self.grpc_status is not None:
            return CODES.get(self.grpc_status, str(self.grpc_status))
        if self.reset is not None:
            return f"RESET({self.reset})"
        if self.timed_out:
            return "CLIENT_TIMEOUT"
        return f"HTTP({self.http_status})"

    @property
    def grpc_message(self) -> str:
        value = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(value)

    def messages(self) -> list[bytes]:
        """The response body's gRPC messages (inflated when flagged compressed: gzip, all members)."""
        out, pos = [], 0
        while pos + 5 <= len(self.body):
            flag, length = struct.unpack(">BI", self.body[pos:pos + 5])
            message = self.body[pos + 5:pos + 5 + length]
            out.append(gzip.decompress(message) if flag == 1 else message)
            pos += 5 + length
        return out

    def __str__(self) -> str:
        return f"{self.code}: {self.grpc_message}"


def call(address: str, path: str, body: bytes, metadata: tuple[tuple[str, str], ...] = (),
         encoding: Optional[str] = None, timeout: float = 10.0, grpc_timeout: Optional[float] = None) -> Reply:
    """Sends one gRPC request to `address` (`host:port`, cleartext HTTP/2) with `:path` exactly
    `path` and the request body exactly `body` (already framed), and waits for the response.

    `encoding`: the `grpc-encoding` header, if any. `grpc_timeout`: a `grpc-timeout` header in
    seconds (the deadline the gateway and the server see). `timeout`: how long this client waits
    for the whole exchange; past it the reply says `timed_out`.
    """
    host, port = address.rsplit(":", 1)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                       validate_outbound_headers=False, normalize_outbound_headers=False,
                                       validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config=config)
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", address),
               ("content-type", "application/grpc"), ("te", "trailers")]
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    if grpc_timeout is not None:
        headers.append(("grpc-timeout", f"{max(1, int(grpc_timeout * 1000))}m"))
    headers.extend(metadata)
    reply = Reply()
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=not body)
        sock.sendall(conn.data_to_send())
        pending, done = memoryview(body), not body
        while True:
            while pending and not done:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk, pending = pending[:window], pending[window:]
                conn.send_data(sid, bytes(chunk), end_stream=not pending)
                done = not pending
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            left = deadline - time.monotonic()
            if left <= 0:
                reply.timed_out = True
                return reply
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                reply.timed_out = True
                return reply
            except ConnectionError:
                reply.reset = reply.reset if reply.reset is not None else -1
                return reply
            if not data:
                if reply.reset is None and reply.grpc_status is None:
                    reply.reset = -1  # connection closed without an answer
                return reply
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                reply.reset = reply.reset if reply.reset is not None else -2
                return reply
            finished = False
            for event in events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    reply.headers = {k: v for k, v in event.headers}
                    reply.http_status = int(reply.headers.get(":status", "0"))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    reply.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == sid:
                    reply.trailers = {k: v for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    finished = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                    reply.reset = int(event.error_code)
                    finished = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    if reply.grpc_status is None:
                        reply.reset = int(event.error_code)
                    finished = True
            if finished:
                try:
                    conn.close_connection()
                    sock.sendall(conn.data_to_send())
                except (OSError, h2.exceptions.ProtocolError):
                    pass
                return reply
