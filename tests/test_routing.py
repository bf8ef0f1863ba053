"""Upstreams by namespace: one gateway in front of two Temporal dev servers.

Both servers hold namespaces `a` and `b` (so a request sent to the wrong server would
succeed there, silently); the gateway binds `a` to `[upstreams.one]` (server 1) and `b` to
`[upstreams.two]` (server 2), each with its own API key, the default upstream being server 1.
Python workers and clients of both namespaces use one gateway with SDK defaults. Each
workflow's history is read at its own server, and is absent from the same namespace at the
other. Recording fronts between the gateway and the servers show that every request reaching
an upstream names that upstream's namespace and carries that upstream's API key. With
`[proxy.auth]`, a credential for `a` cannot act on `b`, and task completions (authorized
against namespace ids the gateway looks up at the namespace's own server) work in both.
"""

from __future__ import annotations

import urllib.request
import uuid
from datetime import timedelta

import grpc
import pytest
from temporalio import activity, workflow
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, GetWorkflowExecutionHistoryRequest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from test_auth import RecordingFront

KEY_ONE = "key-one-" + uuid.uuid4().hex
KEY_TWO = "key-two-" + uuid.uuid4().hex
TOKEN_A = "tok-a-" + uuid.uuid4().hex
TOKEN_B = "tok-b-" + uuid.uuid4().hex
WS = "/temporal.api.workflowservice.v1.WorkflowService/"


class ServerWithAandB(rig.TemporalServer):
    """A dev server that creates namespaces `a` and `b` at start."""

    def _ui_args(self) -> list[str]:
        return ["--headless", "--namespace", "a", "--namespace", "b"]


@activity.defn
async def where(namespace: str) -> str:
    return f"activity in {activity.info().workflow_namespace} for {namespace}"


@workflow.defn
class RoutedWorkflow:
    @workflow.run
    async def run(self, namespace: str) -> str:
        return await workflow.execute_activity(where, namespace, start_to_close_timeout=timedelta(seconds=30))


class Setup:
    pass


@pytest.fixture(scope="module")
def servers(workdir):
    s = Setup()
    base = rig.new_tmpdir(workdir, "routing-")
    s.base = base
    s.one = ServerWithAandB(base / "one", name="temporal-one")
    s.two = ServerWithAandB(base / "two", name="temporal-two")
    s.front_one = s.front_two = None
    try:
        s.one.start()
        s.two.start()
        s.front_one = RecordingFront(s.one.address).start()
        s.front_two = RecordingFront(s.two.address).start()
        yield s
    finally:
        for front in (s.front_one, s.front_two):
            if front is not None:
                front.stop()
        s.one.stop()
        s.two.stop()


def routed_config(gw: rig.Gateway, s, **sections) -> dict:
    """Default upstream server 1 (directly); `a` → front of server 1, `b` → front of server 2."""
    return rig.merge_sections({
        **gw.listener_sections(),
        "upstreams.one": {"address": s.front_one.address, "api_key_env": "PGW_T_KEY_ONE"},
        "upstreams.two": {"address": s.front_two.address, "api_key_env": "PGW_T_KEY_TWO", "connect_timeout_ms": 2000},
        "namespaces.a": {"upstream": "one"},
        "namespaces.b": {"upstream": "two"},
        "encryption": {"enabled": False}, "compression": {"enabled": False}, "storage": {"enabled": False},
    }, sections)


KEYS = {"PGW_T_KEY_ONE": KEY_ONE, "PGW_T_KEY_TWO": KEY_TWO}


def history_ids(address: str, namespace: str, workflow_id: str) -> tuple[bool, str]:
    """(whether `workflow_id` has a history in `namespace` at the server `address`, details)."""
    channel = rig.channel(address)
    try:
        call = channel.unary_unary(WS + "GetWorkflowExecutionHistory",
                                   request_serializer=GetWorkflowExecutionHistoryRequest.SerializeToString,
                                   response_deserializer=lambda b: b)
        try:
            call(GetWorkflowExecutionHistoryRequest(namespace=namespace, execution=WorkflowExecution(workflow_id=workflow_id)),
                 timeout=20)
            return True, "found"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            return False, e.details()
    finally:
        channel.close()


def fronts_saw_only_their_namespace(s) -> None:
    """Every request at front one is of namespace `a` with key one, at front two of `b` with
    key two; no namespace-less call (GetSystemInfo, ...) went to a named upstream."""
    for front, ns, other, key in ((s.front_one, "a", "b", KEY_ONE), (s.front_two, "b", "a", KEY_TWO)):
        records = front.snapshot()
        assert records, f"upstream of {ns} saw nothing"
        for method, md, _body in records:
            md = dict(md)
            assert md.get("authorization") == f"Bearer {key}", (method, md.get("authorization"))
            assert md.get("temporal-namespace") in (ns, None), (method, md.get("temporal-namespace"))
            assert not method.endswith(("/GetSystemInfo", "/GetClusterInfo", "/ListNamespaces")), method
            for secret in (TOKEN_A, TOKEN_B):
                assert secret not in str(md), method


