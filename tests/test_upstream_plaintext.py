"""What the gateway sends the server, byte for byte: no failure text in plaintext.

A TCP relay between the gateway and a Temporal dev server records every byte the gateway sends
upstream (the gateway→server hop is plaintext HTTP/2). The relay's recording is also decoded
(HTTP/2 frames, HPACK headers for the method, gRPC messages, gzip-compressed ones inflated) so a
marker is found whether it went raw, split across DATA frames or compressed.

A Python SDK worker and client with default options go through the gateway (encryption on):
a query handler that raises (answered through `RespondQueryTaskCompleted`, and, for a query
the server buffered until the first workflow task, through
`RespondWorkflowTaskCompleted.query_results`),
an update validator that rejects, an activity that heartbeats and fails, and Nexus operations
that fail (an operation error and a handler error). Each carries a unique marker; none may reach
the server in plaintext. Through the gateway the client still sees the original texts (query
error, update rejection, activity failure, Nexus failures).

Found this way: failed queries' `error_message` went upstream in plaintext. The Python SDK sends
that text alone, with no `failure` beside it; the gateway now replaces it with `Encoded failure`
and adds a sealed failure that carries it, which the server hands back (QueryFailedFailure) and the
gateway restores into the gRPC status the client reads."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import uuid
from datetime import timedelta

import nexusrpc
import nexusrpc.handler
import pytest
from hpack import Decoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame
from temporalio import activity, workflow
from temporalio.api.nexus.v1 import EndpointSpec, EndpointTarget
from temporalio.api.operatorservice.v1 import CreateNexusEndpointRequest
from temporalio.api.workflowservice.v1 import (
    RespondActivityTaskFailedRequest,
    RespondNexusTaskCompletedRequest,
    RespondNexusTaskFailedRequest,
    RespondQueryTaskCompletedRequest,
    RespondWorkflowTaskCompletedRequest,
)
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError, NexusOperationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from features import full_gateway
from sdk_codec import ENCRYPTED

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WS = "/temporal.api.workflowservice.v1.WorkflowService/"
ENCODED_FAILURE = "Encoded failure"
QUERY_FAILED = 2  # QUERY_RESULT_TYPE_FAILED


def marker(what: str) -> str:
    return f"PGW-UPSTREAM-{what}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- the relay


class Relay:
    """Accepts TCP on a free port and pipes each connection to `upstream`, recording every byte
    sent upstream, per connection."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = rig.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self.connections: list[bytearray] = []
        self._sockets: list[socket.socket] = []
        self._stopping = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._accept, name="relay-accept", daemon=True)

    def start(self) -> "Relay":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopping:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            record = bytearray()
            with self._lock:
                self.connections.append(record)
                self._sockets += [down, up]
            threading.Thread(target=self._pipe, args=(down, up, record), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record is not None:
                    with self._lock:
                        record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopping = True
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.close()
            except OSError:
                pass

    def recorded(self) -> list[bytes]:
        with self._lock:
            return [bytes(r) for r in self.connections]

    def messages(self) -> list[tuple[str, bytes]]:
        """Every gRPC request message sent upstream so far, with its method path (inflated when
        it was sent compressed)."""
        out = []
        for conn in self.recorded():
            out += grpc_messages(conn)
        return out

    def find(self, needle: bytes) -> list[str]:
        """Where `needle` went upstream: "raw bytes" and/or the methods whose messages hold it."""
        where = []
        if any(needle in conn for conn in self.recorded()):
            where.append("raw bytes")
        where += sorted({path for path, msg in self.messages() if needle in msg})
        return where


def grpc_messages(conn: bytes) -> list[tuple[str, bytes]]:
    """Parses one recorded client→server HTTP/2 connection into (path, message) pairs."""
    if not conn.startswith(PREFACE):
        return []
    pos, decoder = len(PREFACE), Decoder()
    decoder.max_allowed_table_size = 1 << 20
    paths: dict[int, str] = {}
    data: dict[int, bytearray] = {}
    block: dict[int, bytearray] = {}
    while pos + 9 <= len(conn):
        frame, length = Frame.parse_frame_header(memoryview(conn[pos:pos + 9]))
        if pos + 9 + length > len(conn):
            break  # the rest is still in flight
        frame.parse_body(memoryview(conn[pos + 9:pos + 9 + length]))
        pos += 9 + length
        sid = frame.stream_id
        if isinstance(frame, (HeadersFrame, ContinuationFrame)):
            block.setdefault(sid, bytearray()).extend(frame.data)
            if "END_HEADERS" in frame.flags:
                for name, value in decoder.decode(bytes(block.pop(sid))):
                    if name in (":path", b":path"):
                        paths[sid] = value.decode() if isinstance(value, bytes) else value
        elif isinstance(frame, DataFrame):
            data.setdefault(sid, bytearray()).extend(frame.data)
    out = []
    for sid, body in data.items():
        i = 0
        while i + 5 <= len(body):
            flag, n = body[i], int.from_bytes(body[i + 1:i + 5], "big")
            msg = bytes(body[i + 5:i + 5 + n])
            i += 5 + n
            if flag & 1:
                try:
                    msg = gzip.decompress(msg)
                except OSError:
                    pass  # another encoding: the raw search still covers it
            out.append((paths.get(sid, "?"), msg))
    return out


def requests_of(relay: Relay, method: str, cls):
    return [cls.FromString(msg) for path, msg in relay.messages() if path == WS + method]


def assert_not_upstream(relay: Relay, markers: dict[str, str]) -> None:
    leaked = {what: where for what, m in markers.items() if (where := relay.find(m.encode()))}
    assert not leaked, f"plaintext reached the server: {leaked}"


def assert_sealed(failure) -> None:
    """A failure as the server receives it: sealed, attributes encrypted."""
    assert failure.message == ENCODED_FAILURE, failure
    assert failure.encoded_attributes.metadata["encoding"] == ENCRYPTED, failure


# --------------------------------------------------------------------------- workflows


@activity.defn
async def failing_activity(text: str, heartbeat: str) -> str:
    activity.heartbeat(heartbeat)
    raise ApplicationError(text, non_retryable=True)


@nexusrpc.service
class FailService:
    operation_error: nexusrpc.Operation[str, str]
    handler_error: nexusrpc.Operation[str, str]


@nexusrpc.handler.service_handler(service=FailService)
class FailServiceHandler:
    @nexusrpc.handler.sync_operation
    async def operation_error(self, ctx: nexusrpc.handler.StartOperationContext, text: str) -> str:
        raise nexusrpc.OperationError(text, state=nexusrpc.OperationErrorState.FAILED)

    @nexusrpc.handler.sync_operation
    async def handler_error(self, ctx: nexusrpc.handler.StartOperationContext, text: str) -> str:
        raise nexusrpc.HandlerError(text, type=nexusrpc.HandlerErrorType.BAD_REQUEST)


def chain(err: BaseException | None) -> str:
    parts = []
    while err is not None:
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__
    return " <- ".join(parts)


@workflow.defn
class FailingWorkflow:
    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.done)
        return "done"

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def failing_query(self, text: str) -> str:
        raise ApplicationError(text)

    @workflow.update
    async def guarded(self, text: str) -> str:
        return "accepted"

    @guarded.validator
    def reject(self, text: str) -> None:
        raise ApplicationError(text)

    @workflow.update
    async def run_activity(self, args: list[str]) -> str:
        try:
            await workflow.execute_activity(failing_activity, args=args, start_to_close_timeout=timedelta(seconds=30))
        except Exception as err:  # noqa: BLE001 - the chain is the result
            return chain(err)
        return "activity succeeded"

    @workflow.update
    async def call_nexus(self, args: list[str]) -> str:
        endpoint, operation, text = args
        client = workflow.create_nexus_client(service=FailService, endpoint=endpoint)
        op = FailService.operation_error if operation == "operation_error" else FailService.handler_error
        try:
            await client.execute_operation(op, text, schedule_to_close_timeout=timedelta(seconds=30))
        except NexusOperationError as err:
            return chain(err)
        return "operation succeeded"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nexus_server(workdir):
    server = rig.TemporalServer(rig.new_tmpdir(workdir, "temporal-upstream-"), name="temporal-upstream")
    server.dynamic_config = {
        "system.enableNexus": "true",
        "component.nexusoperations.callback.endpoint.template":
            f'"http://127.0.0.1:{server.http_port}/namespaces/{{{{.NamespaceName}}}}/nexus/callback"',
        "component.callbacks.allowedAddresses": '[{"Pattern":"*","AllowInsecure":true}]',
    }
    server.start()
    yield server
    server.stop()


