"""Parser differentials (issue 22, item 2): what the gateway decides on must be what the server
parses. Black box, judged at the Temporal server.

A token granted namespace A (`default`) only sends, through the gateway, requests shaped so that
a parser reading them differently from the server's would authorize A while the server acts on
B (`diff-b`): a compressed frame holding two gzip members (Go's gzip reader reads every member;
protobuf's last field wins), the namespace field twice, both together, bytes after the message
or after the gzip member, an empty compressed frame, an unsupported `grpc-encoding`, a `:path`
without its leading `/` or with a query string, and namespace fields that only a parser with the
server's rules reads right (a wrong wire type, which Go ignores; a group hiding a string; an
overlong tag or length varint; a namespace that is not UTF-8). Requests are built from the
`temporalio.api` protobuf classes and framed by hand (`h2raw`, a raw HTTP/2 client).

Every case is judged where the effect lands: B's state is read directly at the dev server with
an admin client, never through the gateway. A case passes when the gateway refused
(`PERMISSION_DENIED`, `INVALID_ARGUMENT` or `UNIMPLEMENTED`, as fits the shape) or the server
acted only on A, and B is untouched: the victim workflow still running with its history
unchanged (no cancel request, signal, update, termination, reset, deletion), its activity not
paused, B's namespace description unchanged, B's schedule present and not paused, a described
B workflow's run id absent from the response, no workflow started in B.

Three gateway configurations share one dev server:
- `auth`: `[proxy.auth]` with the token for A, nothing else;
- `rewrite`: no auth, encryption on for every namespace except A (`[namespaces.default]
  encryption = false`). With no authorization there is nothing to bypass, so the judge is that
  the server acts on the namespace the gateway decided: a request the gateway takes for A is not
  encrypted, so if the server acted on B its plaintext marker would land in B. B must never hold
  the marker in plaintext (its history, and the update messages of a pending workflow task);
- `both`: the two together.

Positive controls prove each path works: every method, sent as one gzip member naming A, is
accepted and acts on A (in `rewrite`: lands encrypted in B when naming B, in plaintext in A when
naming A); every namespace-shape family, in its form naming A only (two members both naming A,
the field twice as A, a wrong wire type or a group after A), is accepted and acts on A.
`test_the_attack_shapes_reach_b_at_the_server` sends the shapes to the server directly and
checks which of them act on B there (the suite's teeth). `test_multi_operation_inner_namespace`
records what the dev server does with an outer namespace A and inner operations naming B: it
refuses them ("Operation namespace did not match request's namespace").

Victim workflows and schedules are made in parallel batches; a case that verified its target
untouched gives it back for the next case of the same method (the state it is compared with is
the one recorded when it was made). The whole module takes about two minutes.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from concurrent import futures
from typing import Callable, Optional

import grpc
import pytest
from google.protobuf import duration_pb2
from temporalio.api.command.v1 import message_pb2 as command
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.enums.v1 import command_type_pb2, event_type_pb2, update_pb2, workflow_pb2
from temporalio.api.namespace.v1 import message_pb2 as namespace_msg
from temporalio.api.schedule.v1 import message_pb2 as schedule
from temporalio.api.taskqueue.v1 import message_pb2 as taskqueue
from temporalio.api.update.v1 import message_pb2 as update
from temporalio.api.workflow.v1 import message_pb2 as workflow_msg
from temporalio.api.workflowservice.v1 import request_response_pb2 as ws
from temporalio.api.workflowservice.v1 import service_pb2_grpc

import h2raw
import rig

NS_A = "default"
NS_B = "diff-b"
TOKEN_A = "tok-a-" + uuid.uuid4().hex
KEY = os.urandom(32)
WS = "/temporal.api.workflowservice.v1.WorkflowService/"
ENCRYPTED = b"binary/encrypted"
REFUSED = {"PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED"}
UPDATE_WAIT = 1.5  # seconds the server may hold an update for a worker that never comes


# --------------------------------------------------------------------------- the rig


class ServerWithB(rig.TemporalServer):
    def _ui_args(self) -> list[str]:
        return ["--headless", "--namespace", NS_B]


def gateway_config(gw: rig.Gateway, auth: bool, rewrite: bool) -> dict:
    config = gw.listener_sections()
    if auth:
        config["proxy.auth"] = {"forward_client_authorization": False,
                                "tokens": [{"env": "PGW_T_DIFF_TOKEN_A", "namespaces": [NS_A]}]}
    if rewrite:
        config["encryption"] = {"enabled": True, "active_key": "k1", "keys": rig.key_files(gw.workdir, {"k1": KEY})}
        config[f"namespaces.{NS_A}"] = {"encryption": False}
    else:
        config["encryption"] = {"enabled": False}
    config["compression"] = {"enabled": False}
    config["storage"] = {"enabled": False}
    return config


CONFIGS = {"auth": (True, False), "rewrite": (False, True), "both": (True, True)}


class Pool:
    """Objects made at the server in parallel batches (victim workflows, schedules). A case
    may give its object back under a key (its method and what it verified) for the next case
    asking for the same key: "untouched" objects had their state just verified equal to the
    state recorded when they were made; "marker" objects only lack that case's plaintext
    marker. An object that failed its check is never given back."""

    def __init__(self, make: Callable, batch: int = 8):
        self.make, self.batch = make, batch
        self.ready: dict[str, list] = {}
        self.returned: dict[tuple[str, str], list] = {}
        self.lock = threading.Lock()

    def take(self, env: "Env", ns: str, key: str = ""):
        with self.lock:
            returned = self.returned.get((key, ns))
            if key and returned:
                return returned.pop()
            ready = self.ready.setdefault(ns, [])
            if not ready:
                with futures.ThreadPoolExecutor(4) as ex:
                    ready.extend(ex.map(lambda _: self.make(env, ns), range(self.batch)))
            return ready.pop()

    def give_back(self, key: str, ns: str, obj) -> None:
        with self.lock:
            self.returned.setdefault((key, ns), []).append(obj)


class Env:
    server: ServerWithB
    admin: service_pb2_grpc.WorkflowServiceStub
    gateways: dict[str, rig.Gateway]
    victims: Pool
    full_victims: Pool
    schedules: Pool


@pytest.fixture(scope="module")
def env(workdir):
    e = Env()
    base = rig.new_tmpdir(workdir, "difftests-")
    e.server = ServerWithB(base / "temporal", name="temporal-difftests")
    e.gateways = {}
    e.victims = Pool(make_victim)
    e.full_victims = Pool(make_full_victim, batch=4)
    e.schedules = Pool(make_schedule, batch=4)
    channel = None
    try:
        e.server.start()
        channel = grpc.insecure_channel(e.server.address, options=rig.GRPC_CHANNEL_OPTIONS)
        e.admin = service_pb2_grpc.WorkflowServiceStub(channel)
        for name, (auth, rewrite) in CONFIGS.items():
            gw = rig.Gateway(base / name, e.server.address, config={}, name=f"gw-diff-{name}",
                             extra_env={"PGW_T_DIFF_TOKEN_A": TOKEN_A})
            gw.configure(gateway_config(gw, auth, rewrite))
            e.gateways[name] = gw
            gw.start()
        yield e
    finally:
        panics = []
        for gw in e.gateways.values():
            gw.stop()
            if gw.proc is not None and "panicked at" in gw.output():
                panics.append(gw.describe())
        if channel is not None:
            channel.close()
        e.server.stop()
        assert not panics, "a gateway panicked:\n" + "\n".join(panics)


# --------------------------------------------------------------------------- protobuf wire helpers


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def len_field(field: int, data: bytes) -> bytes:
    return tag(field, 2) + varint(len(data)) + data


def ns_field(message_class, namespace: str) -> bytes:
    """The request type's `namespace` field naming `namespace`, as its own serialized bytes."""
    number = message_class.DESCRIPTOR.fields_by_name["namespace"].number
    return len_field(number, namespace.encode())


