#!/usr/bin/env python3
"""Reference KMSService (proxy/proto/payload_gateway/kms/v1/kms.proto) for Payload Gateway.

A small, complete key service the gateway's `grpc://` key-encryption keys talk to: it holds one
AES-256 key-encryption key (KEK) and wraps the gateway's data keys with AES-256-GCM, binding the
namespace as associated data, so a wrapped key copied into another namespace does not unwrap.
It is what the gateway's tests run against, and a starting point for an adapter in front of
Vault, an on-prem KMS or an HSM: keep the contract (status codes, namespace binding), replace
`Kek`.

Needs Python 3.10+, grpcio and cryptography (no generated stubs: the four messages are built
from a descriptor below that mirrors kms.proto field for field).

    python kms_sidecar.py --listen 127.0.0.1:7300 --key-file kek.bin \
        [--tls-cert server.pem --tls-key server.key [--client-ca ca.pem]] [--key-id payments-kek]

--key-file holds the 32-byte KEK (created with a random key, mode 0600, if it does not exist).
--client-ca makes client certificates mandatory (mTLS). --key-id (repeatable) limits which of
the gateway's key ids this service serves; others get NOT_FOUND. The chosen port is printed as
`listening on <host>:<port>` once the server is up; each call is logged on stderr as one line
(method, key id, namespace, outcome: never key material), so tests can count calls.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "payload_gateway.kms.v1.KMSService"
FORMAT_V1 = b"\x01"
NONCE_LEN = 12
AAD_PREFIX = b"payload-gateway-kms-sidecar/v1\x00"
MAX_PLAINTEXT = 1024


def _messages():
    """The request/response classes of kms.proto, built at run time."""
    bytes_t = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    string_t = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    layout = {
        "EncryptRequest": [("namespace", 1, string_t), ("plaintext", 2, bytes_t), ("key_id", 3, string_t)],
        "EncryptResponse": [("ciphertext", 1, bytes_t)],
        "DecryptRequest": [("ciphertext", 1, bytes_t), ("namespace", 2, string_t), ("key_id", 3, string_t)],
        "DecryptResponse": [("plaintext", 1, bytes_t)],
    }
    file = descriptor_pb2.FileDescriptorProto(
        name="payload_gateway/kms/v1/kms.proto", package="payload_gateway.kms.v1", syntax="proto3"
    )
    for name, fields in layout.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind in fields:
            message.field.add(
                name=field_name,
                number=number,
                type=kind,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"payload_gateway.kms.v1.{name}"))
        for name in layout
    }


MESSAGES = _messages()


def load_or_create_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        key = AESGCM.generate_key(bit_length=256)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    if len(key) != 32:
        raise SystemExit(f"{path}: expected a 32-byte key, found {len(key)} bytes")
    return key


class Kek:
    """AES-256-GCM under one key; ciphertext = 0x01 || nonce (12) || sealed key || tag (16)."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(namespace: str) -> bytes:
        return AAD_PREFIX + namespace.encode()

    def wrap(self, plaintext: bytes, namespace: str) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return FORMAT_V1 + nonce + self._aead.encrypt(nonce, plaintext, self._aad(namespace))

    def unwrap(self, ciphertext: bytes, namespace: str) -> bytes:
        if len(ciphertext) < 1 + NONCE_LEN + 16 or ciphertext[:1] != FORMAT_V1:
            raise InvalidTag()
        nonce = ciphertext[1 : 1 + NONCE_LEN]
        return self._aead.decrypt(nonce, ciphertext[1 + NONCE_LEN :], self._aad(namespace))


class Service:
    def __init__(self, kek: Kek, key_ids: list[str]):
        self.kek = kek
        self.key_ids = set(key_ids)
        self.lock = threading.Lock()

    def _log(self, method: str, request, outcome: str) -> None:
        with self.lock:
            print(
                f"kms-sidecar: {method} key_id={request.key_id!r} namespace={request.namespace!r} {outcome}",
                file=sys.stderr,
                flush=True,
            )

    def _check(self, method: str, request, context) -> None:
        if not request.namespace:
            self._log(method, request, "INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "namespace is required")
        if self.key_ids and request.key_id not in self.key_ids:
            self._log(method, request, "NOT_FOUND")
            context.abort(grpc.StatusCode.NOT_FOUND, f"this service holds no key {request.key_id!r}")

    def encrypt(self, request, context):
        self._check("Encrypt", request, context)
        if not request.plaintext or len(request.plaintext) > MAX_PLAINTEXT:
            self._log("Encrypt", request, "INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"plaintext must be 1..{MAX_PLAINTEXT} bytes")
        ciphertext = self.kek.wrap(request.plaintext, request.namespace)
        self._log("Encrypt", request, "OK")
        return MESSAGES["EncryptResponse"](ciphertext=ciphertext)

    def decrypt(self, request, context):
        self._check("Decrypt", request, context)
        try:
            plaintext = self.kek.unwrap(request.ciphertext, request.namespace)
        except InvalidTag:
            self._log("Decrypt", request, "INVALID_ARGUMENT")
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ciphertext does not unwrap for this namespace (tampered, another namespace or another key)",
            )
        self._log("Decrypt", request, "OK")
        return MESSAGES["DecryptResponse"](plaintext=plaintext)


def serve(args) -> None:
    service = Service(Kek(load_or_create_key(args.key_file)), args.key_id)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Encrypt": grpc.unary_unary_rpc_method_handler(
                service.encrypt,
                request_deserializer=MESSAGES["EncryptRequest"].FromString,
                response_serializer=MESSAGES["EncryptResponse"].SerializeToString,
            ),
            "Decrypt": grpc.unary_unary_rpc_method_handler(
                service.decrypt,
                request_deserializer=MESSAGES["DecryptRequest"].FromString,
                response_serializer=MESSAGES["DecryptResponse"].SerializeToString,
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    if args.tls_cert:
        with open(args.tls_cert, "rb") as f:
            cert = f.read()
        with open(args.tls_key, "rb") as f:
            key = f.read()
        client_ca = None
        if args.client_ca:
            with open(args.client_ca, "rb") as f:
                client_ca = f.read()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        port = server.add_secure_port(args.listen, credentials)
    else:
        port = server.add_insecure_port(args.listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {args.listen}")
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:7300", help="host:port (port 0 picks one)")
    parser.add_argument("--key-file", required=True, help="32-byte KEK (created if missing)")
    parser.add_argument("--tls-cert", help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--client-ca", help="require client certificates issued by this CA (PEM)")
    parser.add_argument("--key-id", action="append", default=[], help="serve only these gateway key ids")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        parser.error("--client-ca needs --tls-cert/--tls-key")
    serve(args)


if __name__ == "__main__":
    main()