@pytest.fixture
def relay(nexus_server):
    r = Relay(nexus_server.address).start()
    yield r
    r.stop()


@pytest.fixture
def gateway(gateway_factory, relay):
    return full_gateway(gateway_factory, relay.address, None, name="gw-upstream")


def with_worker(gateway, body, endpoint: str | None = None):
    """Runs `body(client, handle, task_queue)` against a started FailingWorkflow with a worker,
    all through the gateway; then finishes the workflow."""
    task_queue = f"upstream-{uuid.uuid4().hex[:8]}"

    async def run():
        client = await Client.connect(gateway.address, namespace="default")
        if endpoint is not None:
            await client.operator_service.create_nexus_endpoint(CreateNexusEndpointRequest(spec=EndpointSpec(
                name=endpoint, target=EndpointTarget(worker=EndpointTarget.Worker(namespace="default", task_queue=task_queue)))))
        async with Worker(client, task_queue=task_queue, workflows=[FailingWorkflow], activities=[failing_activity],
                          nexus_service_handlers=[FailServiceHandler()], workflow_runner=UnsandboxedWorkflowRunner()):
            handle = await client.start_workflow(FailingWorkflow.run, id=f"upstream-{uuid.uuid4().hex[:8]}",
                                                 task_queue=task_queue, execution_timeout=timedelta(seconds=120))
            try:
                return await body(client, handle)
            finally:
                await handle.signal(FailingWorkflow.finish)
                assert await handle.result() == "done"

    return asyncio.run(run())