def gz(data: bytes) -> bytes:
    return h2raw.gzip_member(data)


# --------------------------------------------------------------------------- state at the server (admin, direct)


def rid() -> str:
    return str(uuid.uuid4())


def short() -> str:
    return uuid.uuid4().hex[:10]


def marker_payload(marker: bytes) -> common.Payloads:
    return common.Payloads(payloads=[common.Payload(metadata={"encoding": b"json/plain"}, data=b'"' + marker + b'"')])


@dataclasses.dataclass
class Victim:
    """A running workflow in `ns` on a task queue nobody polls. A plain victim's first workflow
    task stays pending; a `full` one's completed and scheduled activity `act` (for reset and
    activity pause). `events`, `pending_task` and `paused`: its history length, whether a
    workflow task is pending, and its activities' paused flags, right after it was made."""
    ns: str
    wid: str
    run_id: str
    tq: str
    events: int = 0
    pending_task: bool = True
    paused: tuple = ()


def make_victim(env: Env, ns: str) -> Victim:
    wid, tq = f"victim-{short()}", f"tq-{short()}"
    started = env.admin.StartWorkflowExecution(ws.StartWorkflowExecutionRequest(
        namespace=ns, workflow_id=wid, workflow_type=common.WorkflowType(name="Victim"),
        task_queue=taskqueue.TaskQueue(name=tq), request_id=rid()), timeout=10)
    v = Victim(ns, wid, started.run_id, tq)
    v.events = len(history(env, ns, wid, v.run_id))
    return v


def make_full_victim(env: Env, ns: str) -> Victim:
    v = make_victim(env, ns)
    wid, tq = v.wid, v.tq
    task = env.admin.PollWorkflowTaskQueue(ws.PollWorkflowTaskQueueRequest(
        namespace=ns, task_queue=taskqueue.TaskQueue(name=tq), identity="difftests"), timeout=20)
    assert task.task_token, "the victim's first workflow task never came"
    env.admin.RespondWorkflowTaskCompleted(ws.RespondWorkflowTaskCompletedRequest(
        namespace=ns, task_token=task.task_token, identity="difftests", commands=[command.Command(
            command_type=command_type_pb2.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
            schedule_activity_task_command_attributes=command.ScheduleActivityTaskCommandAttributes(
                activity_id="act", activity_type=common.ActivityType(name="Never"),
                task_queue=taskqueue.TaskQueue(name=tq + "-act"),
                schedule_to_close_timeout=duration_pb2.Duration(seconds=36000),
                start_to_close_timeout=duration_pb2.Duration(seconds=3600)))]), timeout=10)
    v.events, v.pending_task, v.paused = len(history(env, ns, wid, v.run_id)), False, (False,)
    return v


