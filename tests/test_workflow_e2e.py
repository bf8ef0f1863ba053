"""A Python SDK workflow exercising most features gives the same results through the gateway as direct."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.worker import Worker

from workflows import ACTIVITIES, WORKFLOWS, FailingWorkflow, MainInput, MainWorkflow

BLOB = "".join(f"{i:06d}-payload-gateway;" for i in range(6000))  # ~108 kB of input


async def scenario(address: str, tag: str, ids: list[str] | None = None) -> dict:
    """Client and worker both connected to `address`; returns everything observed. The ids
    of the workflows it started are appended to `ids` when given."""
    client = await Client.connect(address, namespace="default")
    suffix = uuid.uuid4().hex[:10]
    tq = f"tq-{tag}-{suffix}"
    out: dict = {}
    async with Worker(client, task_queue=tq, workflows=WORKFLOWS, activities=ACTIVITIES):
        handle = await client.start_workflow(
            MainWorkflow.run, MainInput(name="Ada", countdown=3, blob=BLOB), id=f"main-{tag}-{suffix}", task_queue=tq)
        if ids is not None:
            ids += [f"main-{tag}-{suffix}", f"fail-{tag}-{suffix}"]
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


def test_workflow_same_results_direct_and_through_gateway(temporal_server, gateway):
    direct = asyncio.run(scenario(temporal_server.address, "direct"))
    # Sanity-check the reference run itself, so a broken server/SDK setup is not "equal by accident".
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
    assert direct["failing_workflow"]["message"] == "workflow failed: because"

    through = asyncio.run(scenario(gateway.address, "gateway"))
    assert through == direct