async def run_workflows(client_a: Client, client_b: Client) -> dict[str, str]:
    """One workflow with an activity in each namespace, workers of both on task queues of the
    same name through the one gateway; returns {namespace: workflow id}."""
    tq = f"tq-{uuid.uuid4().hex[:8]}"
    ids = {"a": f"wf-a-{uuid.uuid4().hex[:8]}", "b": f"wf-b-{uuid.uuid4().hex[:8]}"}
    # Unsandboxed: this module imports the rig, which the sandbox refuses (as in test_auth).
    async with Worker(client_a, task_queue=tq, workflows=[RoutedWorkflow], activities=[where],
                      workflow_runner=UnsandboxedWorkflowRunner()), \
            Worker(client_b, task_queue=tq, workflows=[RoutedWorkflow], activities=[where],
                   workflow_runner=UnsandboxedWorkflowRunner()):
        ha = await client_a.start_workflow(RoutedWorkflow.run, "a", id=ids["a"], task_queue=tq)
        hb = await client_b.start_workflow(RoutedWorkflow.run, "b", id=ids["b"], task_queue=tq)
        assert await ha.result() == "activity in a for a"
        assert await hb.result() == "activity in b for b"
        assert len((await ha.fetch_history()).events) > 5
        assert len((await hb.fetch_history()).events) > 5
    return ids


def histories_at_their_own_server(s, ids: dict[str, str]) -> None:
    assert history_ids(s.one.address, "a", ids["a"])[0], "a's workflow is not at server one"
    assert history_ids(s.two.address, "b", ids["b"])[0], "b's workflow is not at server two"
    # Same namespace names at the other server: nothing arrived there.
    assert not history_ids(s.two.address, "a", ids["a"])[0], "a's workflow reached server two"
    assert not history_ids(s.one.address, "b", ids["b"])[0], "b's workflow reached server one"


def raw_call(address: str, method: str, body: bytes, metadata=()) -> grpc.RpcError | None:
    channel = rig.channel(address)
    try:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(body, metadata=list(metadata), timeout=10)
            return None
        except grpc.RpcError as e:
            return e
    finally:
        channel.close()


sync = rig.sync


@sync
async def test_namespaces_reach_their_own_server_through_one_gateway(servers, gateway_factory):
    s = servers
    # Forwarding only: the ingress runs because namespaces are bound to upstreams.
    gw = gateway_factory(s.one.address, name="gateway-routing", extra_env=KEYS,
                         config=lambda gw: routed_config(gw, s))
    client_a = await Client.connect(gw.address, namespace="a")
    client_b = await Client.connect(gw.address, namespace="b")
    ids = await run_workflows(client_a, client_b)
    histories_at_their_own_server(s, ids)
    fronts_saw_only_their_namespace(s)
    # An unbound namespace goes to the default (server one, directly).
    assert (await client_a.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))).namespace_info.name == "default"
    # What the gateway cannot route is refused, not sent to the default.
    before = len(s.front_one.snapshot()) + len(s.front_two.snapshot())
    err = raw_call(gw.address, "/temporal.api.workflowservice.v1.WorkflowService/InventedMethod",
                   DescribeNamespaceRequest(namespace="b").SerializeToString())
    assert err is not None and err.code() == grpc.StatusCode.UNIMPLEMENTED, err
    assert "which upstream" in err.details(), err.details()
    err = raw_call(gw.address, WS + "DescribeNamespace", DescribeNamespaceRequest(id=str(uuid.uuid4())).SerializeToString())
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "by id" in err.details(), err.details()
    assert len(s.front_one.snapshot()) + len(s.front_two.snapshot()) == before
    assert "panicked" not in gw.output()