def history(env: Env, ns: str, wid: str, run_id: str = "") -> list:
    h = env.admin.GetWorkflowExecutionHistory(ws.GetWorkflowExecutionHistoryRequest(
        namespace=ns, execution=common.WorkflowExecution(workflow_id=wid, run_id=run_id)), timeout=10)
    return list(h.history.events)


def describe(env: Env, ns: str, wid: str) -> Optional[ws.DescribeWorkflowExecutionResponse]:
    try:
        return env.admin.DescribeWorkflowExecution(ws.DescribeWorkflowExecutionRequest(
            namespace=ns, execution=common.WorkflowExecution(workflow_id=wid)), timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def event_names(events) -> list[str]:
    return [event_type_pb2.EventType.Name(e.event_type) for e in events]


def update_admitted(env: Env, ns: str, wid: str, update_id: str) -> bool:
    try:
        env.admin.PollWorkflowExecutionUpdate(ws.PollWorkflowExecutionUpdateRequest(
            namespace=ns, update_ref=update.UpdateRef(workflow_execution=common.WorkflowExecution(workflow_id=wid),
                                                      update_id=update_id),
            wait_policy=update.WaitPolicy(lifecycle_stage=update_pb2.UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_ADMITTED)),
            timeout=5)
        return True
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def victim_untouched(env: Env, v: Victim) -> None:
    d = describe(env, v.ns, v.wid)
    assert d is not None, f"B CHANGED: victim {v.wid} in {v.ns} is gone (deleted)"
    info = d.workflow_execution_info
    assert info.execution.run_id == v.run_id, f"B CHANGED: victim {v.wid} in {v.ns} was reset to run {info.execution.run_id}"
    assert info.status == workflow_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING, \
        f"B CHANGED: victim in {v.ns} is {workflow_pb2.WorkflowExecutionStatus.Name(info.status)}"
    events = history(env, v.ns, v.wid, v.run_id)
    assert len(events) == v.events, f"B CHANGED: victim history in {v.ns} grew: {event_names(events[v.events:])}"
    assert d.HasField("pending_workflow_task") == v.pending_task, f"B CHANGED: a workflow task is pending on the victim in {v.ns}"
    assert tuple(a.paused for a in d.pending_activities) == v.paused, f"B CHANGED: victim's activity in {v.ns}: {d.pending_activities}"


def namespace_description(env: Env, ns: str) -> str:
    return env.admin.DescribeNamespace(ws.DescribeNamespaceRequest(namespace=ns), timeout=10).namespace_info.description


def make_schedule(env: Env, ns: str) -> str:
    sid = f"sched-{short()}"
    env.admin.CreateSchedule(ws.CreateScheduleRequest(
        namespace=ns, schedule_id=sid, request_id=rid(), identity="difftests",
        schedule=schedule.Schedule(
            spec=schedule.ScheduleSpec(interval=[schedule.IntervalSpec(interval=duration_pb2.Duration(seconds=3600))]),
            action=schedule.ScheduleAction(start_workflow=workflow_msg.NewWorkflowExecutionInfo(
                workflow_id=f"from-{sid}", workflow_type=common.WorkflowType(name="Nobody"),
                task_queue=taskqueue.TaskQueue(name=f"tq-{short()}"))))), timeout=10)
    return sid


def schedule_state(env: Env, ns: str, sid: str) -> Optional[schedule.ScheduleState]:
    try:
        return env.admin.DescribeSchedule(ws.DescribeScheduleRequest(namespace=ns, schedule_id=sid), timeout=10).schedule.state
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def eventually(check: Callable[[], None], timeout: float = 8.0) -> None:
    """Retries `check` (an assertion) until it holds: deletion and schedule changes land
    asynchronously at the server."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stored_bytes(env: Env, ns: str, wid: str, tq: str, poll: bool) -> bytes:
    """Everything the server holds for `wid` in `ns` that may carry a payload: its history, and
    with `poll` the messages (update requests) of a pending workflow task, polled from `tq`."""
    d = describe(env, ns, wid)
    if d is None:
        return b""
    blob = env.admin.GetWorkflowExecutionHistory(ws.GetWorkflowExecutionHistoryRequest(
        namespace=ns, execution=common.WorkflowExecution(workflow_id=wid)), timeout=10).SerializeToString()
    if poll and d.HasField("pending_workflow_task"):
        try:
            task = env.admin.PollWorkflowTaskQueue(ws.PollWorkflowTaskQueueRequest(
                namespace=ns, task_queue=taskqueue.TaskQueue(name=tq), identity="difftests"), timeout=5)
            blob += task.SerializeToString()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    return blob


# --------------------------------------------------------------------------- the methods


@dataclasses.dataclass
class Target:
    """What one case acts on, in one namespace: a victim workflow, a schedule, a fresh workflow
    id, an update id, the marker its payloads carry."""
    ns: str
    victim: Optional[Victim] = None
    schedule_id: str = ""
    wid: str = ""
    tq: str = ""
    update_id: str = ""
    marker: bytes = b""
    description: str = ""


class Method:
    """A WorkflowService method under test: how to prepare a target, build its request, and
    judge at the server whether it acted on that target."""
    name: str
    request_class: type
    payloads = False  # whether its request carries payloads (the rewrite configuration's judge)
    wait: Optional[float] = None  # grpc-timeout when the server holds the call (updates)
    full_victim = False  # needs a completed workflow task and a scheduled activity

    def prepare(self, env: Env, ns: str, reuse: str = "") -> Target:
        """A target in `ns`; `reuse`: a target given back under this key by an earlier case of
        this method may do."""
        pool = env.full_victims if self.full_victim else env.victims
        return Target(ns, victim=pool.take(env, ns, self.name + reuse if reuse else ""),
                      marker=b"difftest-plain-" + short().encode())

    def give_back(self, env: Env, t: Target, key: str) -> None:
        """Returns a target for the next case of this method that asks for `key`: "untouched"
        when `untouched` just verified it unchanged, "marker" when only the absence of this
        case's plaintext marker was verified (the target may have changed)."""
        if t.victim is not None:
            (env.full_victims if self.full_victim else env.victims).give_back(self.name + key, t.ns, t.victim)
        if t.schedule_id:
            env.schedules.give_back(self.name + key, t.ns, t.schedule_id)

    def build(self, ns: str, t: Target, inner_ns: Optional[str] = None):
        raise NotImplementedError

    def untouched(self, env: Env, t: Target, reply: h2raw.Reply) -> None:
        victim_untouched(env, t.victim)

    def acted(self, env: Env, t: Target, reply: h2raw.Reply) -> None:
        raise NotImplementedError

    def acted_on_a(self, env: Env, t: Target, reply: h2raw.Reply) -> bool:
        """Whether the server acted on A with a request built for B's target `t` (named by
        id): by default it looked for B's object in A and did not find it."""
        return reply.code == "NOT_FOUND"

    def stored(self, env: Env, t: Target) -> bytes:
        wid = t.victim.wid if t.victim else t.wid
        tq = t.victim.tq if t.victim else t.tq
        return stored_bytes(env, t.ns, wid, tq, poll=self.wait is not None)


def ok(reply: h2raw.Reply, also: tuple[str, ...] = ()) -> None:
    assert reply.code in ("OK",) + also, f"the request was not accepted: {reply}"


def execution(t: Target) -> common.WorkflowExecution:
    return common.WorkflowExecution(workflow_id=t.victim.wid)


class Cancel(Method):
    name, request_class = "RequestCancelWorkflowExecution", ws.RequestCancelWorkflowExecutionRequest

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, workflow_execution=execution(t), identity="difftests", request_id=rid())

    def acted(self, env, t, reply):
        ok(reply)
        assert "EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED" in event_names(history(env, t.ns, t.victim.wid))


