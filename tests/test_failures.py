"""Sealed failures (issue 13): with encryption on, every Failure's message and stack trace leave
the gateway inside an encrypted `encoded_attributes` (the SDKs' `encode_common_attributes`
format) and come back restored.

Histories are read directly from the server (no gateway, no codec); interop runs a Python SDK
configured with the sample encryption codec and `DefaultFailureConverterWithEncodedAttributes`
directly against the server, both ways.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import ENCRYPTED, SdkCodec

KEY = os.urandom(32)


def sealing_gateway(gateway_factory, upstream: str, namespace_overrides: dict | None = None) -> rig.Gateway:
    """A started gateway encrypting with key k1 (from a file); `seal_failures` left at its default
    unless `namespace_overrides` (the `[namespaces.default]` table) says otherwise."""
    gw = gateway_factory(upstream, config={}, start=False, name="gw-seal")
    config = {
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": rig.key_files(gw.workdir, {"k1": KEY})},
        "compression": {"enabled": False},
        "storage": {"enabled": False},
    }
    if namespace_overrides:
        config["namespaces.default"] = namespace_overrides
    gw.configure(config)
    return gw.start()


def sdk_converter() -> tuple[DataConverter, SdkCodec]:
    codec = SdkCodec({"k1": KEY}, active="k1", compress=False)
    converter = dataclasses.replace(DataConverter.default, payload_codec=codec,
                                    failure_converter_class=DefaultFailureConverterWithEncodedAttributes)
    return converter, codec


async def server_history_bytes(server: rig.TemporalServer, workflow_id: str) -> tuple[bytes, list]:
    """The history as the server holds it, read directly with no codec: (raw bytes, events)."""
    client = await Client.connect(server.address)
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return b"".join(e.SerializeToString() for e in history.events), list(history.events)


def failures_in(events) -> list:
    """Every Failure message in the events (cause chains included), found by reflection."""
    out = []

    def walk(message):
        if message.DESCRIPTOR.full_name == "temporal.api.failure.v1.Failure":
            out.append(message)
        for field, value in message.ListFields():
            if field.message_type is None or field.message_type.GetOptions().map_entry:
                continue
            for v in (value if field.is_repeated else [value]):
                walk(v)

    for e in events:
        walk(e)
    return out


def messages_of(err: BaseException) -> list[str]:
    out = []
    while err is not None:
        out.append(getattr(err, "message", str(err)))
        err = err.__cause__
    return out


# ----------------------------------------------------------------------------- workflows


@activity.defn
async def explode(marker: str) -> None:
    raise ApplicationError(f"boom {marker}", non_retryable=True)


@workflow.defn
class ActivityFailsWorkflow:
    @workflow.run
    async def run(self, marker: str) -> None:
        await workflow.execute_activity(explode, marker, start_to_close_timeout=timedelta(seconds=30),
                                        retry_policy=RetryPolicy(maximum_attempts=1))


@workflow.defn
class ChainFailsWorkflow:
    @workflow.run
    async def run(self, marker: str) -> None:
        try:
            try:
                raise ApplicationError(f"root {marker}", type="Root")
            except ApplicationError as root:
                raise ApplicationError(f"middle {marker}", type="Middle") from root
        except ApplicationError as middle:
            raise ApplicationError(f"workflow failed {marker}", type="Top") from middle


async def run_failing(client: Client, worker_client: Client, wf, marker: str, wf_id: str) -> WorkflowFailureError:
    task_queue = f"tq-{wf_id}"
    async with Worker(worker_client, task_queue=task_queue, workflows=[wf], activities=[explode],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        with pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(wf.run, marker, id=wf_id, task_queue=task_queue,
                                          execution_timeout=timedelta(seconds=60))
    return info.value


def assert_sealed_at_server(raw: bytes, events, marker: str) -> None:
    assert marker.encode() not in raw, "the marker reached the server's history in plaintext"
    failures = failures_in(events)
    assert failures, "no failure in the history: the test proved nothing"
    for f in failures:
        assert f.message == "Encoded failure", f.message
        assert f.stack_trace == ""
        assert f.encoded_attributes.metadata["encoding"] == ENCRYPTED


# ----------------------------------------------------------------------------- (a) plain SDK through the gateway


def test_activity_and_workflow_failures_sealed_at_server_and_restored(temporal_server, gateway_factory):
    gw = sealing_gateway(gateway_factory, temporal_server.address)
    tag = uuid.uuid4().hex[:10]
    marker_a, marker_w = f"secret-act-{tag}", f"secret-wf-{tag}"

    async def run():
        client = await Client.connect(gw.address)
        act = await run_failing(client, client, ActivityFailsWorkflow, marker_a, f"seal-act-{tag}")
        chain = await run_failing(client, client, ChainFailsWorkflow, marker_w, f"seal-chain-{tag}")
        return act, chain

    act, chain = asyncio.run(run())
    # The client (through the gateway) gets the original messages back.
    assert isinstance(act.cause, ActivityError)
    assert isinstance(act.cause.cause, ApplicationError)
    assert act.cause.cause.message == f"boom {marker_a}"
    assert messages_of(chain.cause) == [f"workflow failed {marker_w}", f"middle {marker_w}", f"root {marker_w}"]
    assert [type(e).__name__ for e in [chain.cause, chain.cause.__cause__]] == ["ApplicationError"] * 2
    assert chain.cause.type == "Top" and chain.cause.__cause__.__cause__.type == "Root"

    for wf_id, marker in ((f"seal-act-{tag}", marker_a), (f"seal-chain-{tag}", marker_w)):
        raw, events = asyncio.run(server_history_bytes(temporal_server, wf_id))
        assert_sealed_at_server(raw, events, marker)
        assert b"Encoded failure" in raw


# ----------------------------------------------------------------------------- (b) interop with a sealing SDK


def test_sdk_with_encoded_attributes_reads_what_the_gateway_sealed(temporal_server, gateway_factory):
    gw = sealing_gateway(gateway_factory, temporal_server.address)
    tag = uuid.uuid4().hex[:10]
    marker = f"secret-gw2sdk-{tag}"
    wf_id = f"seal-gw2sdk-{tag}"
    converter, codec = sdk_converter()

    async def run():
        via_gateway = await Client.connect(gw.address)
        await run_failing(via_gateway, via_gateway, ChainFailsWorkflow, marker, wf_id)
        direct = await Client.connect(temporal_server.address, data_converter=converter)
        with pytest.raises(WorkflowFailureError) as info:
            await direct.get_workflow_handle(wf_id).result()
        return info.value

    err = asyncio.run(run())
    assert messages_of(err.cause) == [f"workflow failed {marker}", f"middle {marker}", f"root {marker}"]
    assert "k1" in codec.seen_key_ids, "the SDK codec decoded nothing: the test proved nothing"
    raw, events = asyncio.run(server_history_bytes(temporal_server, wf_id))
    assert_sealed_at_server(raw, events, marker)


def test_gateway_client_reads_what_a_sealing_sdk_wrote(temporal_server, gateway_factory):
    gw = sealing_gateway(gateway_factory, temporal_server.address)
    tag = uuid.uuid4().hex[:10]
    marker = f"secret-sdk2gw-{tag}"
    wf_id = f"seal-sdk2gw-{tag}"
    converter, codec = sdk_converter()

    async def run():
        direct = await Client.connect(temporal_server.address, data_converter=converter)
        via_gateway = await Client.connect(gw.address)
        # Worker and starter connected directly with the SDK's own sealing; read back through
        # the gateway with a plain SDK.
        await run_failing(direct, direct, ChainFailsWorkflow, marker, wf_id)
        with pytest.raises(WorkflowFailureError) as info:
            await via_gateway.get_workflow_handle(wf_id).result()
        return info.value

    err = asyncio.run(run())
    assert messages_of(err.cause) == [f"workflow failed {marker}", f"middle {marker}", f"root {marker}"]
    raw, events = asyncio.run(server_history_bytes(temporal_server, wf_id))
    assert_sealed_at_server(raw, events, marker)


# ----------------------------------------------------------------------------- (c) the switch


def test_seal_failures_false_forwards_the_message(temporal_server, gateway_factory):
    gw = sealing_gateway(gateway_factory, temporal_server.address, {"seal_failures": False})
    tag = uuid.uuid4().hex[:10]
    marker = f"visible-{tag}"
    wf_id = f"seal-off-{tag}"

    async def run():
        client = await Client.connect(gw.address)
        return await run_failing(client, client, ChainFailsWorkflow, marker, wf_id)

    err = asyncio.run(run())
    assert messages_of(err.cause)[0] == f"workflow failed {marker}"
    raw, events = asyncio.run(server_history_bytes(temporal_server, wf_id))
    messages = [f.message for f in failures_in(events)]
    assert f"workflow failed {marker}" in messages, messages
    assert "Encoded failure" not in messages
    assert not any(f.HasField("encoded_attributes") for f in failures_in(events))
