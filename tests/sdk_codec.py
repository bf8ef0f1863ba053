"""An SDK-side PayloadCodec in the gateway's format, written independently of the gateway from
Temporal's published sample encryption codec and the `binary/zstd` convention:

- `binary/encrypted`: metadata `encryption-key-id`; data = 12-byte nonce ‖ AES-256-GCM
  ciphertext ‖ 16-byte tag of the serialized inner Payload, no associated data;
- `binary/zstd`: data = one zstd frame of the serialized inner Payload.

Interop tests run Python workers directly against the server with this codec and check that
they read what went through the gateway, and the other way round.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCRYPTED = b"binary/encrypted"
ZSTD = b"binary/zstd"


class SdkCodec(PayloadCodec):
    """Compress (optionally), then encrypt with `active`; decrypt with any key in `keys`."""

    def __init__(self, keys: Mapping[str, bytes], active: str, compress: bool = True, min_size: int = 256):
        self.keys = dict(keys)
        self.active = active
        self.compress = compress
        self.min_size = min_size
        self.seen_key_ids: list[str] = []

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encode_one(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decode_one(p) for p in payloads]

    def _encode_one(self, p: Payload) -> Payload:
        raw = p.SerializeToString()
        if self.compress and len(raw) >= self.min_size:
            frame = zstandard.ZstdCompressor(level=3).compress(raw)
            if len(frame) < len(raw):
                raw = Payload(metadata={"encoding": ZSTD}, data=frame).SerializeToString()
        nonce = os.urandom(12)
        sealed = AESGCM(self.keys[self.active]).encrypt(nonce, raw, None)
        return Payload(metadata={"encoding": ENCRYPTED, "encryption-key-id": self.active.encode()}, data=nonce + sealed)

    def _decode_one(self, p: Payload) -> Payload:
        if p.metadata.get("encoding") == ENCRYPTED:
            key_id = p.metadata["encryption-key-id"].decode()
            self.seen_key_ids.append(key_id)
            plain = AESGCM(self.keys[key_id]).decrypt(p.data[:12], p.data[12:], None)
            p = Payload.FromString(plain)
        if p.metadata.get("encoding") == ZSTD:
            p = Payload.FromString(zstandard.ZstdDecompressor().decompress(p.data))
        return p


def iter_payloads(message, path: str = "") -> Iterable[tuple[str, Payload]]:
    """Every `temporal.api.common.v1.Payload` inside a protobuf message, with its field path,
    found by reflection (independent of the gateway's descriptor-table walker)."""
    if message.DESCRIPTOR.full_name == "temporal.api.common.v1.Payload":
        yield path, message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        sub = f"{path}.{field.name}" if path else field.name
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is None:
                continue
            for v in value.values():
                yield from iter_payloads(v, sub)
        elif field.is_repeated:
            for v in value:
                yield from iter_payloads(v, sub)
        else:
            yield from iter_payloads(value, sub)