class Delete(Method):
    name, request_class = "DeleteWorkflowExecution", ws.DeleteWorkflowExecutionRequest

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, workflow_execution=execution(t))

    def untouched(self, env, t, reply):
        time.sleep(0.3)  # deletion is a task: give a forwarded one time to land
        victim_untouched(env, t.victim)

    def acted(self, env, t, reply):
        ok(reply)

        def gone():
            d = describe(env, t.ns, t.victim.wid)
            assert d is None or d.workflow_execution_info.status != workflow_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING
        eventually(gone)


class Terminate(Method):
    name, request_class = "TerminateWorkflowExecution", ws.TerminateWorkflowExecutionRequest

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, workflow_execution=execution(t), reason="difftests", identity="difftests")

    def acted(self, env, t, reply):
        ok(reply)
        assert describe(env, t.ns, t.victim.wid).workflow_execution_info.status == workflow_pb2.WORKFLOW_EXECUTION_STATUS_TERMINATED


class Reset(Method):
    name, request_class = "ResetWorkflowExecution", ws.ResetWorkflowExecutionRequest
    full_victim = True

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, workflow_execution=execution(t), reason="difftests",
                                  workflow_task_finish_event_id=4, request_id=rid(), identity="difftests")

    def acted(self, env, t, reply):
        ok(reply)
        assert describe(env, t.ns, t.victim.wid).workflow_execution_info.execution.run_id != t.victim.run_id


class PauseActivity(Method):
    name, request_class = "PauseActivity", ws.PauseActivityRequest
    full_victim = True

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, execution=execution(t), id="act", identity="difftests",
                                  reason="difftests", request_id=rid())

    def acted(self, env, t, reply):
        ok(reply)
        assert [a.paused for a in describe(env, t.ns, t.victim.wid).pending_activities] == [True]


class Describe(Method):
    name, request_class = "DescribeWorkflowExecution", ws.DescribeWorkflowExecutionRequest

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, execution=execution(t))

    def untouched(self, env, t, reply):
        assert t.victim.run_id.encode() not in b"".join(reply.messages()), f"B LEAKED: the response carries B's workflow ({reply})"

    def acted(self, env, t, reply):
        ok(reply)
        assert t.victim.run_id.encode() in b"".join(reply.messages())