# --------------------------------------------------------------------------- tests


def test_query_failure_text_stays_sealed(relay, gateway):
    """A query handler that raises, asked when the workflow is idle: the server sends a query
    task and the worker answers with `RespondQueryTaskCompleted` (`error_message` beside the
    failure). Both go upstream sealed; the client sees the original text."""
    m = marker("QUERY")

    async def body(client, handle):
        await handle.query("__stack_trace")  # the first workflow task is done
        with pytest.raises(WorkflowQueryFailedError) as err:
            await handle.query(FailingWorkflow.failing_query, m)
        return str(err.value)

    seen = with_worker(gateway, body)
    assert_not_upstream(relay, {"query failure": m})
    sent = [r for r in requests_of(relay, "RespondQueryTaskCompleted", RespondQueryTaskCompletedRequest)
            if r.completed_type == QUERY_FAILED]
    assert sent, "the worker's query failure never reached the server"
    for r in sent:
        assert r.error_message == ENCODED_FAILURE, r.error_message
        assert_sealed(r.failure)
    assert m in seen, f"the client saw {seen!r}, not the query handler's message"


def test_buffered_query_failure_text_stays_sealed(relay, gateway):
    """A query asked before the first workflow task ran is buffered by the server and answered
    in a `RespondWorkflowTaskCompleted.query_results` entry (`WorkflowQueryResult.error_message`
    beside its failure): sealed too, original text at the client."""
    m = marker("BUFFERED-QUERY")
    task_queue = f"upstream-{uuid.uuid4().hex[:8]}"

    async def run():
        client = await Client.connect(gateway.address, namespace="default")
        handle = await client.start_workflow(FailingWorkflow.run, id=f"upstream-{uuid.uuid4().hex[:8]}",
                                             task_queue=task_queue, execution_timeout=timedelta(seconds=120))
        query = asyncio.create_task(handle.query(FailingWorkflow.failing_query, m))
        await asyncio.sleep(1.0)  # the query waits at the server for the first workflow task
        async with Worker(client, task_queue=task_queue, workflows=[FailingWorkflow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            with pytest.raises(WorkflowQueryFailedError) as err:
                await query
            await handle.signal(FailingWorkflow.finish)
            assert await handle.result() == "done"
        return str(err.value)

    seen = asyncio.run(run())
    assert_not_upstream(relay, {"buffered query failure": m})
    results = [res for r in requests_of(relay, "RespondWorkflowTaskCompleted", RespondWorkflowTaskCompletedRequest)
               for res in r.query_results.values() if res.result_type == QUERY_FAILED]
    assert results, "the query was not answered in query_results (the server did not buffer it)"
    for res in results:
        assert res.error_message == ENCODED_FAILURE, res.error_message
        assert_sealed(res.failure)
    assert m in seen, f"the client saw {seen!r}, not the query handler's message"


def test_update_rejection_text_stays_sealed(relay, gateway):
    m = marker("UPDATE")

    async def body(client, handle):
        with pytest.raises(WorkflowUpdateFailedError) as err:
            await handle.execute_update(FailingWorkflow.guarded, m)
        return chain(err.value)

    seen = with_worker(gateway, body)
    assert_not_upstream(relay, {"update rejection": m})
    assert requests_of(relay, "RespondWorkflowTaskCompleted", RespondWorkflowTaskCompletedRequest)
    assert m in seen, f"the client saw {seen!r}, not the validator's message"


def test_activity_failure_text_stays_sealed(relay, gateway):
    m, hb = marker("ACTIVITY"), marker("HEARTBEAT")

    async def body(client, handle):
        return await handle.execute_update(FailingWorkflow.run_activity, [m, hb])

    seen = with_worker(gateway, body)
    assert_not_upstream(relay, {"activity failure": m, "heartbeat details": hb})
    sent = requests_of(relay, "RespondActivityTaskFailed", RespondActivityTaskFailedRequest)
    assert sent, "the activity failure never reached the server"
    for r in sent:
        assert_sealed(r.failure)
    assert m in seen, f"the workflow saw {seen!r}, not the activity's message"


@pytest.mark.parametrize("operation", ["operation_error", "handler_error"])
def test_nexus_failure_text_stays_sealed(relay, gateway, operation):
    m = marker(f"NEXUS-{operation}")
    endpoint = f"upstream-ep-{uuid.uuid4().hex[:8]}"

    async def body(client, handle):
        return await handle.execute_update(FailingWorkflow.call_nexus, [endpoint, operation, m])

    seen = with_worker(gateway, body, endpoint=endpoint)
    assert_not_upstream(relay, {f"nexus {operation}": m})
    completed = requests_of(relay, "RespondNexusTaskCompleted", RespondNexusTaskCompletedRequest)
    failed = requests_of(relay, "RespondNexusTaskFailed", RespondNexusTaskFailedRequest)
    assert completed or failed, "the Nexus handler's answer never reached the server"
    assert m in seen, f"the caller workflow saw {seen!r}, not the handler's message"


def test_relay_sees_plaintext_it_is_shown(relay, gateway_factory):
    """The search is not blind: through a gateway without encryption a query failure's text goes
    upstream as is (the client's gzip-compressed frames, which the raw search alone would miss),
    and the relay finds it in the worker's decoded answer."""
    plain = gateway_factory(relay.address, name="gw-plain")
    m = marker("PLAIN")

    async def body(client, handle):
        with pytest.raises(WorkflowQueryFailedError):
            await handle.query(FailingWorkflow.failing_query, m)

    with_worker(plain, body)
    found = relay.find(m.encode())
    assert WS + "RespondQueryTaskCompleted" in found or WS + "RespondWorkflowTaskCompleted" in found, found
