"""A Python SDK workflow exercising most features gives the same results through the gateway as
direct: with the gateway only forwarding, and with encryption, compression and offload on. With
the codecs on, every history the scenario writes (the main workflow, its child, every run of the
child that continues as new, the failing workflow) is read directly from the server: each payload
there is ciphertext or a reference of the configured driver, no plaintext marker appears, and the
stored objects hold only ciphertext."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.worker import Worker

import rig
from sdk_codec import ENCRYPTED, iter_payloads
from workflows import ACTIVITIES, WORKFLOWS, FailingWorkflow, MainInput, MainWorkflow

BLOB = "".join(f"{i:06d}-payload-gateway;" for i in range(6000))  # ~108 kB of input
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"


async def scenario(address: str, tag: str, ids: list[str] | None = None) -> dict:
    """Client and worker both connected to `address`; returns everything observed. The ids
    of the workflows it started (main, its two children, the failing one) are appended to
    `ids` when given."""
    client = await Client.connect(address, namespace="default")
    suffix = uuid.uuid4().hex[:10]
    tq = f"tq-{tag}-{suffix}"
    out: dict = {}
    async with Worker(client, task_queue=tq, workflows=WORKFLOWS, activities=ACTIVITIES):
        main_id = f"main-{tag}-{suffix}"
        handle = await client.start_workflow(
            MainWorkflow.run, MainInput(name="Ada", countdown=3, blob=BLOB), id=main_id, task_queue=tq)
        if ids is not None:  # the children's ids are the ones MainWorkflow gives them
            ids += [main_id, f"{main_id}-child", f"{main_id}-countdown", f"fail-{tag}-{suffix}"]
        out["query_initial"] = await handle.query(MainWorkflow.state)
        await handle.signal(MainWorkflow.add, 1)
        await handle.signal(MainWorkflow.add, 2)
        out["update_set_label"] = await handle.execute_update(MainWorkflow.set_label, "second")
        try:
            await handle.execute_update(MainWorkflow.set_label, "")
            out["update_rejected"] = None
        except WorkflowUpdateFailedError as err:
            out["update_rejected"] = {"cause": type(err.cause).__name__, "message": getattr(err.cause, "message", str(err.cause))}
        out["update_add_and_wait"] = await handle.execute_update(MainWorkflow.add_and_wait, 4)
        out["query_after"] = await handle.query(MainWorkflow.state)
        await handle.signal(MainWorkflow.finish)
        out["result"] = await asyncio.wait_for(handle.result(), timeout=120)
        desc = await handle.describe()
        out["status"] = desc.status.name if desc.status else None

        try:
            await client.execute_workflow(FailingWorkflow.run, "because", id=f"fail-{tag}-{suffix}", task_queue=tq)
            out["failing_workflow"] = None
        except WorkflowFailureError as err:
            cause = err.cause
            out["failing_workflow"] = {"cause": type(cause).__name__, "message": getattr(cause, "message", None),
                                       "type": getattr(cause, "type", None), "details": list(getattr(cause, "details", ()) or ())}
    return out


async def run_histories(address: str, workflow_id: str) -> list:
    """Every run of `workflow_id` (first to latest) as `address` holds it: the latest run, then
    back along `continued_execution_run_id` of each run's start event."""
    client = await Client.connect(address, namespace="default")
    runs, run_id = [], None
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        runs.append(history)
        run_id = history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
        if not run_id:
            return runs[::-1]
        assert len(runs) < 50, f"{workflow_id}: no first run found"


def check_direct_reference_run(direct: dict) -> None:
    """Sanity-checks the reference run itself, so a broken server/SDK setup is not "equal by accident"."""
    assert direct["status"] == "COMPLETED"
    res = direct["result"]
    assert res["greeting"] == "Hello, Ada!"
    assert res["blob"] == {"len": len(BLOB), "sha256": hashlib.sha256(BLOB.encode()).hexdigest()}
    assert res["failure"]["cause_message"] == "flaky-op failed on attempt 3"
    assert res["failure"]["cause_details"] == [{"attempt": 3}]
    assert res["timer_elapsed_ok"] is True
    assert res["child"] == {"doubled": 42, "greeting": "Hello, child 21!"}
    assert res["countdown"] == [3, 2, 1, 0]
    assert res["added"] == [1, 2, 4] and res["sum"] == 7 and res["label"] == "second"
    assert direct["update_set_label"] == "initial"
    assert direct["update_rejected"]["message"] == "label must not be empty"
    assert direct["update_add_and_wait"] == 7
    assert direct["failing_workflow"] == {"cause": "ApplicationError", "message": "workflow failed: because",
                                          "type": "WfBoom", "details": ["because"]}


@pytest.fixture(scope="module")
def direct_run(temporal_server):
    """The scenario run directly against the server, once per module, in a thread of its own:
    it runs while the first test's gateway run does (each test reads `.result()`)."""
    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(asyncio.run(scenario(temporal_server.address, "direct")))
        except BaseException as exc:  # noqa: BLE001 - handed to the test that reads the result
            done.set_exception(exc)

    thread = threading.Thread(target=run, name="direct-scenario", daemon=True)
    thread.start()
    yield done
    thread.join(timeout=180)


