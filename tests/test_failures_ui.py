"""Sealed failures as people read them (issue 13 acceptance: "the Web UI and `temporal workflow
show --codec-endpoint` show the original failure message").

An activity raises `ApplicationError("boom <marker>")` through a gateway with encryption on, so the
workflow fails and the server holds only `message: "Encoded failure"` plus an encrypted
`encoded_attributes` (checked by reading the history directly from the server). Then the real
`temporal` CLI and the real Web UI (headless Chromium), both pointed at the gateway's codec
endpoint, are read for the marker.

What they show (temporal CLI 1.9.1, Web UI 2.54.1), and why nothing more can be shown:
- The codec endpoint decodes the `encoded_attributes` payload to `json/plain`
  `{"message": ..., "stack_trace": ...}`; both clients then render it as data:
  `workflow show --detailed` prints `failure.encodedAttributes.message: boom <marker>`,
  `-o json` holds the decoded json/plain payload, the Web UI's Result panel and the event's
  detail show `"encodedAttributes": {"message": "boom <marker>", "stack_trace": ...}`.
- `Failure.message` itself stays `Encoded failure` where a client prints that field: the CLI's
  "Results: Failure Message:" block and the UI's event-table summary ("Failure Message").
  The remote codec protocol only carries payloads; `message` is a plain string of the history
  the clients fetch from the server, so no codec endpoint can replace it. The clients do not
  copy decoded attributes into `message` (the SDKs' failure converters do that; these tests
  would notice if a client started doing so, because they assert what is shown today).
Without the codec endpoint the marker appears nowhere in the CLI's output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import uuid
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import rig
from sdk_codec import ENCRYPTED
from test_codec_server import require_web_ui_prerequisites
from test_failures import failures_in

KEY = os.urandom(32)
SEALED_MESSAGE = "Encoded failure"

# The marker reaches the activity through this process, not through the workflow input: a decoded
# input shown by the CLI or the UI must not be what makes a test see the marker.
MARKER: dict[str, str] = {}


@activity.defn
async def explode_for_ui() -> None:
    raise ApplicationError(f"boom {MARKER['value']}", non_retryable=True)


@workflow.defn
class UiActivityFailsWorkflow:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(explode_for_ui, start_to_close_timeout=timedelta(seconds=30),
                                        retry_policy=RetryPolicy(maximum_attempts=1))


class SealedRun:
    """What the module fixture made: the server (with UI), the gateway, and the failed workflow."""

    def __init__(self, server: rig.TemporalServerWithUI, gw: rig.Gateway, wf_id: str, run_id: str, marker: str,
                 activity_failed_event_id: int, raw_history: bytes, events: list):
        self.server, self.gw, self.wf_id, self.run_id, self.marker = server, gw, wf_id, run_id, marker
        self.activity_failed_event_id = activity_failed_event_id
        self.raw_history, self.events = raw_history, events

    @property
    def message(self) -> str:
        return f"boom {self.marker}"


async def _fail_through_gateway(gw: rig.Gateway, server: rig.TemporalServer, wf_id: str) -> tuple[str, int, bytes, list]:
    client = await Client.connect(gw.address)
    tq = f"tq-{wf_id}"
    async with Worker(client, task_queue=tq, workflows=[UiActivityFailsWorkflow], activities=[explode_for_ui],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        with pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(UiActivityFailsWorkflow.run, id=wf_id, task_queue=tq,
                                          execution_timeout=timedelta(seconds=30))
    # Through the gateway the SDK got the original message back (restored on the gRPC path).
    assert info.value.cause is not None and info.value.cause.cause is not None
    assert info.value.cause.cause.message == f"boom {MARKER['value']}"
    # The history as the server holds it: no gateway, no codec.
    direct = await Client.connect(server.address)
    handle = direct.get_workflow_handle(wf_id)
    run_id = (await handle.describe()).run_id
    history = await handle.fetch_history()
    events = list(history.events)
    failed = [e.event_id for e in events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED]
    assert len(failed) == 1, events
    return run_id, failed[0], b"".join(e.SerializeToString() for e in events), events


@pytest.fixture(scope="module")
def sealed_run(workdir):
    """A dev server whose Web UI is pointed at a sealing gateway's codec endpoint, and one workflow
    that failed through that gateway because its activity raised `boom <marker>`. Module-scoped:
    the CLI and UI tests read the same run (the whole file stays well under a minute)."""
    # The UI origin must be known before the gateway starts (CORS) and the codec port before the
    # server starts (--ui-codec-endpoint): reserve both, start the server, then the gateway.
    ui_port = rig.free_port()
    gw = rig.Gateway(rig.new_tmpdir(workdir, "ui-fail-gw-"), "127.0.0.1:1", config={}, name="ui-fail-gw",
                     extra_env={"PGW_TEST_UI_KEY": base64.b64encode(KEY).decode()})
    server = rig.TemporalServerWithUI(rig.new_tmpdir(workdir, "temporal-ui-fail-"),
                                      codec_endpoint=f"http://127.0.0.1:{gw.codec_port}", ui_port=ui_port)
    server.start()
    try:
        gw.upstream = server.address
        sections = gw.listener_sections(codec_server=True)
        # The browser cannot send a token to a plain-http endpoint: no auth (loopback only).
        sections["codec_server"]["cors_origins"] = [server.ui_origin]
        gw.configure({
            **sections,
            "encryption": {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_TEST_UI_KEY"}]},
            "compression": {"enabled": False},
            "storage": {"enabled": False},
        })
        gw.start()
        tag = uuid.uuid4().hex[:10]
        MARKER["value"] = f"uimarker{tag}"
        wf_id = f"ui-fail-{tag}"
        run_id, failed_id, raw, events = asyncio.run(_fail_through_gateway(gw, server, wf_id))
        yield SealedRun(server, gw, wf_id, run_id, MARKER["value"], failed_id, raw, events)
        assert "panicked at" not in gw.output(), gw.describe()
    finally:
        gw.stop()
        server.stop()


@pytest.fixture
def run(sealed_run, request) -> SealedRun:
    """The module's run, with its processes' output attached to this test's failure report."""
    request.node._pgw_procs = [p for p in (sealed_run.gw.proc, sealed_run.server.proc) if p is not None]
    return sealed_run