class UpdateNamespace(Method):
    name, request_class = "UpdateNamespace", ws.UpdateNamespaceRequest

    def prepare(self, env, ns, reuse=""):
        return Target(ns, description=namespace_description(env, ns), marker=b"difftest-" + short().encode())

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, update_info=namespace_msg.UpdateNamespaceInfo(description=t.marker.decode()))

    def acted_on_a(self, env, t, reply):
        return reply.code == "OK" and namespace_description(env, NS_A) == t.marker.decode()

    def untouched(self, env, t, reply):
        now = namespace_description(env, t.ns)
        assert now == t.description, f"B CHANGED: namespace {t.ns} description is now {now!r}"

    def acted(self, env, t, reply):
        ok(reply)
        assert namespace_description(env, t.ns) == t.marker.decode()


class DeleteSchedule(Method):
    name, request_class = "DeleteSchedule", ws.DeleteScheduleRequest

    def prepare(self, env, ns, reuse=""):
        return Target(ns, schedule_id=env.schedules.take(env, ns, self.name + reuse if reuse else ""))

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, schedule_id=t.schedule_id, identity="difftests")

    def untouched(self, env, t, reply):
        time.sleep(0.3)
        state = schedule_state(env, t.ns, t.schedule_id)
        assert state is not None, f"B CHANGED: schedule {t.schedule_id} in {t.ns} was deleted"
        assert not state.paused, f"B CHANGED: schedule {t.schedule_id} in {t.ns} is paused"

    def acted(self, env, t, reply):
        ok(reply)

        def gone():
            assert schedule_state(env, t.ns, t.schedule_id) is None
        eventually(gone)


class PatchSchedule(DeleteSchedule):
    name, request_class = "PatchSchedule", ws.PatchScheduleRequest

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, schedule_id=t.schedule_id, identity="difftests", request_id=rid(),
                                  patch=schedule.SchedulePatch(pause="difftests"))

    def acted(self, env, t, reply):
        ok(reply)

        def paused():
            state = schedule_state(env, t.ns, t.schedule_id)
            assert state is not None and state.paused
        eventually(paused)


class Start(Method):
    name, request_class = "StartWorkflowExecution", ws.StartWorkflowExecutionRequest
    payloads = True

    def prepare(self, env, ns, reuse=""):
        return Target(ns, wid=f"start-{short()}", tq=f"tq-{short()}", marker=b"difftest-plain-" + short().encode())

    def build(self, ns, t, inner_ns=None):
        return ws.StartWorkflowExecutionRequest(namespace=ns, workflow_id=t.wid, workflow_type=common.WorkflowType(name="Nobody"),
                                  task_queue=taskqueue.TaskQueue(name=t.tq), input=marker_payload(t.marker),
                                  identity="difftests", request_id=rid())

    def acted_on_a(self, env, t, reply):
        return reply.code in ("OK", "DEADLINE_EXCEEDED") and describe(env, NS_A, t.wid) is not None

    def untouched(self, env, t, reply):
        assert describe(env, t.ns, t.wid) is None, f"B CHANGED: workflow {t.wid} was started in {t.ns}"

    def acted(self, env, t, reply):
        ok(reply)
        assert describe(env, t.ns, t.wid) is not None


class Signal(Method):
    name, request_class = "SignalWorkflowExecution", ws.SignalWorkflowExecutionRequest
    payloads = True

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, workflow_execution=execution(t), signal_name="sig",
                                  input=marker_payload(t.marker), identity="difftests", request_id=rid())

    def acted(self, env, t, reply):
        ok(reply)
        assert "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED" in event_names(history(env, t.ns, t.victim.wid))


class SignalWithStart(Signal):
    name, request_class = "SignalWithStartWorkflowExecution", ws.SignalWithStartWorkflowExecutionRequest

    def acted_on_a(self, env, t, reply):
        return reply.code == "OK" and describe(env, NS_A, t.victim.wid) is not None

    def build(self, ns, t, inner_ns=None):
        return self.request_class(namespace=ns, workflow_id=t.victim.wid, workflow_type=common.WorkflowType(name="Victim"),
                                  task_queue=taskqueue.TaskQueue(name=t.victim.tq), signal_name="sig",
                                  signal_input=marker_payload(t.marker), identity="difftests", request_id=rid())


class Update(Method):
    name, request_class = "UpdateWorkflowExecution", ws.UpdateWorkflowExecutionRequest
    payloads = True
    wait = UPDATE_WAIT

    def prepare(self, env, ns, reuse=""):
        t = super().prepare(env, ns, reuse)
        t.update_id = f"upd-{short()}"
        return t

    def build(self, ns, t, inner_ns=None):
        return self.request_class(
            namespace=ns, workflow_execution=execution(t),
            wait_policy=update.WaitPolicy(lifecycle_stage=update_pb2.UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_ACCEPTED),
            request=update.Request(meta=update.Meta(update_id=t.update_id, identity="difftests"),
                                   input=update.Input(name="upd", args=marker_payload(t.marker))))

    def untouched(self, env, t, reply):
        assert not update_admitted(env, t.ns, t.victim.wid, t.update_id), f"B CHANGED: update {t.update_id} admitted in {t.ns}"
        victim_untouched(env, t.victim)

    def acted(self, env, t, reply):
        ok(reply, ("DEADLINE_EXCEEDED",))  # no worker accepts it: the server holds it until the deadline
        assert update_admitted(env, t.ns, t.victim.wid, t.update_id)