def test_workflow_same_results_direct_and_through_gateway(direct_run, gateway):
    through = asyncio.run(scenario(gateway.address, "gateway"))
    direct = direct_run.result(timeout=180)
    check_direct_reference_run(direct)
    assert through == direct


# ----------------------------------------------------------------------------- codecs on

KEY = os.urandom(32)
OFFLOAD_THRESHOLD = 128  # bytes after compression and encryption: most payloads here, not the smallest
# Plaintext that only payloads carry (failure messages are not payloads: not listed).
MARKERS = [BLOB[:40].encode(), b"Hello, Ada", b"Hello, child", b'"doubled"', b'"second"', b'"label"', b'"countdown"']


def classify_stored_payloads(history, driver: str, root: Path) -> tuple[int, int]:
    """Checks every payload of `history` as the server holds it: `binary/encrypted`, or a
    reference of `driver` whose object under `root` exists and is ciphertext. Returns
    (encrypted, references)."""
    encrypted = references = 0
    for event in history.events:
        for path, p in iter_payloads(event):
            where = f"event {event.event_id} ({event.event_type}) {path}"
            if p.metadata.get("encoding") == ENCRYPTED:
                assert p.metadata.get("encryption-key-id") == b"k1", where
                encrypted += 1
                continue
            assert p.metadata.get("messageType") == REF_TYPE and p.metadata.get("encoding") == b"json/protobuf", \
                f"{where} reached the server as neither ciphertext nor a reference: {dict(p.metadata)} {p.data[:80]!r}"
            ref = json.loads(p.data)
            assert set(ref) == {"claimData", "driverName"} and ref["driverName"] == driver, f"{where}: {ref}"
            assert len(p.external_payloads) == 1 and p.external_payloads[0].size_bytes >= OFFLOAD_THRESHOLD, where
            claim = ref["claimData"]
            assert set(claim) == {"key", "hash_algorithm", "hash_value"} and claim["hash_algorithm"] == "sha256", where
            stored = root / claim["key"]
            assert stored.resolve().is_relative_to(root.resolve()) and stored.is_file(), f"{where}: no object {stored}"
            data = stored.read_bytes()
            assert hashlib.sha256(data).hexdigest() == claim["hash_value"], f"{where}: {stored} does not match its claim"
            stored_payload = Payload.FromString(data)
            assert stored_payload.metadata.get("encoding") == ENCRYPTED, f"{stored} is not ciphertext: {dict(stored_payload.metadata)}"
            for marker in MARKERS:
                assert marker not in data, f"plaintext {marker!r} in stored object {stored}"
            references += 1
    return encrypted, references


def test_workflow_same_results_with_encryption_compression_and_offload(direct_run, temporal_server, gateway_factory):
    gw = gateway_factory(temporal_server.address, config={}, start=False, name="gw-e2e-codecs")
    root = gw.workdir / "payloads"
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": rig.key_files(gw.workdir, {"k1": KEY})},
        "compression": {"enabled": True, "min_size": 64},
        "storage": {"enabled": True, "driver": "local", "threshold": OFFLOAD_THRESHOLD,
                    "drivers": [{"name": "local", "kind": "filesystem", "root": str(root)}]},
    }).start()
    ids: list[str] = []
    through = asyncio.run(scenario(gw.address, "codecs", ids=ids))
    direct = direct_run.result(timeout=180)
    check_direct_reference_run(direct)
    assert through == direct

    main_id, child_id, countdown_id, fail_id = ids
    histories = {wf_id: asyncio.run(run_histories(temporal_server.address, wf_id)) for wf_id in ids}
    assert len(histories[countdown_id]) == 4, "the countdown child continues as new three times: four runs"
    assert all(len(runs) == 1 for wf_id, runs in histories.items() if wf_id != countdown_id)
    totals = {"encrypted": 0, "references": 0}
    for wf_id, runs in histories.items():
        for n, history in enumerate(runs):
            encrypted, references = classify_stored_payloads(history, "local", root)
            assert encrypted + references > 0, f"{wf_id} run {n}: no payloads at all"
            totals["encrypted"] += encrypted
            totals["references"] += references
            raw = b"".join(e.SerializeToString() for e in history.events)
            for marker in MARKERS:
                assert marker not in raw, f"plaintext {marker!r} in the server's history of {wf_id} run {n}"
    # Both kinds are exercised: offloaded payloads and small ones kept inline as ciphertext.
    assert totals["encrypted"] > 0 and totals["references"] > 0, totals
    # The markers really are in what the SDK sent and received (so their absence means something).
    plain = json.dumps(through).encode()
    for marker in (b"Hello, Ada", b"Hello, child", b'"doubled"', b'"second"', b'"label"', b'"countdown"'):
        assert marker in plain, marker
