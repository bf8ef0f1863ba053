"""Raw WorkflowService calls for tests that put exact payloads on the wire (forged references,
hand-made ciphertext) and read a history as the address answers it, with no SDK data converter
in between."""

from __future__ import annotations

import uuid

from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution, WorkflowType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryRequest, StartWorkflowExecutionRequest
from temporalio.client import Client


async def start_raw(address: str, wf_id: str, payload: Payload) -> None:
    """Starts workflow `wf_id` (type `Nobody`, on a task queue nobody polls) with `payload` as
    its only input, exactly as given."""
    client = await Client.connect(address, namespace="default")
    await client.workflow_service.start_workflow_execution(StartWorkflowExecutionRequest(
        namespace="default", workflow_id=wf_id, workflow_type=WorkflowType(name="Nobody"),
        task_queue=TaskQueue(name=f"none-{uuid.uuid4().hex[:6]}"), input=Payloads(payloads=[payload]),
        request_id=str(uuid.uuid4())))


async def history_raw(address: str, wf_id: str):
    """The history of `wf_id` as `address` returns it."""
    client = await Client.connect(address, namespace="default")
    return await client.workflow_service.get_workflow_execution_history(GetWorkflowExecutionHistoryRequest(
        namespace="default", execution=WorkflowExecution(workflow_id=wf_id)))