class MultiOperation(Start):
    """Update-with-start; the inner operations name `inner_ns` (the server requires it to
    equal the outer namespace)."""
    name, request_class = "ExecuteMultiOperation", ws.ExecuteMultiOperationRequest
    wait = UPDATE_WAIT

    def prepare(self, env, ns, reuse=""):
        t = super().prepare(env, ns, reuse)
        t.update_id = f"upd-{short()}"
        return t

    def build(self, ns, t, inner_ns=None):
        inner = ns if inner_ns is None else inner_ns
        start = Start.build(self, inner, t)
        upd = ws.UpdateWorkflowExecutionRequest(
            namespace=inner, workflow_execution=common.WorkflowExecution(workflow_id=t.wid),
            wait_policy=update.WaitPolicy(lifecycle_stage=update_pb2.UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_ACCEPTED),
            request=update.Request(meta=update.Meta(update_id=t.update_id, identity="difftests"),
                                   input=update.Input(name="upd", args=marker_payload(t.marker))))
        return self.request_class(namespace=ns, operations=[
            ws.ExecuteMultiOperationRequest.Operation(start_workflow=start),
            ws.ExecuteMultiOperationRequest.Operation(update_workflow=upd)])

    def acted(self, env, t, reply):
        ok(reply, ("DEADLINE_EXCEEDED",))
        assert describe(env, t.ns, t.wid) is not None

    def acted_on_a(self, env, t, reply):
        # The outer namespace A with inner operations naming B: the server refuses the mismatch.
        return super().acted_on_a(env, t, reply) or (
            reply.code == "INVALID_ARGUMENT" and reply.grpc_message == "Update-with-Start could not be executed.")


METHODS = {m.name: m for m in (Cancel(), Delete(), Terminate(), Reset(), PauseActivity(), Describe(), UpdateNamespace(),
                                DeleteSchedule(), PatchSchedule(), Start(), Signal(), SignalWithStart(), Update(),
                                MultiOperation())}


# --------------------------------------------------------------------------- the wire shapes


@dataclasses.dataclass
class Wire:
    body: bytes
    encoding: Optional[str] = None
    path_suffix: str = ""  # appended to the method's path
    no_slash: bool = False  # the path without its leading '/'


def group_field(field: int, inner: bytes) -> bytes:
    """Field `field` as a (deprecated) group: start-group tag, inner fields, end-group tag.
    Go's protobuf treats a group where the schema says string as an unknown field."""
    return tag(field, 3) + inner + tag(field, 4)


# Each shape: (a, other, cls) -> Wire, where `a` is the serialized request naming A and
# `other` the namespace smuggled in (B for attacks, A for the family controls).
def two_members(a, other, cls):
    return Wire(h2raw.frame(gz(a) + gz(ns_field(cls, other)), compressed=True), "gzip")


def field_twice(a, other, cls):
    return Wire(h2raw.frame(a + ns_field(cls, other)))


def twice_and_two_members(a, other, cls):
    # First member: the namespace twice (other, then A: last is A); second member: other.
    return Wire(h2raw.frame(gz(ns_field(cls, other) + a) + gz(ns_field(cls, other)), compressed=True), "gzip")


def trailing_frame(a, other, cls):
    return Wire(h2raw.frame(a) + h2raw.frame(ns_field(cls, other)))


def trailing_bytes(a, other, cls):
    return Wire(h2raw.frame(a) + ns_field(cls, other))


def trailing_after_member(a, other, cls):
    return Wire(h2raw.frame(gz(a) + ns_field(cls, other), compressed=True), "gzip")


def empty_compressed(a, other, cls):
    return Wire(h2raw.frame(b"", compressed=True), "gzip")


def snappy(a, other, cls):
    return Wire(h2raw.frame(gz(a) + gz(ns_field(cls, other)), compressed=True), "snappy")


def path_without_slash(a, other, cls):
    return Wire(h2raw.frame(a + ns_field(cls, other)), no_slash=True)


def path_with_query(a, other, cls):
    return Wire(h2raw.frame(a + ns_field(cls, other)), path_suffix="?x=1")


def wrong_wire_type_after_a(a, other, cls):
    # Field 1 as a varint after the string A: Go ignores it (unknown field), the server sees A.
    number = cls.DESCRIPTOR.fields_by_name["namespace"].number
    return Wire(h2raw.frame(a + tag(number, 0) + varint(5)))


def group_hides_a(a, other, cls):
    # `other` as the last string field 1; then a group at field 1 holding "A": Go skips the
    # group (wrong wire type), so the server sees `other`; a parser that reads into groups sees A.
    number = cls.DESCRIPTOR.fields_by_name["namespace"].number
    return Wire(h2raw.frame(a + ns_field(cls, other) + group_field(number, ns_field(cls, NS_A))))


def overlong_tag(a, other, cls):
    # The tag of field 1 (wire type 2) as a two-byte varint: Go reads it as field 1.
    number = cls.DESCRIPTOR.fields_by_name["namespace"].number
    t = number << 3 | 2
    return Wire(h2raw.frame(a + bytes([0x80 | t, 0x00]) + varint(len(other)) + other.encode()))


