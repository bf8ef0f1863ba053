"""[proxy.auth] through the real binary and config file, with the Python SDK.

One gateway listens with TLS (client certificates optional but verified) in front of a
recording gRPC front of a dev server that has namespaces `default` (A) and `auth-b` (B). It
accepts a static token for A, an admin token (`*`), JWTs from a JWKS served over https by a
test server (keys rotated there, the server stopped), and a client certificate mapped to A.
The front records every request that reaches the upstream: the test checks that nothing for
B and no client credential ever got there, and that every request that did carries the
gateway's API key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from temporalio import workflow
from temporalio.api.nexus.v1 import EndpointSpec, EndpointTarget
from temporalio.api.operatorservice.v1 import CreateNexusEndpointRequest, DeleteNexusEndpointRequest
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, TLSConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
import tls_pki

NS_A = "default"
NS_B = "auth-b"
TOKEN_A = "tok-a-" + uuid.uuid4().hex
TOKEN_ADMIN = "tok-admin-" + uuid.uuid4().hex
API_KEY = "upstream-key-" + uuid.uuid4().hex
ISS = "https://idp.test"
AUD = "payload-gateway-test"
WORKER_SAN = "spiffe://test/worker-a"


# --------------------------------------------------------------------------- certificates


class Pki:
    """A CA (tls_pki), a server certificate for localhost/127.0.0.1 and client certificates
    naming a URI (SPIFFE ID)."""

    def __init__(self, d: Path):
        self.ca = tls_pki.Ca(d, "auth-test-ca")
        self.ca_pem = self.ca.pem
        self.ca_file = self.ca.cert_file
        self.server = self.ca.server("localhost")

    def client(self, san: str) -> tuple[bytes, bytes]:
        leaf = self.ca.issue("client", uris=(san,), client=True)
        return leaf.cert_pem, leaf.key_pem


# --------------------------------------------------------------------------- JWTs and the JWKS server


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(n: int) -> str:
    return b64u(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class Signer:
    def __init__(self, kind: str, kid: str):
        self.kind, self.kid = kind, kid
        if kind == "RS256":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ES256":
            self.key = ec.generate_private_key(ec.SECP256R1())
        else:
            self.key = ed25519.Ed25519PrivateKey.generate()

    def jwk(self) -> dict:
        pub = self.key.public_key()
        if self.kind == "RS256":
            n = pub.public_numbers()
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "n": _int_b64(n.n), "e": _int_b64(n.e)}
        if self.kind == "ES256":
            n = pub.public_numbers()
            return {"kty": "EC", "crv": "P-256", "kid": self.kid, "x": b64u(n.x.to_bytes(32, "big")), "y": b64u(n.y.to_bytes(32, "big"))}
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": b64u(raw)}

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, **overrides) -> str:
        claims = {"iss": ISS, "aud": AUD, "exp": int(time.time()) + 600, "namespaces": [NS_A]}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        header = b64u(json.dumps({"alg": self.kind, "kid": self.kid, "typ": "JWT"}).encode())
        body = b64u(json.dumps(claims).encode())
        signing_input = f"{header}.{body}".encode()
        if self.kind == "RS256":
            sig = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif self.kind == "ES256":
            r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            sig = self.key.sign(signing_input)
        return f"{header}.{body}.{b64u(sig)}"


def unsigned(alg: str, key: bytes | None, kid: str) -> str:
    header = b64u(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    body = b64u(json.dumps({"iss": ISS, "aud": AUD, "exp": int(time.time()) + 600, "namespaces": [NS_A]}).encode())
    if key is None:
        return f"{header}.{body}."
    sig = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64u(sig)}"


class JwksServer:
    """An https server answering GET /jwks with the current key set; restartable on its port."""

    def __init__(self, server: tls_pki.Leaf):
        self.port = rig.free_port()
        self.keys: list[dict] = []
        self.fetches = 0
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(server.cert, server.key)
        self.httpd = None
        self.thread = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/jwks"

    def start(self) -> "JwksServer":
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200 if self.path == "/jwks" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.socket = self.ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


# --------------------------------------------------------------------------- the recording front


class RecordingFront:
    """A grpcio server in front of the dev server that records the metadata and request of
    every call that reaches it and forwards it (unary calls, which is every Temporal method)."""

    def __init__(self, upstream: str):
        self.port = rig.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.records: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()
        self.channel = grpc.insecure_channel(upstream, options=rig.GRPC_CHANNEL_OPTIONS)
        self.server = None

    def start(self) -> "RecordingFront":
        outer = self

        def forward(method):
            call = outer.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

            def handler(request, context):
                md = list(context.invocation_metadata())
                with outer.lock:
                    outer.records.append((method, md, request))
                keep = [(k, v) for k, v in md if not k.startswith(("grpc-", ":")) and k not in ("user-agent", "te", "content-type")]
                try:
                    return call(request, metadata=keep, timeout=context.time_remaining())
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details() or "")
            return handler

        class Generic(grpc.GenericRpcHandler):
            def service(self, details):
                return grpc.unary_unary_rpc_method_handler(forward(details.method), request_deserializer=None, response_serializer=None)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=rig.GRPC_CHANNEL_OPTIONS)
        self.server.add_generic_rpc_handlers((Generic(),))
        self.server.add_insecure_port(self.address)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
        self.channel.close()

    def snapshot(self) -> list[tuple[str, dict, bytes]]:
        with self.lock:
            return list(self.records)


class TemporalServerWithB(rig.TemporalServer):
    def _ui_args(self) -> list[str]:
        return ["--headless", "--namespace", NS_B]


# --------------------------------------------------------------------------- the setup


class Setup:
    pass


@pytest.fixture(scope="module")
def setup(workdir):
    s = Setup()
    base = rig.new_tmpdir(workdir, "auth-")
    s.pki = Pki(base)
    s.signers = {k: Signer(k, f"kid-{k}") for k in ("RS256", "ES256", "EdDSA")}
    s.jwks = JwksServer(s.pki.server)
    s.jwks.keys = [sg.jwk() for sg in s.signers.values()]
    server = TemporalServerWithB(base / "temporal", name="temporal-auth")
    front = gw = None
    try:
        s.jwks.start()
        server.start()
        front = RecordingFront(server.address).start()
        gw = rig.Gateway(base / "gw", front.address, config={}, name="gateway-auth",
                         extra_env={"PGW_T_TOKEN_A": TOKEN_A, "PGW_T_ADMIN": TOKEN_ADMIN, "PGW_T_API_KEY": API_KEY})
        sections = gw.listener_sections(codec_server=True)
        sections["proxy"].update({"api_key_env": "PGW_T_API_KEY"})
        # The codec endpoint verifies JWTs against the same JWKS URL.
        sections["codec_server"].update({"jwks_url": s.jwks.url, "jwks_ca_file": str(s.pki.ca_file),
                                         "jwt_issuer": ISS, "jwt_audience": AUD})
        gw.configure({
            **sections,
            "proxy.tls": {"cert_file": str(s.pki.server.cert), "key_file": str(s.pki.server.key),
                          "client_ca_file": str(s.pki.ca_file), "require_client_cert": False},
            "proxy.auth": {
                "forward_client_authorization": False,
                "tokens": [{"env": "PGW_T_TOKEN_A", "namespaces": [NS_A]}, {"env": "PGW_T_ADMIN", "namespaces": ["*"]}],
                "client_certs": [{"san": WORKER_SAN, "namespaces": [NS_A]}],
            },
            "proxy.auth.jwt": {"jwks_url": s.jwks.url, "jwks_ca_file": str(s.pki.ca_file), "issuer": ISS, "audience": AUD,
                               "jwks_refresh_secs": 2, "jwks_min_refresh_secs": 1},
            "encryption": {"enabled": False}, "compression": {"enabled": False}, "storage": {"enabled": False},
        })
        gw.start()
        s.server, s.front, s.gw = server, front, gw
        yield s
    finally:
        if gw is not None:
            gw.stop()
        if front is not None:
            front.stop()
        server.stop()
        s.jwks.stop()


async def connect(setup, namespace: str, token: str | None = None, cert: tuple[bytes, bytes] | None = None) -> Client:
    tls = TLSConfig(server_root_ca_cert=setup.pki.ca_pem, domain="localhost",
                    client_cert=cert[0] if cert else None, client_private_key=cert[1] if cert else None)
    return await Client.connect(setup.gw.address, namespace=namespace, tls=tls, api_key=token)


@workflow.defn
class AuthWorkflow:
    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self, name: str) -> str:
        await workflow.wait_condition(lambda: self.done)
        return f"hello {name}"

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def state(self) -> str:
        return "done" if self.done else "waiting"


async def run_in_a(client: Client) -> None:
    """Start, query, signal, describe, list and read the history of a workflow in A."""
    # Not "auth-…": a random suffix starting with "b" would contain NS_B ("auth-b"), which the
    # check of what the upstream saw looks for.
    tq = f"tq-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=tq, workflows=[AuthWorkflow], workflow_runner=UnsandboxedWorkflowRunner()):
        wid = f"wf-{uuid.uuid4().hex[:8]}"
        handle = await client.start_workflow(AuthWorkflow.run, "a", id=wid, task_queue=tq)
        assert await handle.query(AuthWorkflow.state) == "waiting"
        await handle.signal(AuthWorkflow.finish)
        assert await handle.result() == "hello a"
        assert (await handle.describe()).id == wid
        assert [e async for e in client.list_workflows(f"WorkflowId = '{wid}'")] is not None
        assert len((await handle.fetch_history()).events) > 3


async def refused_connect(coro) -> str:
    """A connect whose first call (GetSystemInfo) is refused: the SDK raises RuntimeError
    carrying the status; returns the status message."""
    with pytest.raises(RuntimeError) as info:
        await coro
    text = str(info.value)
    assert "code: Unauthenticated" in text, text
    return text


async def expect(status: RPCStatusCode, coro) -> str:
    with pytest.raises(RPCError) as info:
        await coro
    assert info.value.status == status, f"{info.value.status}: {info.value.message}"
    return info.value.message


async def all_refused_in_b(client_b: Client) -> None:
    denied = RPCStatusCode.PERMISSION_DENIED
    msg = await expect(denied, client_b.start_workflow(AuthWorkflow.run, "b", id="wf-b", task_queue="tq-b"))
    assert f'namespace "{NS_B}"' in msg, msg
    handle = client_b.get_workflow_handle("wf-b")
    await expect(denied, handle.signal(AuthWorkflow.finish))
    await expect(denied, handle.query(AuthWorkflow.state))
    await expect(denied, handle.describe())
    await expect(denied, handle.fetch_history())

    async def list_b():
        return [e async for e in client_b.list_workflows()]
    await expect(denied, list_b())
    # A Nexus endpoint targeting B (namespace-less: admin only).
    await expect(denied, client_b.operator_service.create_nexus_endpoint(nexus_request(f"ep-{uuid.uuid4().hex[:6]}", NS_B)))


def nexus_request(name: str, namespace: str) -> CreateNexusEndpointRequest:
    return CreateNexusEndpointRequest(spec=EndpointSpec(
        name=name, target=EndpointTarget(worker=EndpointTarget.Worker(namespace=namespace, task_queue="tq"))))


def upstream_saw_nothing_of_b_and_only_the_api_key(setup, secrets: list[str]) -> None:
    records = setup.front.snapshot()
    assert records, "the upstream saw nothing at all"
    for method, md, body in records:
        md = dict(md)
        assert md.get("temporal-namespace") != NS_B, method
        assert NS_B.encode() not in body, method
        assert md.get("authorization") == f"Bearer {API_KEY}", (method, md.get("authorization"))
        for s in secrets:
            assert s not in str(md), method
            assert s.encode() not in body, method


# --------------------------------------------------------------------------- tests


sync = rig.sync



@sync
async def test_a_token_for_a_works_in_a_and_is_refused_in_b(setup):
    await run_in_a(await connect(setup, NS_A, TOKEN_A))
    await all_refused_in_b(await connect(setup, NS_B, TOKEN_A))
    # The admin token ("*") may manage Nexus endpoints.
    admin = await connect(setup, NS_A, TOKEN_ADMIN)
    created = await admin.operator_service.create_nexus_endpoint(nexus_request(f"ep-{uuid.uuid4().hex[:6]}", NS_A))
    await admin.operator_service.delete_nexus_endpoint(DeleteNexusEndpointRequest(id=created.endpoint.id, version=created.endpoint.version))
    # A temporal-namespace header that disagrees with the body is refused (raw gRPC: the SDK
    # sets the header from the request itself).
    creds = grpc.ssl_channel_credentials(root_certificates=setup.pki.ca_pem)
    with grpc.secure_channel(setup.gw.address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        describe = ch.unary_unary("/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace",
                                  request_serializer=None, response_deserializer=None)
        body = DescribeNamespaceRequest(namespace=NS_A).SerializeToString()
        auth = ("authorization", f"Bearer {TOKEN_A}")
        describe(body, metadata=[auth, ("temporal-namespace", NS_A)], timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            describe(body, metadata=[auth, ("temporal-namespace", NS_B)], timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
        assert "temporal-namespace header" in info.value.details(), info.value.details()
    upstream_saw_nothing_of_b_and_only_the_api_key(setup, [TOKEN_A, TOKEN_ADMIN])


@sync
async def test_without_credentials_unauthenticated_and_nothing_reaches_the_upstream(setup):
    before = len(setup.front.snapshot())
    msg = await refused_connect(connect(setup, NS_A))
    assert "authentication required" in msg, msg
    bad = "tok-guess-" + uuid.uuid4().hex
    msg = await refused_connect(connect(setup, NS_A, bad))
    assert bad not in msg, msg
    assert len(setup.front.snapshot()) == before, "a refused request reached the upstream"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{setup.gw.admin_port}/metrics", timeout=5).read().decode()
    assert 'pgw_auth_decisions_total{result="unauthenticated",credential="none"}' in metrics, metrics
    assert 'result="unauthenticated",credential="token"' in metrics


@sync
async def test_a_client_certificate_mapped_to_a_is_treated_like_the_token(setup):
    cert = setup.pki.client(WORKER_SAN)
    await run_in_a(await connect(setup, NS_A, cert=cert))
    await all_refused_in_b(await connect(setup, NS_B, cert=cert))
    stranger = setup.pki.client("spiffe://test/stranger")
    msg = await refused_connect(connect(setup, NS_A, cert=stranger))
    assert "spiffe://test/stranger" in msg and "not mapped" in msg, msg
    upstream_saw_nothing_of_b_and_only_the_api_key(setup, [TOKEN_A])


async def describe_a(setup, token: str):
    client = await connect(setup, NS_A, token)
    return await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=NS_A))


@sync
async def test_jwts_from_an_https_jwks(setup):
    # RSA, EC and Ed25519 tokens are accepted, limited to their namespaces claim.
    for signer in setup.signers.values():
        assert (await describe_a(setup, signer.token())).namespace_info.name == NS_A
        client_b = await connect(setup, NS_B, signer.token())
        await expect(RPCStatusCode.PERMISSION_DENIED, client_b.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=NS_B)))
    rs = setup.signers["RS256"]
    now = int(time.time())
    refused = {
        "alg none": (unsigned("none", None, rs.kid), "refused"),
        "HS256 with the public key": (unsigned("HS256", rs.public_pem(), rs.kid), "HS256"),
        "expired": (rs.token(exp=now - 3600), "ExpiredSignature"),
        "not yet valid": (rs.token(nbf=now + 3600), "ImmatureSignature"),
        "wrong audience": (rs.token(aud="someone-else"), "InvalidAudience"),
        "wrong issuer": (rs.token(iss="https://evil.test"), "InvalidIssuer"),
        "no namespaces claim": (rs.token(namespaces=None), "namespaces"),
    }
    for what, (token, reason) in refused.items():
        msg = await refused_connect(describe_a(setup, token))
        assert reason in msg, f"{what}: {msg}"
        assert token not in msg, what

    # The codec endpoint uses the same JWKS URL and rules.
    def codec(token):
        req = urllib.request.Request(f"http://127.0.0.1:{setup.gw.codec_port}/{NS_A}/decode", data=b'{"payloads":[]}',
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {token}"} if token else {})})
        try:
            return urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code
    assert codec(setup.signers["EdDSA"].token()) == 200
    assert codec(None) == 401
    assert codec(refused["alg none"][0]) == 401
    assert codec(refused["expired"][0]) == 401

    # Keys rotated on the server are picked up without a restart (unknown kid -> fetch).
    rotated = Signer("ES256", "kid-rotated")
    token = rotated.token()
    setup.jwks.keys = [rotated.jwk()]
    deadline = time.monotonic() + 10
    while True:
        try:
            await describe_a(setup, token)
            break
        except RuntimeError as e:
            assert "code: Unauthenticated" in str(e), e
            assert time.monotonic() < deadline, f"rotated key never picked up: {e}"
            await asyncio.sleep(0.5)
    # The old keys are gone after the next refresh.
    deadline = time.monotonic() + 10
    while True:
        try:
            await describe_a(setup, rs.token())
        except RuntimeError as e:
            assert "code: Unauthenticated" in str(e), e
            break
        assert time.monotonic() < deadline, "a removed key is still accepted"
        await asyncio.sleep(0.5)

    # The provider down: the last good set is kept through failed refreshes.
    setup.jwks.stop()
    await asyncio.sleep(5)  # > jwks_refresh_secs: background refreshes fail meanwhile
    assert (await describe_a(setup, token)).namespace_info.name == NS_A
    # An unknown kid while it is down: still refused, the gateway keeps serving.
    await refused_connect(describe_a(setup, Signer("ES256", "kid-unknown").token()))
    assert "JWKS refresh failed; keeping the last good set" in setup.gw.output()
    upstream_saw_nothing_of_b_and_only_the_api_key(setup, [t for t, _ in refused.values()] + [token])


def test_the_api_key_beyond_loopback_needs_proxy_auth(workdir):
    d = rig.new_tmpdir(workdir, "auth-start-")
    base = {"proxy": {"listen": f"0.0.0.0:{rig.free_port()}", "api_key_env": "PGW_T_API_KEY"},
            "codec_server": {"enabled": False}, "admin": {"enabled": False},
            "encryption": {"enabled": False}, "compression": {"enabled": False}, "storage": {"enabled": False}}
    env = {"PGW_T_API_KEY": API_KEY}
    p = rig.run_gateway_once(rig.render_toml(base), d, extra_env=env)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "proxy.auth: required" in p.stderr and "allow_unauthenticated" in p.stderr, p.stderr
    assert API_KEY not in p.stderr + p.stdout
    # The explicit opt-out starts (check-config loads what start loads, without listening).
    base["proxy"]["allow_unauthenticated"] = True
    cfg = d / "optout.toml"
    cfg.write_text(rig.render_toml(base))
    p = rig.run_gateway_once(None, d, extra_env=env, args=["check-config", str(cfg)])
    assert p.returncode == 0, p.stderr
