"""Protected search attributes (issue 26): searchable through the gateway, never readable at the
server.

A gateway protects the Keyword attribute `CustomerEmail`. Workflows are started and upserted
with it through the gateway by the Python SDK (defaults); the test then reads what the server
holds directly (visibility and history: no plaintext e-mail anywhere), queries through the
gateway with `=`, `!=` and `IN` (exactly the right workflows), the same plaintext query directly
at the server (nothing), the CLI's `workflow list --query` through the gateway, describe and the
workflow's own typed search attributes through the gateway (the originals), `STARTS_WITH`
(refused, naming the attribute), a key rotation by SIGHUP (old and new workflows both found),
and a non-Keyword attribute (refused at start, naming attribute and type).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from datetime import timedelta

from temporalio.client import (Client, Schedule, ScheduleActionStartWorkflow, ScheduleIntervalSpec, ScheduleSpec,
                               ScheduleState, WithStartWorkflowOperation)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig

ATTRIBUTE = "CustomerEmail"
EMAIL = SearchAttributeKey.for_keyword(ATTRIBUTE)
INT_ATTRIBUTE = "PgwCustomerTier"
LIST_ATTRIBUTE = "PgwCustomerAliases"
ALIASES = SearchAttributeKey.for_keyword_list(LIST_ATTRIBUTE)
KEYS = {"k1": os.urandom(32), "k2": os.urandom(32)}


@workflow.defn
class CustomerWorkflow:
    """Upserts `CustomerEmail` when given one, then waits for `finish`; reports what the SDK's
    typed search attributes hold."""

    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self, upsert: str) -> str:
        if upsert:
            workflow.upsert_search_attributes([EMAIL.value_set(upsert)])
        await workflow.wait_condition(lambda: self.done)
        return workflow.info().typed_search_attributes.get(EMAIL) or ""

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def seen(self) -> str:
        return workflow.info().typed_search_attributes.get(EMAIL) or ""

    @workflow.update
    def email(self) -> str:
        return workflow.info().typed_search_attributes.get(EMAIL) or ""


@workflow.defn
class LeafWorkflow:
    @workflow.run
    async def run(self) -> str:
        return workflow.info().typed_search_attributes.get(EMAIL) or ""


@workflow.defn
class FamilyWorkflow:
    """Starts a child with `child_email`, then continues as new with `next_email`; the continued
    run returns what its typed search attributes hold."""

    @workflow.run
    async def run(self, child_id: str, child_email: str, next_email: str) -> str:
        if not child_id:
            return workflow.info().typed_search_attributes.get(EMAIL) or ""
        got = await workflow.execute_child_workflow(
            LeafWorkflow.run, id=child_id,
            search_attributes=TypedSearchAttributes([SearchAttributePair(EMAIL, child_email)]))
        if got != child_email:
            raise ApplicationError(f"child saw {got!r}")
        workflow.continue_as_new(args=["", "", ""],
                                 search_attributes=TypedSearchAttributes([SearchAttributePair(EMAIL, next_email)]))


async def register(address: str) -> None:
    client = await Client.connect(address)
    for name, ty in ((ATTRIBUTE, IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD),
                     (INT_ATTRIBUTE, IndexedValueType.INDEXED_VALUE_TYPE_INT),
                     (LIST_ATTRIBUTE, IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST)):
        try:
            await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
                namespace="default", search_attributes={name: ty}))
        except RPCError as err:
            if err.status != RPCStatusCode.ALREADY_EXISTS:
                raise


@pytest.fixture
def server(temporal_server):
    asyncio.run(register(temporal_server.address))
    return temporal_server


def protecting_gateway(gateway_factory, upstream: str, active: str = "k1", protect=(ATTRIBUTE,)) -> rig.Gateway:
    gw = gateway_factory(upstream, config={}, start=False, name=f"gw-sa-{active}")
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": active,
                       "keys": rig.key_files(gw.workdir, KEYS)},
        "storage": {"enabled": False},
        "search_attributes": {"protect": list(protect)},
    })
    return gw.start()


async def wait_for(query, want: set[str], client: Client, timeout: float = 20.0) -> set[str]:
    """The workflow ids `query` lists once they are `want` (visibility is eventually consistent)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {w.id async for w in client.list_workflows(query)}
        if found == want or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


