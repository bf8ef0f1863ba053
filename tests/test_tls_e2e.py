"""TLS and mutual TLS with real parts on both sides of the gateway: the Python SDK connects to
the gateway over TLS and over mTLS, and the gateway connects over mTLS to nginx terminating TLS
in front of the dev server (`grpc_pass`, client certificates required: the stand-in for
Temporal Cloud). Workflows run end to end with encryption on; the history read directly at the
dev server holds no plaintext. A wrong CA or a missing client certificate, on either side, fails
with an error naming the problem. The codec endpoint serves HTTPS with `[codec_server.tls]`.
Certificates are made in the test (`cryptography`)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import TLSConfig
from temporalio.worker import Worker

import rig
from raw_rpc import history_raw
from tls_pki import Ca, TlsFront, nginx_bin
from workflows import ACTIVITIES, ChildWorkflow

KEY = bytes(range(7, 39))
MARKER = "tls-e2e-plaintext-marker"
FRONT_NAME = "temporal-front.test"  # the name the front's certificate carries (SNI, verification)
GATEWAY_NAME = "gateway.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Four CAs: the front's (the gateway trusts it upstream), the one the front verifies
    client certificates with, the gateway's (SDKs trust it and it issues SDK client
    certificates), and a rogue one nobody trusts."""
    d = tmp_path_factory.mktemp("pki")
    cas = {name: Ca(d, name) for name in ("front-ca", "front-client-ca", "gateway-ca", "rogue-ca")}
    return {
        **cas,
        "front": cas["front-ca"].server(FRONT_NAME),
        "gateway-upstream-client": cas["front-client-ca"].client("payload-gateway"),
        "gateway": cas["gateway-ca"].server(GATEWAY_NAME),
        "sdk-client": cas["gateway-ca"].client("sdk-worker"),
        "rogue-client": cas["rogue-ca"].client("sdk-worker"),
        "rogue-upstream-client": cas["rogue-ca"].client("payload-gateway"),
    }


@pytest.fixture(scope="module")
def front(pki, temporal_server, workdir):
    """nginx in front of the shared dev server; stopped at teardown, also on failure."""
    if nginx_bin() is None:
        pytest.skip("nginx not installed (scripts/setup.sh)")
    tf = TlsFront(rig.new_tmpdir(workdir, "nginx-"), temporal_server.address, pki["front"], pki["front-client-ca"])
    try:
        tf.start()
        yield tf
    finally:
        tf.stop()
    assert not rig.port_accepts(tf.port), "nginx still listening after stop"


def upstream_tls(pki, ca: str = "front-ca", client: str | None = "gateway-upstream-client") -> dict:
    section = {"enabled": True, "ca_file": str(pki[ca].cert_file), "server_name": FRONT_NAME}
    if client is not None:
        section.update(cert_file=str(pki[client].cert), key_file=str(pki[client].key))
    return section


def start_gateway(gateway_factory, front: TlsFront, pki, *, mtls: bool, upstream: dict | None = None,
                  codec_tls: bool = False) -> rig.Gateway:
    tls = {"cert_file": str(pki["gateway"].cert), "key_file": str(pki["gateway"].key)}
    proxy = {"tls": {**tls, "client_ca_file": str(pki["gateway-ca"].cert_file)} if mtls else tls,
             "upstream_tls": upstream if upstream is not None else upstream_tls(pki)}
    codec = {"codec_server": {"tls": tls}} if codec_tls else {}
    return rig.encrypting_gateway(gateway_factory, front.address, KEY, "PGW_TEST_TLS_KEY", name="tls-gw",
                                  codec_endpoint=codec_tls, proxy=proxy, **codec)


def sdk_tls(pki, ca: str = "gateway-ca", client: str | None = None) -> TLSConfig:
    kw = {}
    if client is not None:
        kw = {"client_cert": pki[client].cert_pem, "client_private_key": pki[client].key_pem}
    return TLSConfig(server_root_ca_cert=pki[ca].pem, domain=GATEWAY_NAME, **kw)