def overlong_length(a, other, cls):
    number = cls.DESCRIPTOR.fields_by_name["namespace"].number
    return Wire(h2raw.frame(a + tag(number, 2) + bytes([0x80 | len(other), 0x00]) + other.encode()))


def non_utf8_namespace(a, other, cls):
    number = cls.DESCRIPTOR.fields_by_name["namespace"].number
    return Wire(h2raw.frame(a + len_field(number, other.encode() + b"\xff\xfe")))


# Shapes crossed with every method, and the refusals the gateway may answer with in the auth
# configurations; the server acting on A instead (`Method.acted_on_a`) passes too. A slashless
# `:path` may also be refused by the HTTP/2 server itself (RST_STREAM PROTOCOL_ERROR): then
# nothing was forwarded either.
SHAPES = {
    "two_gzip_members": (two_members, {"PERMISSION_DENIED"}),
    "namespace_twice": (field_twice, {"PERMISSION_DENIED"}),
    "twice_and_two_members": (twice_and_two_members, {"PERMISSION_DENIED"}),
    "trailing_frame": (trailing_frame, {"INVALID_ARGUMENT"}),
    "trailing_bytes": (trailing_bytes, {"INVALID_ARGUMENT"}),
    "trailing_after_gzip_member": (trailing_after_member, {"INVALID_ARGUMENT"}),
    "empty_compressed_frame": (empty_compressed, {"INVALID_ARGUMENT", "PERMISSION_DENIED"}),
    "grpc_encoding_snappy": (snappy, {"UNIMPLEMENTED"}),
    "path_without_slash": (path_without_slash, REFUSED | {"RESET(1)"}),
    "path_with_query": (path_with_query, REFUSED),
}
# Namespace-syntax shapes: the parser matters, not the method (three methods). A wrong wire
# type after A: the server sees A, so the gateway must let the server act on A (no refusal).
SYNTAX_SHAPES = {
    "wrong_wire_type_after_a": (wrong_wire_type_after_a, set()),
    "group_hides_a": (group_hides_a, {"PERMISSION_DENIED", "INVALID_ARGUMENT"}),
    "overlong_tag": (overlong_tag, {"PERMISSION_DENIED", "INVALID_ARGUMENT"}),
    "overlong_length": (overlong_length, {"PERMISSION_DENIED", "INVALID_ARGUMENT"}),
    "non_utf8_namespace": (non_utf8_namespace, {"PERMISSION_DENIED", "INVALID_ARGUMENT"}),
}
SYNTAX_METHODS = ("RequestCancelWorkflowExecution", "DescribeWorkflowExecution", "StartWorkflowExecution")
# Families whose form naming A only must be accepted and act on A.
FAMILY_CONTROLS = {
    "two_gzip_members": two_members,
    "namespace_twice": field_twice,
    "twice_and_two_members": twice_and_two_members,
    "wrong_wire_type_after_a": wrong_wire_type_after_a,
    "group_after_a": lambda a, other, cls: Wire(h2raw.frame(
        a + group_field(cls.DESCRIPTOR.fields_by_name["namespace"].number, ns_field(cls, NS_B)))),
}


def send(env: Env, config: str, method: Method, wire: Wire) -> h2raw.Reply:
    path = WS + method.name + wire.path_suffix
    if wire.no_slash:
        path = path[1:]
    metadata = (("authorization", f"Bearer {TOKEN_A}"),) if CONFIGS[config][0] else ()
    return h2raw.call(env.gateways[config].address, path, wire.body, metadata=metadata, encoding=wire.encoding,
                      timeout=15, grpc_timeout=method.wait if method.wait else 10)


def single_gzip(message) -> Wire:
    return Wire(h2raw.frame(gz(message.SerializeToString()), compressed=True), "gzip")


# --------------------------------------------------------------------------- the cases


def attack_cases():
    for config in CONFIGS:
        for mname, method in METHODS.items():
            if config == "rewrite" and not method.payloads:
                continue  # no authorization, nothing encrypted: nothing to judge
            for shape in SHAPES:
                yield pytest.param(config, mname, shape, id=f"{config}-{mname}-{shape}")
            if mname in SYNTAX_METHODS:
                for shape in SYNTAX_SHAPES:
                    yield pytest.param(config, mname, shape, id=f"{config}-{mname}-{shape}")