@sync
async def test_with_auth_a_credential_for_a_cannot_act_on_b(servers, gateway_factory):
    s = servers
    key = b"\x42" * 32
    env = {**KEYS, "PGW_T_TOKEN_A": TOKEN_A, "PGW_T_TOKEN_B": TOKEN_B, "PGW_T_DEK": rig.b64(key)}
    gw = gateway_factory(s.one.address, name="gateway-routing-auth", extra_env=env, config=lambda gw: routed_config(
        gw, s,
        **{"proxy.auth": {"tokens": [{"env": "PGW_T_TOKEN_A", "namespaces": ["a"]},
                                     {"env": "PGW_T_TOKEN_B", "namespaces": ["b"]}]},
           "encryption": {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_T_DEK"}]}}))

    async def connect(namespace: str, token: str) -> Client:
        # The gateway's listener is cleartext on loopback (the SDK turns TLS on with an API key).
        return await Client.connect(gw.address, namespace=namespace, api_key=token, tls=False)

    # Workers of both namespaces complete tasks: their task tokens carry the namespace id
    # of their own server, which the gateway looked up there (the other server's `a` and `b`
    # have other ids).
    ids = await run_workflows(await connect("a", TOKEN_A), await connect("b", TOKEN_B))
    histories_at_their_own_server(s, ids)
    fronts_saw_only_their_namespace(s)
    # A's credential in b: refused at the gateway, nothing reaches b's server.
    before = len(s.front_two.snapshot())
    a_in_b = await connect("b", TOKEN_A)
    with pytest.raises(RPCError) as info:
        await a_in_b.start_workflow(RoutedWorkflow.run, "b", id=f"wf-x-{uuid.uuid4().hex[:6]}", task_queue="tq-x")
    assert info.value.status == RPCStatusCode.PERMISSION_DENIED, info.value
    with pytest.raises(RPCError) as info:
        await a_in_b.get_workflow_handle(ids["b"]).describe()
    assert info.value.status == RPCStatusCode.PERMISSION_DENIED, info.value
    assert len(s.front_two.snapshot()) == before, "a request with a's credential reached b's server"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=5).read().decode()
    assert 'pgw_auth_decisions_total{result="permission_denied",credential="token"}' in metrics


def test_an_unknown_upstream_name_is_refused_at_start(workdir):
    p = rig.run_gateway_once("[upstreams.one]\naddress = \"127.0.0.1:1\"\n[namespaces.a]\nupstream = \"onee\"\n",
                             rig.new_tmpdir(workdir, "routing-bad-"))
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert 'namespaces.a.upstream: names upstream "onee", which is not in [upstreams] (configured: one)' in p.stderr, p.stderr


@sync
async def test_a_namespace_bound_to_an_mtls_upstream_uses_that_upstreams_tls_identity(temporal_server, gateway_factory, workdir):
    """`[upstreams.<name>.tls]` has the keys and meaning of `[proxy.upstream_tls]`: namespace
    `default` is bound to nginx terminating mTLS in front of the dev server (the stand-in for a
    Temporal Cloud namespace endpoint); the default upstream is the dev server in cleartext."""
    from tls_pki import Ca, TlsFront, nginx_bin

    if nginx_bin() is None:
        pytest.skip("nginx not installed (scripts/setup.sh)")
    d = rig.new_tmpdir(workdir, "routing-tls-")
    front_ca, client_ca = Ca(d, "front-ca"), Ca(d, "front-client-ca")
    name = "ns-default.cloud.test"
    client_leaf = client_ca.client("payload-gateway-cloud")
    front = TlsFront(d / "nginx", temporal_server.address, front_ca.server(name), client_ca)

    def config(gw: rig.Gateway, with_cert: bool) -> dict:
        tls = {"enabled": True, "ca_file": str(front_ca.cert_file), "server_name": name}
        if with_cert:
            tls.update(cert_file=str(client_leaf.cert), key_file=str(client_leaf.key))
        return {
            **gw.listener_sections(),
            "upstreams.cloud": {"address": front.address},
            "upstreams.cloud.tls": tls,
            "namespaces.default": {"upstream": "cloud"},
            "encryption": {"enabled": False}, "compression": {"enabled": False}, "storage": {"enabled": False},
        }

    try:
        front.start()
        gw = gateway_factory(temporal_server.address, name="gateway-routing-tls", config=lambda gw: config(gw, True))
        client = await Client.connect(gw.address)
        tq = f"tq-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=tq, workflows=[RoutedWorkflow], activities=[where],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            assert await client.execute_workflow(RoutedWorkflow.run, "default", id=f"wf-{uuid.uuid4().hex[:8]}",
                                                 task_queue=tq) == "activity in default for default"
        log = (front.prefix / "access.log").read_text()
        assert "PollWorkflowTaskQueue" in log and "verify=SUCCESS" in log, log[-2000:]
        assert 'CN=payload-gateway-cloud' in log, log[-2000:]
        assert "GetSystemInfo" not in log, "a namespace-less call went to the bound upstream"
        # Without the upstream's client certificate the bound namespace fails (the front wants
        # one), while namespace-less calls (the SDK's connect: GetSystemInfo) still reach the
        # default upstream.
        bare = gateway_factory(temporal_server.address, name="gateway-routing-tls-nocert",
                               config=lambda gw: config(gw, False))
        client = await Client.connect(bare.address)
        with pytest.raises(RPCError) as info:
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
        assert "No required SSL certificate was sent" in info.value.message, info.value.message
    finally:
        front.stop()
