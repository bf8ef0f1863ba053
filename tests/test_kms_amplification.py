"""KMS amplification through the codec endpoint (issue 22, item 3): a caller whose token is
limited to one namespace posts payloads carrying made-up wrapped data keys to `/decode`, many
at once, each wrapped key different. Every wrapped key the gateway has not seen is a call to
the key service, so without limits 1,000 such payloads cost 1,000 KMS calls. The gateway
remembers failed unwraps, gives each KEK and namespace a small budget of unwrap failures,
caps the wrapped-key length and the distinct data keys per request, and bounds concurrent
calls: the attack costs a handful of calls. Calls are counted at the KMS server itself
(moto's request recorder), not in the gateway's metrics.

Needs no Temporal server: only the codec endpoint is used (the gRPC upstream is a closed
port)."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import rig

TOKEN = "tok-amplification-default-only"
NAMESPACE = "default"
# The gateway's limits (codec/envelope.rs): failure budget per KEK and namespace, refill period.
FAILURE_BURST = 8
FAILURE_REFILL_S = 2.0
ATTACK_PAYLOADS = 1000
CONNECTIONS = 32


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def post(gw: rig.Gateway, path: str, body: dict, token: str = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{gw.codec_port}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def decrypts(kms: rig.KmsServer) -> int:
    return kms.calls().get("Decrypt", 0)


def start_gateway(gateway_factory, kms: rig.KmsServer) -> rig.Gateway:
    arn = kms.create_key("pgw amplification KEK")
    env = {**kms.gateway_env(), "PGW_TEST_NS_TOKENS": TOKEN}
    gw = gateway_factory(f"127.0.0.1:{rig.free_port()}", config={}, start=False, name="amp-gw", extra_env=env)
    sections = gw.listener_sections(codec_server=True)
    sections["codec_server"].update(tokens=[{"env": "PGW_TEST_NS_TOKENS", "namespaces": [NAMESPACE]}],
                                    max_payloads=2 * ATTACK_PAYLOADS, max_body_bytes=16 * 1024 * 1024)
    gw.configure({
        **sections,
        "encryption": {"enabled": True, "active_key": "kek", "keys": [{"id": "kek", "kms": f"awskms:///{arn}"}],
                       "kms_timeout_ms": 5000},
        "compression": {"enabled": False},
        "storage": {"enabled": False},
    })
    return gw.start()


def legit_payload(gw: rig.Gateway) -> tuple[dict, dict]:
    """A payload the gateway itself encrypts for the namespace (its data key made with one
    KMS call and kept), and the plaintext payload it came from."""
    plain = {"metadata": {"encoding": b64(b"json/plain")}, "data": b64(b'"hello amplification"')}
    status, body = post(gw, f"/{NAMESPACE}/encode", {"payloads": [plain]})
    assert status == 200, body
    encoded = json.loads(body)["payloads"][0]
    meta = {k: base64.b64decode(v) for k, v in encoded["metadata"].items()}
    assert meta["encoding"] == b"binary/encrypted" and meta["encryption-key-id"] == b"kek", meta
    assert len(meta["encryption-dek"]) > 32 and len(meta["encryption-dek-id"]) == 32, meta
    return encoded, plain


def forged(legit: dict, wrapped_len: int | None = None) -> dict:
    """`legit` with a random wrapped data key (and data key id) of a plausible length."""
    n = wrapped_len or 96 + int.from_bytes(os.urandom(1), "big") % 100
    meta = dict(legit["metadata"])
    meta["encryption-dek"] = b64(os.urandom(n))
    meta["encryption-dek-id"] = b64(os.urandom(16).hex().encode())
    return {"metadata": meta, "data": legit["data"]}


def test_made_up_wrapped_keys_cost_a_handful_of_kms_calls(gateway_factory, kms_server):
    gw = start_gateway(gateway_factory, kms_server)
    legit, plain = legit_payload(gw)
    before = decrypts(kms_server)

    # 1. One request per payload, 1,000 different made-up wrapped keys, 32 connections at once.
    attack = [forged(legit) for _ in range(ATTACK_PAYLOADS)]
    started = time.monotonic()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        answers = list(pool.map(lambda p: post(gw, f"/{NAMESPACE}/decode", {"payloads": [p]}), attack))
    elapsed = time.monotonic() - started
    calls = decrypts(kms_server) - before
    statuses: dict[int, int] = {}
    for status, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    # Fail closed, each with a 4xx naming the problem: 422 (the key service said the key does
    # not unwrap) or 429 (not asked: the namespace's failure budget is spent).
    assert set(statuses) <= {422, 429}, statuses
    for status, body in answers:
        text = body.decode(errors="replace")
        assert "cannot decode payload 0" in text and "kek" in text, (status, text)
        if status == 429:
            assert "not asked" in text, text
    bound = FAILURE_BURST + int(elapsed / FAILURE_REFILL_S) + 2
    print(f"{ATTACK_PAYLOADS} single-payload requests in {elapsed:.1f} s: {calls} KMS Decrypt calls "
          f"(bound {bound}), answers {statuses}")
    assert calls <= bound, f"{calls} KMS calls for {ATTACK_PAYLOADS} made-up keys in {elapsed:.1f} s (answers {statuses})"

    # 2. The same 1,000 payloads with fresh keys in one request: more distinct data keys than
    # a request may carry; refused before any call.
    before = decrypts(kms_server)
    status, body = post(gw, f"/{NAMESPACE}/decode", {"payloads": [forged(legit) for _ in range(ATTACK_PAYLOADS)]})
    assert status == 413 and b"distinct wrapped data keys" in body, (status, body)
    assert decrypts(kms_server) == before, kms_server.calls()

    # 3. A wrapped key longer than any key service makes: refused without a call.
    status, body = post(gw, f"/{NAMESPACE}/decode", {"payloads": [forged(legit, wrapped_len=4096)]})
    assert status == 422 and b"longer than" in body, (status, body)
    assert decrypts(kms_server) == before, kms_server.calls()

    # 4. The same made-up key again and again: answered from memory.
    repeated = forged(legit)
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        again = list(pool.map(lambda _: post(gw, f"/{NAMESPACE}/decode", {"payloads": [repeated]}), range(100)))
    assert all(s in (422, 429) for s, _ in again), {s for s, _ in again}
    assert decrypts(kms_server) - before <= 1, kms_server.calls()

    # The namespace's own payloads keep decoding meanwhile (their data key is cached).
    status, body = post(gw, f"/{NAMESPACE}/decode", {"payloads": [legit]})
    assert status == 200, body
    assert json.loads(body)["payloads"][0]["data"] == plain["data"]
