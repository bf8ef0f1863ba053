"""Long polls lasting more than 60 s are not cut by the gateway."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.enums.v1 import event_type_pb2
from temporalio.api.taskqueue.v1 import message_pb2 as tq
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr
from temporalio.api.workflowservice.v1 import service_pb2_grpc

import rig

HOLD = 70  # seconds before the awaited event happens


@pytest.fixture
def patient_server(workdir, request):
    """A dev server whose long polls last up to 3 minutes (defaults: 60 s matching, 20 s history)."""
    server = rig.TemporalServer(rig.new_tmpdir(workdir, "temporal-longpoll-"), name="temporal-longpoll",
                                dynamic_config={"matching.longPollExpirationInterval": '"180s"',
                                                "history.longPollExpirationInterval": '"180s"'}).start()
    request.node._pgw_procs = [server.proc]
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_long_polls_over_60s_survive_the_gateway(patient_server, gateway_factory):
    gw = gateway_factory(patient_server.address)
    queue = f"tq-long-{uuid.uuid4().hex[:8]}"
    results: dict = {}

    # A workflow whose history we long-poll for its next event.
    watched_id = f"watched-{uuid.uuid4().hex[:8]}"
    with rig.channel(patient_server.address) as ch:
        direct = service_pb2_grpc.WorkflowServiceStub(ch)
        watched_run = direct.StartWorkflowExecution(wsr.StartWorkflowExecutionRequest(
            namespace="default", workflow_id=watched_id, workflow_type=common.WorkflowType(name="Watched"),
            task_queue=tq.TaskQueue(name=f"tq-none-{uuid.uuid4().hex[:6]}"), request_id=str(uuid.uuid4())), timeout=10).run_id
        first_page = direct.GetWorkflowExecutionHistory(wsr.GetWorkflowExecutionHistoryRequest(
            namespace="default", execution=common.WorkflowExecution(workflow_id=watched_id, run_id=watched_run)), timeout=10)
    seen_events = len(first_page.history.events)

    def poll_task():
        t0 = time.monotonic()
        try:
            with rig.channel(gw.address) as ch:
                resp = service_pb2_grpc.WorkflowServiceStub(ch).PollWorkflowTaskQueue(
                    wsr.PollWorkflowTaskQueueRequest(namespace="default", task_queue=tq.TaskQueue(name=queue), identity="long-poller"),
                    timeout=170)
            results["poll"] = ("ok", time.monotonic() - t0, resp.workflow_execution.workflow_id)
        except grpc.RpcError as err:
            results["poll"] = ("error", time.monotonic() - t0, f"{err.code()}: {err.details()}")

    def wait_history():
        t0 = time.monotonic()
        events = []
        token = first_page.next_page_token
        try:
            with rig.channel(gw.address) as ch:
                stub = service_pb2_grpc.WorkflowServiceStub(ch)
                # Keep waiting (as SDKs do) until a new event shows up; an early empty answer is fine, an error is not.
                while not events and time.monotonic() - t0 < 170:
                    resp = stub.GetWorkflowExecutionHistory(wsr.GetWorkflowExecutionHistoryRequest(
                        namespace="default", execution=common.WorkflowExecution(workflow_id=watched_id, run_id=watched_run),
                        wait_new_event=True, next_page_token=token), timeout=170)
                    events = [e for e in resp.history.events if e.event_id > seen_events]
                    token = resp.next_page_token or token
                    if not events:
                        results.setdefault("history_empty_returns", []).append(round(time.monotonic() - t0, 1))
            results["history"] = ("ok", time.monotonic() - t0, [e.event_type for e in events])
        except grpc.RpcError as err:
            results["history"] = ("error", time.monotonic() - t0, f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=poll_task), threading.Thread(target=wait_history)]
    for t in threads:
        t.start()
    time.sleep(HOLD)
    assert "poll" not in results and "history" not in results, f"a long poll ended before anything happened: {results}"

    target_id = f"long-target-{uuid.uuid4().hex[:8]}"
    with rig.channel(patient_server.address) as ch:
        direct = service_pb2_grpc.WorkflowServiceStub(ch)
        direct.StartWorkflowExecution(wsr.StartWorkflowExecutionRequest(
            namespace="default", workflow_id=target_id, workflow_type=common.WorkflowType(name="LongTarget"),
            task_queue=tq.TaskQueue(name=queue), request_id=str(uuid.uuid4())), timeout=10)
        direct.SignalWorkflowExecution(wsr.SignalWorkflowExecutionRequest(
            namespace="default", workflow_execution=common.WorkflowExecution(workflow_id=watched_id),
            signal_name="wake", request_id=str(uuid.uuid4())), timeout=10)
    for t in threads:
        t.join(timeout=60)
    assert results.get("poll", (None,))[0] == "ok", results
    status, took, wid = results["poll"]
    assert wid == target_id, results
    assert took >= HOLD, results
    status, took, event_types = results["history"]
    assert status == "ok", results
    assert event_type_pb2.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED in event_types, results
    assert took >= HOLD, results