async def run_workflow(address: str, tls: TLSConfig, x: int) -> str:
    """Client and worker over `tls`; returns the workflow id after checking the result."""
    client = await Client.connect(address, namespace="default", tls=tls)
    suffix = uuid.uuid4().hex[:10]
    tq, wf_id = f"tq-tls-{suffix}", f"tls-{suffix}"
    async with Worker(client, task_queue=tq, workflows=[ChildWorkflow], activities=ACTIVITIES):
        result = await client.execute_workflow(ChildWorkflow.run, x, id=wf_id, task_queue=tq, memo={"m": MARKER})
    assert result == {"doubled": 2 * x, "greeting": f"Hello, child {x}!"}
    # Read back through the gateway over TLS: decoded.
    history = await client.get_workflow_handle(wf_id).fetch_history()
    assert any(e.HasField("workflow_execution_completed_event_attributes") for e in history.events)
    return wf_id


def assert_ciphertext_at_server(server: str, wf_id: str, x: int) -> None:
    """The history as the dev server holds it (read directly, no TLS, no gateway)."""
    blob = asyncio.run(history_raw(server, wf_id)).SerializeToString()
    assert b"binary/encrypted" in blob
    for plain in (f"child {x}".encode(), MARKER.encode(), f"Hello, child {x}!".encode()):
        assert plain not in blob, f"plaintext {plain!r} reached the server"


def connect_error(address: str, tls: TLSConfig) -> str:
    """Why the SDK could not connect: `Client.connect` makes its first call (GetSystemInfo)
    at once and fails with the status or transport error of that call."""
    with pytest.raises(RuntimeError) as err:
        asyncio.run(Client.connect(address, namespace="default", tls=tls))
    return str(err.value)


def first_call_status(address: str, tls: TLSConfig) -> tuple[str, str]:
    """The gRPC code and message of the SDK's first call through a gateway whose upstream
    refuses it (the SDK quotes tonic's `Status { code: ..., message: "..." }`)."""
    import re

    text = connect_error(address, tls)
    found = re.search(r'Status \{ code: (\w+), message: "((?:[^"\\]|\\.)*)"', text)
    assert found, text
    return found.group(1), found.group(2)


# ----------------------------------------------------------------------------- SDK ⇄ gateway ⇄ front


def test_workflows_over_tls_to_the_gateway_and_mtls_to_the_front(gateway_factory, front, pki, temporal_server):
    gw = start_gateway(gateway_factory, front, pki, mtls=False)
    seen_before = front.access_log().count("verify=SUCCESS")
    wf_id = asyncio.run(run_workflow(gw.address, sdk_tls(pki), 4242))
    assert_ciphertext_at_server(temporal_server.address, wf_id, 4242)
    # Every call went through the front with the gateway's verified client certificate.
    log = front.access_log()
    assert log.count("verify=SUCCESS") > seen_before + 3, log[-2000:]
    assert 'dn="CN=payload-gateway"' in log
    assert "verify=NONE" not in log and "verify=FAILED" not in log, log[-2000:]


def test_workflows_over_mtls_on_both_sides(gateway_factory, front, pki, temporal_server):
    gw = start_gateway(gateway_factory, front, pki, mtls=True)
    wf_id = asyncio.run(run_workflow(gw.address, sdk_tls(pki, client="sdk-client"), 5151))
    assert_ciphertext_at_server(temporal_server.address, wf_id, 5151)
    # Client certificates the gateway's handshake refuses: none, and one from a CA it does not
    # trust. Under TLS 1.3 the alert arrives after the client sent its request; the gateway
    # half-closes so the alert is not lost to a reset, and the SDK names it most of the time.
    # On a loaded machine the client can still read the closed connection before the alert,
    # so that answer is accepted too; the connection must never succeed.
    def refused(error: str, alert: str) -> bool:
        error = error.lower()
        assert alert in error or "connection closed" in error, error
        return alert in error

    named = sum(refused(connect_error(gw.address, sdk_tls(pki)), "certificaterequired") for _ in range(5))
    named += refused(connect_error(gw.address, sdk_tls(pki, client="rogue-client")), "unknownca")
    print(f"refused client certificates named by the SDK in {named} of 6 attempts")
    # The SDK trusting another CA than the gateway's.
    wrong_ca = connect_error(gw.address, sdk_tls(pki, ca="rogue-ca", client="sdk-client"))
    assert "certificate" in wrong_ca.lower() and "issuer" in wrong_ca.lower(), wrong_ca


