"""Drop in for real: unmodified Python SDK workers and clients, default options, only the address
changed, run values past the server's limits through a gateway that offloads.

- The gateway advertises the limits it keeps in `DescribeNamespace` (sdk-core workers check
  payloads against them before a request leaves), so a 3 MB activity input and result, a 3 MB
  query answer and a 3 MB signal-with-start need no `disable_payload_error_limit`.
- One workflow task scheduling 60 activities with 150 KB inputs (every payload under the
  threshold, 9 MB together) fits the server's 4 MiB message limit because the gateway offloads
  the largest payloads until it does.
- Judged at the server: its history (read directly, not through the gateway) holds references
  and no plaintext, the bucket only ciphertext.
- With offload off the SDK sees the server's own figures: nothing is promised that is not kept.
  With the advertisement switched off, a default worker fails as it would without the gateway:
  the one test that sets `disable_payload_error_limit`, to show the difference.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import TimeoutError
from temporalio.worker import Worker

import rig
from drop_in_workflows import (MARKER, LargeActivityIO, LargeQueryAnswer, LargeSignal, ManyMediumActivities,
                               digest, echo_digest, length_of, value)
from test_offload import BUCKET, S3Store

KEY = bytes(range(32))
KEY_ID = "k1"
MB = 1_000_000
ACTIVITIES = [echo_digest, length_of]
WORKFLOWS = [LargeActivityIO, ManyMediumActivities, LargeQueryAnswer, LargeSignal]


@pytest.fixture
def store(s3_server):
    return S3Store(s3_server)  # bucket BUCKET ("pgw-test") made by the fixture


def gateway(gateway_factory, upstream: str, store: S3Store | None, **storage) -> rig.Gateway:
    section = store.storage_section() if store else {"enabled": False}
    section.update(storage)
    return rig.encrypting_gateway(gateway_factory, upstream, KEY, "PGW_TEST_DROPIN_KEY", KEY_ID,
                                  extra_env=store.env() if store else {}, storage=section)


async def limits_of(address: str):
    client = await Client.connect(address, namespace="default")
    answer = await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
    return answer.namespace_info.limits


async def raw_history(address: str, wf_id: str) -> bytes:
    direct = await Client.connect(address, namespace="default")
    history = await direct.get_workflow_handle(wf_id).fetch_history()
    return b"".join(e.SerializeToString() for e in history.events), history


def assert_no_plaintext_at_server(temporal_server, store: S3Store, wf_id: str, max_history: int = 1_000_000) -> None:
    raw, history = asyncio.run(raw_history(temporal_server.address, wf_id))
    assert MARKER.encode() not in raw, "plaintext in the server's history"
    assert len(raw) < max_history, f"history is {len(raw)} bytes"
    for name, data in store.objects().items():
        assert MARKER.encode() not in data, f"plaintext in object {name}"
    failed = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert not failed, f"workflow task failed: {failed[0].workflow_task_failed_event_attributes}"


async def with_worker(address: str, body, **worker_options):
    """Runs `body(client, task_queue)` beside a worker with default options."""
    tq = f"dropin-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(address, namespace="default")
    async with Worker(client, task_queue=tq, workflows=WORKFLOWS, activities=ACTIVITIES, **worker_options):
        return await body(client, tq)


def test_limits_are_advertised_for_offloading_namespaces(temporal_server, gateway_factory, store):
    direct = asyncio.run(limits_of(temporal_server.address))
    gw = gateway(gateway_factory, temporal_server.address, store)
    advertised = asyncio.run(limits_of(gw.address))
    # The server's own figures (the dev server states 2 MiB for blobs).
    assert 0 < direct.blob_size_limit_error < 8 * 1024 * 1024, direct
    # The gateway's: its driver's max_payload_size (50 MiB) less the codec margin.
    assert 40 * 1024 * 1024 < advertised.blob_size_limit_error < 50 * 1024 * 1024, advertised
    assert advertised.memo_size_limit_error == advertised.blob_size_limit_error
    assert advertised.workflow_task_completion_size_limit_error >= 200 * 1024 * 1024


def test_3mb_activity_input_and_result_with_default_options(temporal_server, gateway_factory, store):
    gw = gateway(gateway_factory, temporal_server.address, store)
    data = value(3 * MB, "activity-input")
    wf_id = f"di-act-{uuid.uuid4().hex[:6]}"

    async def body(client, tq):
        return await client.execute_workflow(LargeActivityIO.run, args=[data, 3 * MB], id=wf_id, task_queue=tq,
                                             execution_timeout=timedelta(seconds=90))

    result = asyncio.run(with_worker(gw.address, body))
    assert result == {"in_sha": digest(data), "out_sha": digest(value(3 * MB, digest(data))), "out_len": 3 * MB}
    assert_no_plaintext_at_server(temporal_server, store, wf_id)


def test_one_task_scheduling_60_activities_of_150kb_fits(temporal_server, gateway_factory, store):
    gw = gateway(gateway_factory, temporal_server.address, store)
    wf_id = f"di-many-{uuid.uuid4().hex[:6]}"

    async def body(client, tq):
        return await client.execute_workflow(ManyMediumActivities.run, args=[60, 150_000], id=wf_id,
                                             task_queue=tq, execution_timeout=timedelta(seconds=90))

    assert asyncio.run(with_worker(gw.address, body)) == 60 * 150_000
    # What stays inline is kept under the 4 MiB message limit by the fit pass.
    assert_no_plaintext_at_server(temporal_server, store, wf_id, max_history=5 * 1024 * 1024)
    # Each payload was under the threshold: the fit pass offloaded the largest until the
    # completion fit (9 MB of payloads, about 7 MB compressed, against 4 MiB).
    assert len(store.objects()) >= 20, f"{len(store.objects())} objects"


def test_3mb_query_answer_with_default_options(temporal_server, gateway_factory, store):
    gw = gateway(gateway_factory, temporal_server.address, store)
    wf_id = f"di-query-{uuid.uuid4().hex[:6]}"

    async def body(client, tq):
        handle = await client.start_workflow(LargeQueryAnswer.run, 3 * MB, id=wf_id, task_queue=tq,
                                             execution_timeout=timedelta(seconds=90))
        answer = await handle.query(LargeQueryAnswer.state)
        await handle.signal(LargeQueryAnswer.done)
        await handle.result()
        return answer

    answer = asyncio.run(with_worker(gw.address, body))
    assert answer == value(3 * MB, "query")
    assert_no_plaintext_at_server(temporal_server, store, wf_id)


def test_3mb_signal_with_start_with_default_options(temporal_server, gateway_factory, store):
    gw = gateway(gateway_factory, temporal_server.address, store)
    data = value(3 * MB, "signal")
    wf_id = f"di-sws-{uuid.uuid4().hex[:6]}"

    async def body(client, tq):
        handle = await client.start_workflow(LargeSignal.run, id=wf_id, task_queue=tq, start_signal="load",
                                             start_signal_args=[data], execution_timeout=timedelta(seconds=90))
        return await handle.result()

    assert asyncio.run(with_worker(gw.address, body)) == {"sha": digest(data), "len": len(data)}
    assert_no_plaintext_at_server(temporal_server, store, wf_id)


def test_without_offload_the_sdk_sees_the_servers_limits(temporal_server, gateway_factory):
    direct = asyncio.run(limits_of(temporal_server.address))
    gw = gateway(gateway_factory, temporal_server.address, None)
    assert asyncio.run(limits_of(gw.address)) == direct


def test_without_the_advertisement_a_default_worker_fails_for_size(temporal_server, gateway_factory, store):
    """What a default worker does behind a gateway that does not rewrite the limits: it refuses
    the 3 MB value itself (the workflow never completes); with `disable_payload_error_limit` (the
    only test that sets it) the same value goes through the same gateway."""
    gw = gateway(gateway_factory, temporal_server.address, store, server_limits={"advertise": False})
    data = value(3 * MB, "refused")

    async def run(wf_id: str, **worker_options):
        async def body(client, tq):
            return await client.execute_workflow(LargeActivityIO.run, args=[data, 1000], task_queue=tq, id=wf_id,
                                                 execution_timeout=timedelta(seconds=15))
        return await with_worker(gw.address, body, **worker_options)

    async def task_failures(wf_id: str) -> list[str]:
        client = await Client.connect(gw.address, namespace="default")
        history = await client.get_workflow_handle(wf_id).fetch_history()
        return [e.workflow_task_failed_event_attributes.failure.message for e in history.events
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]

    refused_id = f"di-noad-{uuid.uuid4().hex[:6]}"
    with pytest.raises(WorkflowFailureError) as refused:
        asyncio.run(run(refused_id))
    assert isinstance(refused.value.cause, TimeoutError), refused.value.cause
    failures = asyncio.run(task_failures(refused_id))
    assert failures and all("TMPRL1103" in m for m in failures), failures
    passed_id = f"di-noad-{uuid.uuid4().hex[:6]}"
    assert asyncio.run(run(passed_id, disable_payload_error_limit=True))["in_sha"] == digest(data)
