"""Workflows and activities the end-to-end tests run, directly and through the gateway.

Everything a workflow returns is deterministic (no ids, no times), so a run against the
server directly and a run through the gateway must produce equal results.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError


# ----------------------------------------------------------------------------- activities


@activity.defn
async def greet(name: str) -> str:
    return f"Hello, {name}!"


@activity.defn
async def checksum(blob: str) -> dict:
    import hashlib

    return {"len": len(blob), "sha256": hashlib.sha256(blob.encode()).hexdigest()}


@activity.defn
async def always_fails(what: str) -> str:
    attempt = activity.info().attempt
    raise ApplicationError(f"{what} failed on attempt {attempt}", {"attempt": attempt}, type="Boom")


ACTIVITIES = [greet, checksum, always_fails]


# ----------------------------------------------------------------------------- workflows


@dataclass
class MainInput:
    name: str
    countdown: int = 3
    blob: str = ""


@workflow.defn
class CountdownWorkflow:
    """Continues as new until n reaches 0; returns the trail of n values seen."""

    @workflow.run
    async def run(self, n: int, trail: list) -> list:
        trail = list(trail) + [n]
        if n <= 0:
            return trail
        await workflow.sleep(timedelta(milliseconds=50))
        workflow.continue_as_new(args=[n - 1, trail])


@workflow.defn
class ChildWorkflow:
    @workflow.run
    async def run(self, x: int) -> dict:
        await workflow.sleep(timedelta(milliseconds=200))
        greeting = await workflow.execute_activity(
            greet, f"child {x}", start_to_close_timeout=timedelta(seconds=30))
        return {"doubled": x * 2, "greeting": greeting}


@workflow.defn
class MainWorkflow:
    def __init__(self) -> None:
        self.added: list[int] = []
        self.label = "initial"
        self.finished = False
        self.events: list[str] = []

    @workflow.run
    async def run(self, inp: MainInput) -> dict:
        result: dict = {}
        self.events.append("started")
        result["greeting"] = await workflow.execute_activity(
            greet, inp.name, start_to_close_timeout=timedelta(seconds=30))
        if inp.blob:
            result["blob"] = await workflow.execute_activity(
                checksum, inp.blob, start_to_close_timeout=timedelta(seconds=30))

        # A failing activity with a bounded retry policy; the failure is caught here.
        try:
            await workflow.execute_activity(
                always_fails, "flaky-op",
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100), backoff_coefficient=1.0,
                                         maximum_attempts=3))
            result["failure"] = None
        except ActivityError as err:
            cause = err.cause
            result["failure"] = {
                "activity_error": str(err),
                "retry_state": str(err.retry_state),
                "cause_type": type(cause).__name__,
                "cause_message": getattr(cause, "message", str(cause)),
                "cause_error_type": getattr(cause, "type", None),
                "cause_details": list(getattr(cause, "details", ()) or ()),
            }
        self.events.append("activity-failure-caught")

        # Timer.
        t0 = workflow.now()
        await workflow.sleep(timedelta(seconds=1))
        result["timer_elapsed_ok"] = (workflow.now() - t0) >= timedelta(seconds=1)
        self.events.append("timer-fired")

        # Child workflows: a plain one and one that continues as new.
        result["child"] = await workflow.execute_child_workflow(
            ChildWorkflow.run, 21, id=f"{workflow.info().workflow_id}-child")
        result["countdown"] = await workflow.execute_child_workflow(
            CountdownWorkflow.run, args=[inp.countdown, []], id=f"{workflow.info().workflow_id}-countdown")
        self.events.append("children-done")

        # Wait for the client's signals.
        await workflow.wait_condition(lambda: self.finished)
        result["added"] = list(self.added)
        result["sum"] = sum(self.added)
        result["label"] = self.label
        result["events"] = list(self.events)
        return result

    @workflow.signal
    def add(self, n: int) -> None:
        self.added.append(n)

    @workflow.signal
    def finish(self) -> None:
        self.finished = True

    @workflow.query
    def state(self) -> dict:
        return {"added": list(self.added), "label": self.label}

    @workflow.update
    def set_label(self, label: str) -> str:
        old = self.label
        self.label = label
        return old

    @set_label.validator
    def _validate_label(self, label: str) -> None:
        if not label:
            raise ValueError("label must not be empty")

    @workflow.update
    async def add_and_wait(self, n: int) -> int:
        self.added.append(n)
        await workflow.sleep(timedelta(milliseconds=100))
        return sum(self.added)


@workflow.defn
class FailingWorkflow:
    """Fails with an application error: the client sees the same failure both ways."""

    @workflow.run
    async def run(self, why: str) -> None:
        raise ApplicationError(f"workflow failed: {why}", why, type="WfBoom", non_retryable=True)


WORKFLOWS = [MainWorkflow, ChildWorkflow, CountdownWorkflow, FailingWorkflow]