def test_plaintext_client_is_refused_by_the_tls_listener(gateway_factory, front, pki):
    gw = start_gateway(gateway_factory, front, pki, mtls=False)
    with pytest.raises(RuntimeError):
        asyncio.run(Client.connect(gw.address, namespace="default"))


def test_upstream_with_an_untrusted_certificate_is_refused_naming_it(gateway_factory, front, pki):
    # The gateway trusts another CA than the one that issued the front's certificate.
    gw = start_gateway(gateway_factory, front, pki, mtls=False, upstream=upstream_tls(pki, ca="rogue-ca"))
    code, message = first_call_status(gw.address, sdk_tls(pki))
    print(f"wrong upstream CA: {code}: {message}")
    assert code == "Unavailable", message
    assert f"TLS handshake with {FRONT_NAME} failed: invalid peer certificate: UnknownIssuer" in message


def test_upstream_without_a_client_certificate_is_refused_naming_it(gateway_factory, front, pki):
    gw = start_gateway(gateway_factory, front, pki, mtls=False, upstream=upstream_tls(pki, client=None))
    code, message = first_call_status(gw.address, sdk_tls(pki))
    print(f"no upstream client certificate: {code}: {message}")
    assert code == "Internal", message
    assert "answered HTTP 400 Bad Request (text/html), not gRPC" in message, message
    assert "No required SSL certificate was sent" in message, message


def test_upstream_client_certificate_of_an_unknown_ca_is_refused(gateway_factory, front, pki):
    gw = start_gateway(gateway_factory, front, pki, mtls=False,
                       upstream=upstream_tls(pki, client="rogue-upstream-client"))
    code, message = first_call_status(gw.address, sdk_tls(pki))
    print(f"upstream client certificate of an unknown CA: {code}: {message}")
    assert code == "Internal", message
    assert "The SSL certificate error" in message, message


# ----------------------------------------------------------------------------- codec endpoint over HTTPS


def https(port: int, path: str, body: dict, ca: Ca) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca.cert_file))
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_codec_endpoint_serves_https(gateway_factory, front, pki):
    gw = start_gateway(gateway_factory, front, pki, mtls=False, codec_tls=True)
    plain = {"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
             "data": base64.b64encode(json.dumps(MARKER).encode()).decode()}
    status, text = https(gw.codec_port, "/default/encode", {"payloads": [plain]}, pki["gateway-ca"])
    assert status == 200, text
    encoded = json.loads(text)
    assert MARKER not in text
    status, text = https(gw.codec_port, "/default/decode", encoded, pki["gateway-ca"])
    assert status == 200 and json.loads(text)["payloads"][0]["data"] == plain["data"], text
    # A tampered payload is a 4xx the Web UI does not retry.
    encoded["payloads"][0]["data"] = base64.b64encode(b"\x00" * 40).decode()
    status, text = https(gw.codec_port, "/default/decode", encoded, pki["gateway-ca"])
    assert status == 422, text
    # Cleartext HTTP on the HTTPS port gets no answer.
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{gw.codec_port}/decode", data=b"{}", method="POST",
                                                      headers={"Content-Type": "application/json"}), timeout=10).read()
    # A client trusting another CA refuses the endpoint's certificate.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https(gw.codec_port, "/decode", encoded, pki["rogue-ca"])
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    for line in ('pgw_codec_requests_total{route="encode",status="200"} 1',
                 'pgw_codec_requests_total{route="decode",status="200"} 1',
                 'pgw_codec_requests_total{route="decode",status="422"} 1'):
        assert line in metrics, metrics