@pytest.mark.parametrize("config,mname,shape", list(attack_cases()))
def test_attack_shape(env, config, mname, shape):
    """The token for A sends a request naming A shaped so that the server would read B; B's
    state, read at the server, is untouched."""
    method = METHODS[mname]
    build, refusals = {**SHAPES, **SYNTAX_SHAPES}[shape]
    if config == "rewrite":
        # No authorization: the request names A (plaintext policy), the shape smuggles B.
        # Whatever the server acted on, B must not hold the marker in plaintext.
        # Each case's marker is its own, so a victim (not an update's: its polled workflow
        # task would be in flight) serves the next case whatever this one did to it.
        t = method.prepare(env, NS_B, reuse="marker" if method.wait is None else "")
        a = method.build(NS_A, t, inner_ns=NS_B).SerializeToString()
        reply = send(env, config, method, build(a, NS_B, method.request_class))
        blob = method.stored(env, t)
        assert t.marker not in blob, f"B HOLDS PLAINTEXT: the server acted on B with what the gateway took for A ({reply})"
        if method.wait is None:
            method.give_back(env, t, "marker")
        return
    t = method.prepare(env, NS_B, reuse="untouched")
    # The request names A but targets B's objects (workflow id, schedule id); for the
    # multi-operation the inner operations name B, as the server requires them to match.
    a = method.build(NS_A, t, inner_ns=NS_B).SerializeToString()
    reply = send(env, config, method, build(a, NS_B, method.request_class))
    method.untouched(env, t, reply)
    method.give_back(env, t, "untouched")
    assert reply.code in refusals or method.acted_on_a(env, t, reply), \
        f"expected a refusal by the gateway ({sorted(refusals)}) or the server acting on A, got {reply}"
    assert TOKEN_A not in reply.grpc_message


@pytest.mark.parametrize("config,mname", [pytest.param(c, m, id=f"{c}-{m}") for c in CONFIGS for m in METHODS])
def test_control_single_gzip_member(env, config, mname):
    """The legitimate request, one gzip member naming A, is accepted and acts on A; in the
    rewrite configuration a payload method naming B lands encrypted in B."""
    method = METHODS[mname]
    t = method.prepare(env, NS_A)
    reply = send(env, config, method, single_gzip(method.build(NS_A, t)))
    method.acted(env, t, reply)
    if method.payloads and CONFIGS[config][1]:
        assert t.marker in method.stored(env, t), "namespace A is exempt from encryption: its marker is plaintext"
    if method.payloads and config == "rewrite":
        t = method.prepare(env, NS_B)
        reply = send(env, config, method, single_gzip(method.build(NS_B, t)))
        method.acted(env, t, reply)
        blob = method.stored(env, t)
        assert t.marker not in blob and ENCRYPTED in blob, "B's payloads were not encrypted"


@pytest.mark.parametrize("config,family", [pytest.param(c, f, id=f"{c}-{f}") for c in CONFIGS for f in FAMILY_CONTROLS])
def test_control_shape_family_naming_a_only(env, config, family):
    """The same wire shape naming A only (two members both A, the field twice as A, a wrong wire
    type or a group after A) is accepted and acts on A."""
    method = METHODS["StartWorkflowExecution" if config == "rewrite" else "RequestCancelWorkflowExecution"]
    t = method.prepare(env, NS_A)
    a = method.build(NS_A, t).SerializeToString()
    reply = send(env, config, method, FAMILY_CONTROLS[family](a, NS_A, method.request_class))
    method.acted(env, t, reply)
    if config == "rewrite":
        assert t.marker in method.stored(env, t), "acted on A: A is exempt from encryption, its marker is plaintext"


def test_multi_operation_inner_namespace(env):
    """Probe: the outer namespace A with inner start/update operations naming B. The dev
    server refuses operations whose namespace differs from the request's; through the gateway
    with the token for A nothing lands in B either way."""
    method = METHODS["ExecuteMultiOperation"]
    direct = method.prepare(env, NS_B)
    with pytest.raises(grpc.RpcError) as info:
        env.admin.ExecuteMultiOperation(method.build(NS_A, direct, inner_ns=NS_B), timeout=UPDATE_WAIT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert b"Operation namespace did not match" in dict(info.value.trailing_metadata()).get("grpc-status-details-bin", b"")
    for ns in (NS_A, NS_B):
        assert describe(env, ns, direct.wid) is None
    for config in ("auth", "both"):
        t = method.prepare(env, NS_B)
        reply = send(env, config, method, single_gzip(method.build(NS_A, t, inner_ns=NS_B)))
        method.untouched(env, t, reply)
        assert reply.code != "OK", reply


# The shapes sent straight to the server (no gateway) as cancellations naming A and targeting
# B's victim: these make the server act on B (Go's gzip reader reads every member; protobuf's
# last field wins; a group where a string is expected is an unknown field and skipped; an
# overlong varint is a varint), so a gateway that forwarded them while deciding A would fail the
# cases above. The others the server refuses or reads as A.
REACH_B_AT_THE_SERVER = {"two_gzip_members", "namespace_twice", "twice_and_two_members", "group_hides_a",
                         "overlong_tag", "overlong_length"}


def test_the_attack_shapes_reach_b_at_the_server(env):
    """The teeth of the suite: which shapes, sent to the server directly, act on B."""
    method = METHODS["RequestCancelWorkflowExecution"]
    reached = set()
    for shape, (build, _) in {**SHAPES, **SYNTAX_SHAPES}.items():
        t = method.prepare(env, NS_B)
        wire = build(method.build(NS_A, t).SerializeToString(), NS_B, method.request_class)
        path = WS + method.name + wire.path_suffix
        reply = h2raw.call(env.server.address, path[1:] if wire.no_slash else path, wire.body, encoding=wire.encoding, timeout=15)
        try:
            method.untouched(env, t, reply)
        except AssertionError:
            reached.add(shape)
    assert reached == REACH_B_AT_THE_SERVER, sorted(reached)