def no_plaintext(blob: bytes, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret.encode() not in blob, f"plaintext {secret!r} found at the server"


def test_protected_attribute_is_searchable_through_the_gateway_and_opaque_at_the_server(server, gateway_factory):
    gw = protecting_gateway(gateway_factory, server.address)
    tag = uuid.uuid4().hex[:8]
    e1, e2, e3 = (f"{name}-{tag}@example.com" for name in ("alice", "bob", "carol"))
    ids = {name: f"sa-{tag}-{name}" for name in ("a1", "a2", "b", "c")}
    scope = f'WorkflowId STARTS_WITH "sa-{tag}-"'

    async def run():
        client = await Client.connect(gw.address)
        direct = await Client.connect(server.address)
        task_queue = f"tq-sa-{tag}"
        async with Worker(client, task_queue=task_queue, workflows=[CustomerWorkflow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            handles = {}
            for name, email in (("a1", e1), ("a2", e1), ("b", e2)):
                handles[name] = await client.start_workflow(
                    CustomerWorkflow.run, "", id=ids[name], task_queue=task_queue,
                    search_attributes=TypedSearchAttributes([SearchAttributePair(EMAIL, email)]))
            # c starts without the attribute and upserts it from workflow code.
            handles["c"] = await client.start_workflow(CustomerWorkflow.run, e3, id=ids["c"], task_queue=task_queue)
            seen = {}
            for name, h in handles.items():
                deadline = time.monotonic() + 20
                while not (seen.get(name)) and time.monotonic() < deadline:
                    seen[name] = await h.query(CustomerWorkflow.seen)
                    await asyncio.sleep(0.1)
            out = {"seen": seen}
            out["eq"] = await wait_for(f'{ATTRIBUTE} = "{e1}"', {ids["a1"], ids["a2"]}, client)
            out["count_eq"] = (await client.count_workflows(f'{ATTRIBUTE} = "{e1}"')).count
            out["ne"] = await wait_for(f'{scope} AND {ATTRIBUTE} != "{e1}"', {ids["b"], ids["c"]}, client)
            out["in"] = await wait_for(f"{ATTRIBUTE} IN ('{e2}', '{e3}')", {ids["b"], ids["c"]}, client)
            out["count_in"] = (await client.count_workflows(f"{ATTRIBUTE} IN ('{e2}', '{e3}')")).count
            out["direct_eq"] = {w.id async for w in direct.list_workflows(f'{ATTRIBUTE} = "{e1}"')}
            out["direct_in"] = (await direct.count_workflows(f"{ATTRIBUTE} IN ('{e1}', '{e2}', '{e3}')")).count
            described = await handles["a1"].describe()
            out["described"] = described.typed_search_attributes.get(EMAIL)
            out["listed"] = {w.id: w.typed_search_attributes.get(EMAIL) async for w in client.list_workflows(scope)}
            # What the server holds, read around the gateway.
            listed_raw = [w async for w in direct.list_workflows(scope)]
            out["server_listed"] = {w.id: w.raw_info.search_attributes.SerializeToString() for w in listed_raw}
            # The protected attribute alone: the rest of a listing's attributes (the server's own,
            # such as the build ids a completed workflow task adds) changes with progress.
            out["server_tokens"] = {
                w.id: w.raw_info.search_attributes.indexed_fields[ATTRIBUTE].SerializeToString()
                for w in listed_raw if ATTRIBUTE in w.raw_info.search_attributes.indexed_fields}
            out["server_described"] = {
                name: (await direct.get_workflow_handle(ids[name]).describe()).raw_description.SerializeToString()
                for name in ids}
            with pytest.raises(RPCError) as refused:
                [w async for w in client.list_workflows(f'{ATTRIBUTE} STARTS_WITH "alice"')]
            out["refused"] = refused.value
            cli = subprocess.run(
                [rig.temporal_bin(), "workflow", "list", "--address", gw.address, "--namespace", "default",
                 "--query", f'{ATTRIBUTE} = "{e2}"', "--output", "json"],
                capture_output=True, text=True, timeout=60)
            out["cli"] = cli
            for h in handles.values():
                await h.signal(CustomerWorkflow.finish)
            out["results"] = {name: await h.result() for name, h in handles.items()}
            out["histories"] = {name: (await direct.get_workflow_handle(ids[name]).fetch_history()).to_json()
                                for name in ids}
            return out

    out = asyncio.run(run())
    # The SDK's typed search attributes (from the history, through the gateway) are the originals.
    assert out["seen"] == {"a1": e1, "a2": e1, "b": e2, "c": e3}
    assert out["results"] == {"a1": e1, "a2": e1, "b": e2, "c": e3}
    # Queries through the gateway find exactly the right workflows.
    assert out["eq"] == {ids["a1"], ids["a2"]}
    assert out["count_eq"] == 2
    assert out["ne"] == {ids["b"], ids["c"]}
    assert out["in"] == {ids["b"], ids["c"]}
    assert out["count_in"] == 2
    # The same plaintext query directly at the server finds nothing.
    assert out["direct_eq"] == set()
    assert out["direct_in"] == 0
    # Describe and list through the gateway show the originals.
    assert out["described"] == e1
    assert out["listed"] == {ids["a1"]: e1, ids["a2"]: e1, ids["b"]: e2, ids["c"]: e3}
    # At the server: tokens, never the e-mail (visibility, describe, history).
    secrets = [e1, e2, e3, "example.com"]
    assert set(out["server_listed"]) == set(ids.values())
    for blob in out["server_listed"].values():
        no_plaintext(blob, secrets)
        assert b"pgw1:k1:" in blob
    for blob in out["server_described"].values():
        no_plaintext(blob, secrets)
    for name, history in out["histories"].items():
        no_plaintext(history.encode(), secrets)
    assert "upsertWorkflowSearchAttributesEventAttributes" in out["histories"]["c"]
    # Equal values give equal tokens (that is what lets the server match them).
    assert out["server_tokens"][ids["a1"]] == out["server_tokens"][ids["a2"]]
    assert out["server_tokens"][ids["a1"]] != out["server_tokens"][ids["b"]]
    assert b"pgw1:k1:" in out["server_tokens"][ids["a1"]]
    # STARTS_WITH is refused, naming the attribute.
    assert out["refused"].status == RPCStatusCode.INVALID_ARGUMENT
    assert ATTRIBUTE in out["refused"].message and "STARTS_WITH" in out["refused"].message
    # The CLI through the gateway.
    assert out["cli"].returncode == 0, out["cli"].stderr
    listed = out["cli"].stdout
    assert ids["b"] in listed and ids["a1"] not in listed and ids["c"] not in listed, listed


def test_key_rotation_by_sighup_keeps_old_and_new_workflows_findable(server, gateway_factory):
    gw = protecting_gateway(gateway_factory, server.address, active="k1")
    tag = uuid.uuid4().hex[:8]
    email = f"dave-{tag}@example.com"

    async def run():
        client = await Client.connect(gw.address)
        direct = await Client.connect(server.address)
        task_queue = f"tq-sa-rot-{tag}"
        sa = TypedSearchAttributes([SearchAttributePair(EMAIL, email)])
        async with Worker(client, task_queue=task_queue, workflows=[CustomerWorkflow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            old = await client.start_workflow(CustomerWorkflow.run, "", id=f"sa-rot-{tag}-old",
                                              task_queue=task_queue, search_attributes=sa)
            gw.config["encryption"]["active_key"] = "k2"
            gw.configure()
            os.kill(gw.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "keys reloaded" not in gw.output() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            new = await client.start_workflow(CustomerWorkflow.run, "", id=f"sa-rot-{tag}-new",
                                              task_queue=task_queue, search_attributes=sa)
            found = await wait_for(f'{ATTRIBUTE} = "{email}"', {old.id, new.id}, client)
            count = (await client.count_workflows(f'{ATTRIBUTE} = "{email}"')).count
            described = [(await h.describe()).typed_search_attributes.get(EMAIL) for h in (old, new)]
            at_server = [(await direct.get_workflow_handle(h.id).describe()).raw_description.SerializeToString()
                         for h in (old, new)]
            for h in (old, new):
                await h.signal(CustomerWorkflow.finish)
                await h.result()
            return old.id, new.id, found, count, described, at_server

    old_id, new_id, found, count, described, at_server = asyncio.run(run())
    assert "keys reloaded" in gw.output(), gw.output()[-2000:]
    assert found == {old_id, new_id}
    assert count == 2
    assert described == [email, email]
    assert b"pgw1:k1:" in at_server[0] and b"pgw1:k2:" in at_server[1]
    for blob in at_server:
        no_plaintext(blob, [email])


def test_only_keyword_attributes_can_be_protected(server, workdir):
    gw_dir = rig.new_tmpdir(workdir, "gw-sa-int-")
    keys = rig.key_files(gw_dir, {"k1": KEYS["k1"]})
    config = rig.render_toml({
        "proxy": {"listen": f"127.0.0.1:{rig.free_port()}", "upstream": server.address},
        "admin": {"enabled": False},
        "encryption": {"enabled": True, "active_key": "k1", "keys": keys},
        "search_attributes": {"protect": [ATTRIBUTE, INT_ATTRIBUTE]},
    })
    done = rig.run_gateway_once(config, gw_dir, timeout=20)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert INT_ATTRIBUTE in done.stderr and "Int" in done.stderr, done.stderr


def test_unparseable_query_is_refused_not_forwarded(server, gateway_factory):
    gw = protecting_gateway(gateway_factory, server.address)

    async def run():
        client = await Client.connect(gw.address)
        with pytest.raises(RPCError) as refused:
            await client.count_workflows(f'{ATTRIBUTE} = "x" AND (')
        return refused.value

    err = asyncio.run(run())
    assert err.status == RPCStatusCode.INVALID_ARGUMENT
    assert "does not parse" in err.message


def test_every_write_path_carries_tokens(server, gateway_factory):
    """Signal-with-start, update-with-start (ExecuteMultiOperation), a child workflow command, a
    continue-as-new command and a schedule (its own attributes and its action's) all reach the
    server as tokens and read back as the originals."""
    gw = protecting_gateway(gateway_factory, server.address)
    tag = uuid.uuid4().hex[:8]
    emails = {name: f"{name}-{tag}@example.com" for name in ("sws", "uws", "child", "next", "sched", "schedown")}
    ids = {"sws": f"sa-{tag}-sws", "uws": f"sa-{tag}-uws", "family": f"sa-{tag}-family",
           "child": f"sa-{tag}-child"}
    sched_id = f"sa-{tag}-sched"

    def typed(name):
        return TypedSearchAttributes([SearchAttributePair(EMAIL, emails[name])])

    async def run():
        client = await Client.connect(gw.address)
        direct = await Client.connect(server.address)
        task_queue = f"tq-sa-paths-{tag}"
        out = {}
        async with Worker(client, task_queue=task_queue, workflows=[CustomerWorkflow, LeafWorkflow, FamilyWorkflow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            sws = await client.start_workflow(CustomerWorkflow.run, "", id=ids["sws"], task_queue=task_queue,
                                              start_signal="finish", search_attributes=typed("sws"))
            out["sws"] = await sws.result()
            op = WithStartWorkflowOperation(CustomerWorkflow.run, "", id=ids["uws"], task_queue=task_queue,
                                            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                                            search_attributes=typed("uws"))
            out["uws"] = await client.execute_update_with_start_workflow(CustomerWorkflow.email,
                                                                         start_workflow_operation=op)
            await (await op.workflow_handle()).signal(CustomerWorkflow.finish)
            family = await client.start_workflow(FamilyWorkflow.run, args=[ids["child"], emails["child"], emails["next"]],
                                                 id=ids["family"], task_queue=task_queue)
            out["next"] = await family.result()
            sched = await client.create_schedule(sched_id, Schedule(
                action=ScheduleActionStartWorkflow(LeafWorkflow.run, id=f"sa-{tag}-scheduled", task_queue=task_queue,
                                                   typed_search_attributes=typed("sched")),
                spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(hours=1))]),
                state=ScheduleState(paused=True)), search_attributes=typed("schedown"))
            desc = await sched.describe()
            out["sched_action"] = desc.schedule.action.typed_search_attributes.get(EMAIL)
            out["sched_own"] = desc.typed_search_attributes.get(EMAIL)
            out["sched_server"] = (await direct.get_schedule_handle(sched_id).describe()).raw_description.SerializeToString()
            await sched.trigger()
            for name in ("sws", "uws", "child", "next", "sched"):
                want = None if name == "sched" else ids.get(name, ids["family"])
                deadline = time.monotonic() + 20
                while True:
                    found = {w.id async for w in client.list_workflows(f'{ATTRIBUTE} = "{emails[name]}"')}
                    if (found and want is None) or found == {want} or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.3)
                out[f"found_{name}"] = found
            scheduled = next(iter(out["found_sched"]), None)
            out["scheduled_result"] = await client.get_workflow_handle(scheduled).result() if scheduled else None
            await sched.delete()
            scope = f'WorkflowId STARTS_WITH "sa-{tag}-"'
            out["server"] = [w.raw_info.SerializeToString() async for w in direct.list_workflows(scope)]
            out["histories"] = [(await direct.get_workflow_handle(w.id, run_id=w.run_id).fetch_history()).to_json()
                                async for w in direct.list_workflows(scope)]
        return out

    out = asyncio.run(run())
    assert out["sws"] == emails["sws"]
    assert out["uws"] == emails["uws"]
    assert out["next"] == emails["next"]
    assert out["sched_action"] == emails["sched"] and out["sched_own"] == emails["schedown"]
    assert out["found_sws"] == {ids["sws"]}
    assert out["found_uws"] == {ids["uws"]}
    assert out["found_child"] == {ids["child"]}
    assert out["found_next"] == {ids["family"]}
    assert len(out["found_sched"]) == 1 and next(iter(out["found_sched"])).startswith(f"sa-{tag}-scheduled")
    assert out["scheduled_result"] == emails["sched"]
    secrets = list(emails.values()) + ["example.com"]
    no_plaintext(out["sched_server"], secrets)
    assert len(out["server"]) >= 6, len(out["server"])  # sws, uws, family (2 runs), child, scheduled
    for blob in out["server"]:
        no_plaintext(blob, secrets)
    for history in out["histories"]:
        no_plaintext(history.encode(), secrets)


def test_keyword_list_values_are_tokenized_element_by_element(server, gateway_factory):
    gw = protecting_gateway(gateway_factory, server.address, protect=(ATTRIBUTE, LIST_ATTRIBUTE))
    tag = uuid.uuid4().hex[:8]
    aliases = [f"erin-{tag}@example.com", f"erin.work-{tag}@example.com"]

    async def run():
        client = await Client.connect(gw.address)
        direct = await Client.connect(server.address)
        task_queue = f"tq-sa-list-{tag}"
        async with Worker(client, task_queue=task_queue, workflows=[CustomerWorkflow],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            h = await client.start_workflow(CustomerWorkflow.run, "", id=f"sa-{tag}-list", task_queue=task_queue,
                                            search_attributes=TypedSearchAttributes([SearchAttributePair(ALIASES, aliases)]))
            found = await wait_for(f'{LIST_ATTRIBUTE} = "{aliases[1]}"', {h.id}, client)
            described = (await h.describe()).typed_search_attributes.get(ALIASES)
            at_server = (await direct.get_workflow_handle(h.id).describe()).raw_description.SerializeToString()
            direct_found = {w.id async for w in direct.list_workflows(f'{LIST_ATTRIBUTE} = "{aliases[1]}"')}
            await h.signal(CustomerWorkflow.finish)
            await h.result()
            return h.id, found, described, at_server, direct_found

    wf_id, found, described, at_server, direct_found = asyncio.run(run())
    assert found == {wf_id}
    assert described == aliases
    assert direct_found == set()
    no_plaintext(at_server, aliases + ["example.com"])
    assert at_server.count(b"pgw1:k1:") == 2


def test_protection_without_a_static_key_refuses_to_start(server, workdir):
    gw_dir = rig.new_tmpdir(workdir, "gw-sa-nokey-")
    config = rig.render_toml({
        "proxy": {"listen": f"127.0.0.1:{rig.free_port()}", "upstream": server.address},
        "admin": {"enabled": False},
        "encryption": {"enabled": False},
        "compression": {"enabled": True},
        "search_attributes": {"protect": [ATTRIBUTE]},
    })
    done = rig.run_gateway_once(config, gw_dir, timeout=20)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "search_attributes.protect" in done.stderr and "static encryption key" in done.stderr, done.stderr