def temporal_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([rig.temporal_bin(), "--color", "never", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def json_payloads(node, path: str = "") -> list[tuple[str, dict]]:
    """(JSON path, payload) of every proto-JSON payload (`metadata` + `data`) in `node`."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and "encoding" in node["metadata"]:
            found.append((path, node))
        for k, v in node.items():
            found += json_payloads(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += json_payloads(v, f"{path}[{i}]")
    return found


def codec_access_log(gw: rig.Gateway) -> list[str]:
    """The gateway's codec endpoint access lines, colour codes removed."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", gw.output())
    return [line for line in plain.splitlines() if "codec request" in line]


def b64d(s: str) -> bytes:
    return base64.b64decode(s or "")


# ----------------------------------------------------------------------------- the server holds no plaintext


def test_failure_is_sealed_at_the_server(run):
    assert run.marker.encode() not in run.raw_history, "the marker reached the server's history in plaintext"
    failures = failures_in(run.events)
    assert len(failures) == 3, failures  # activity failure, workflow failure, its cause
    for f in failures:
        assert f.message == SEALED_MESSAGE and f.stack_trace == "", f
        assert f.encoded_attributes.metadata["encoding"] == ENCRYPTED


# ----------------------------------------------------------------------------- temporal CLI


def test_cli_workflow_show_with_codec_endpoint_shows_original_message(run):
    base = ["workflow", "show", "--workflow-id", run.wf_id, "--namespace", "default", "--address", run.server.address]
    # `{namespace}` is substituted by the CLI: the gateway sees /default/decode.
    codec = ["--codec-endpoint", f"http://127.0.0.1:{run.gw.codec_port}/{{namespace}}"]

    # Without the codec endpoint the marker is nowhere: table, detailed, JSON (payload data included).
    for fmt in ([], ["--detailed"], ["-o", "json"]):
        out = temporal_cli(*base, *fmt)
        assert out.returncode == 0, out.stderr
        assert run.marker not in out.stdout, (fmt, out.stdout[-3000:])
        if fmt == ["-o", "json"]:
            shown = json_payloads(json.loads(out.stdout))
            assert shown and not any(run.marker.encode() in b64d(p.get("data", "")) for _, p in shown)
            assert any(path.endswith("encodedAttributes") for path, _ in shown), shown

    # --detailed with the codec endpoint: the decoded attributes, as the CLI prints payload data.
    detailed = temporal_cli(*base, "--detailed", *codec)
    assert detailed.returncode == 0, detailed.stderr
    lines = detailed.stdout.splitlines()
    print("\n".join(line for line in lines if "failure" in line and "message" in line))
    # ActivityTaskFailed: failure.encodedAttributes; WorkflowExecutionFailed: failure.cause.encodedAttributes.
    assert f"failure.encodedAttributes.message: {run.message}" in lines, detailed.stdout[-4000:]
    assert f"failure.cause.encodedAttributes.message: {run.message}" in lines, detailed.stdout[-4000:]
    assert "failure.encodedAttributes.message: Activity task failed" in lines, detailed.stdout[-4000:]
    assert any(line.startswith("failure.encodedAttributes.stack_trace:") and "_activity.py" in line for line in lines)
    # ... while the field Failure.message is printed as the server holds it.
    assert f"failure.message: {SEALED_MESSAGE}" in lines

    # JSON with the codec endpoint: every encodedAttributes is a json/plain payload of the SDKs' shape.
    as_json = temporal_cli(*base, "-o", "json", *codec)
    assert as_json.returncode == 0, as_json.stderr
    attrs = [(path, p) for path, p in json_payloads(json.loads(as_json.stdout)) if path.endswith("encodedAttributes")]
    assert len(attrs) == 3, attrs
    decoded = {}
    for path, p in attrs:
        assert b64d(p["metadata"]["encoding"]) == b"json/plain", (path, p["metadata"])
        decoded[path] = json.loads(b64d(p["data"]))
        assert set(decoded[path]) == {"message", "stack_trace"}, decoded[path]
    messages = sorted(d["message"] for d in decoded.values())
    assert messages == sorted([run.message, run.message, "Activity task failed"]), decoded

    # The default table view: its "Results" block prints Failure.message, which no codec endpoint
    # can change (documented: this is what `workflow show --codec-endpoint` prints today).
    table = temporal_cli(*base, *codec)
    assert table.returncode == 0, table.stderr
    results = table.stdout[table.stdout.index("Results:"):]
    print(results)
    assert re.search(r"Failure\s*\n\s*Message: Encoded failure\n\s*Cause:\n\s*Message: Encoded failure", results), results
    assert run.marker not in table.stdout

    access = codec_access_log(run.gw)
    assert any("path=/default/decode" in line and "status=200" in line for line in access), access[-5:]


# ----------------------------------------------------------------------------- Web UI


@pytest.mark.timeout(120)
def test_web_ui_shows_original_failure_message(run, tmp_path):
    require_web_ui_prerequisites()
    base = f"{run.server.ui_origin}/namespaces/default/workflows/{run.wf_id}/{run.run_id}"
    decoded_line = f'"message": "{run.message}"'
    chrome = rig.Chromium(tmp_path)
    try:
        chrome.start()
        pages = {
            # The workflow's page: its Result panel holds the closing event's failure.
            "workflow-page": f"{base}/history",
            # The ActivityTaskFailed event's own page (event detail).
            "activity-failed-event": f"{base}/history/events/{run.activity_failed_event_id}",
        }
        seen = {}
        for name, url in pages.items():
            chrome.navigate(url)
            text = [""]

            def shows_marker() -> bool:
                text[0] = chrome.text()
                return decoded_line in text[0]

            try:
                rig.wait_until(shows_marker, 45, interval=0.5, what=f"the decoded failure message on {name}")
            finally:
                shot = chrome.screenshot(tmp_path / f"{name}.png")
                print(f"screenshot: {shot}")
            seen[name] = text[0]
    finally:
        chrome.stop()

    page = seen["workflow-page"]
    # The decoded attributes sit under the sealed message (JSON view of the failure)...
    assert re.search(r'"message": "Encoded failure",\s*"encodedAttributes": \{\s*"message": "' + re.escape(run.message),
                     page), page[-3000:]
    assert '"message": "Activity task failed"' in page
    # ... while the event table's summary column shows Failure.message as the server holds it.
    assert re.search(r"Activity Task Failed\s*Failure Message\s*Encoded failure", page), page[-3000:]
    assert "YmluYXJ5L2VuY3J5cHRlZA" not in page  # no encrypted payload left undecoded
    event = seen["activity-failed-event"]
    assert re.search(r'"encodedAttributes": \{\s*"message": "' + re.escape(run.message) + r'",\s*"stack_trace": "',
                     event), event[-3000:]

    access = codec_access_log(run.gw)
    assert any("method=OPTIONS" in line for line in access), "no CORS preflight: the browser never called the endpoint"
    assert any("method=POST" in line and "path=/decode" in line and "status=200" in line for line in access), access[-5:]
