"""Load engine for the soak and fault tests (tests/test_reliability.py; entry: scripts/soak.sh).

Workflows carry a blob (sizes drawn log-uniformly from 1 B to 20 MB) as input; an activity
echoes it and the workflow returns the echo, so every blob crosses the gateway four times
(start input, activity input, activity result, workflow result) and is compressed, encrypted
and offloaded to S3 at or above the threshold. Each result is verified by SHA-256 against what
was sent. `check_server_side` reads histories directly from the server and checks that every
payload outside search attributes is `binary/encrypted`, or a storage reference whose stored
object is an encrypted payload, and that no plaintext marker appears anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from sdk_codec import iter_payloads

MARKER = b"PGW-SOAK-PLAINTEXT-MARKER"
REF_TYPE = b"temporal.api.sdk.v1.ExternalStorageReference"
MAX_SIZE = 20 * 1000 * 1000


@activity.defn
async def echo_blob(data: bytes) -> bytes:
    return data


@workflow.defn
class SoakWorkflow:
    @workflow.run
    async def run(self, data: bytes, activity_timeout_s: int) -> bytes:
        return await workflow.execute_activity(
            echo_blob, data, start_to_close_timeout=timedelta(seconds=activity_timeout_s),
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=3)))


def draw_sizes(n: int, seed: int, max_total: Optional[int] = None, lo: int = 1, hi: int = MAX_SIZE) -> list[int]:
    """`n` sizes, log-uniform in [lo, hi]; with `max_total`, a draw that would exceed the budget
    is redrawn (up to 20 times) and finally cut to what is left (at least 1 byte)."""
    rng = random.Random(seed)
    draw = lambda: max(lo, min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))
    sizes, total = [], 0
    for i in range(n):
        s = draw()
        if max_total is not None:
            for _ in range(20):
                if total + s <= max_total:
                    break
                s = draw()
            s = max(1, min(s, max_total - total))
        sizes.append(s)
        total += s
    return sizes


def make_blob(size: int, seed: int) -> bytes:
    """Half the blobs random (incompressible), half repetitive (zstd shrinks them); every blob of
    at least 64 bytes starts with MARKER, so plaintext would be found."""
    rng = random.Random(seed)
    if seed % 2:
        body = rng.randbytes(size)
    else:
        unit = (b"%s seed=%d " % (MARKER, seed)) + rng.randbytes(16).hex().encode()
        body = (unit * (size // len(unit) + 1))[:size]
    if size >= 64:
        body = MARKER + body[len(MARKER):]
    return body


class LoadProgress:
    """How many workflows of a load have finished, shared with a fault running in another
    thread, so a fault fires at a point in the load rather than after a wall-clock delay (a
    fast machine can finish a small load before a fixed delay is over)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done = 0
        self._over = False

    def finished_one(self) -> None:
        with self._cond:
            self._done += 1
            self._cond.notify_all()

    def load_over(self) -> None:
        with self._cond:
            self._over = True
            self._cond.notify_all()

    def wait_done(self, count: int, timeout_s: float = 240.0) -> None:
        """Blocks until `count` workflows have finished. Raises if the load ended first or the
        time ran out: the fault would then not have happened during the load."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done >= count or self._over, timeout=timeout_s):
                raise TimeoutError(f"only {self._done} workflows finished in {timeout_s:.0f} s, waiting for {count}")
            if self._done < count:
                raise AssertionError(f"the load ended after {self._done} workflows, before {count}")


@dataclass
class LoadResult:
    workflows: int = 0
    bytes_sent: int = 0
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    ended_at: float = 0.0  # time.monotonic() when the last workflow finished
    ids: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    # The largest total of payload bytes in flight at once: the sum of the input blob sizes of
    # the workflows running at that moment (a workflow runs from just before its start request
    # until its result has come back). Each blob counts once, although it crosses the gateway
    # four times (start input, activity input, activity result, workflow result): those
    # crossings are sequential within one workflow.
    peak_inflight_bytes: int = 0
    peak_inflight_workflows: int = 0  # how many workflows were running at that moment

    def summary(self) -> str:
        mb = self.bytes_sent / 1e6
        rate = mb / self.duration_s if self.duration_s else 0.0
        return (f"workflows={self.workflows} bytes={self.bytes_sent} ({mb:.1f} MB; x4 through the gateway) "
                f"max={max(self.sizes, default=0)} median={sorted(self.sizes)[len(self.sizes) // 2] if self.sizes else 0} "
                f"errors={len(self.errors)} duration={self.duration_s:.1f}s ({rate:.2f} MB/s of workflow input)")


class ResidentSampler:
    """VmRSS of process `pid` sampled once a second for `seconds` seconds from `start()`, in a
    helper thread, so the caller can do other work (the server-side checks) meanwhile; `join()`
    returns the series as (seconds since start, KiB) pairs, the first at 0 s."""

    def __init__(self, pid: int, seconds: int = 30) -> None:
        self.pid = pid
        self.seconds = seconds
        self.series: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def start(self) -> "ResidentSampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        for i in range(self.seconds + 1):
            delay = self._t0 + i - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            rss = proc_status_kib(self.pid).get("VmRSS")
            if rss is None:
                return
            self.series.append((time.monotonic() - self._t0, rss))

    def join(self) -> list[tuple[float, int]]:
        self._thread.join()
        return self.series


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB (empty once the process is gone)."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def run_load_with(during, *args, **kwargs) -> LoadResult:
    """`run_load(*args, **kwargs)` on an event loop in a helper thread while `during(progress)`
    (a fault: a blocking callable given the load's `LoadProgress`) runs in the calling thread. Processes a fault (re)starts must be
    spawned from the main thread: the rig's children get PR_SET_PDEATHSIG, which fires when the
    spawning *thread* exits."""
    box: dict = {}
    progress = LoadProgress()

    def target():
        try:
            box["result"] = asyncio.run(run_load(*args, progress=progress, **kwargs))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            box["error"] = err
        finally:
            progress.load_over()

    t = threading.Thread(target=target, name="soak-load")
    t.start()
    try:
        during(progress)
    finally:
        t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def run_load(address: str, sizes: list[int], concurrency: int = 8, seed: int = 0, tag: Optional[str] = None,
                   timeout_s: float = 600.0, worker_address: Optional[str] = None,
                   progress_every: int = 0, activity_timeout_s: int = 20,
                   shared_connection: bool = False, progress: Optional[LoadProgress] = None) -> LoadResult:
    """Runs one workflow per size through `address` (worker on `worker_address`, default the
    same), `concurrency` at a time. A lost activity completion (a fault) costs
    `activity_timeout_s` before the retry. Returns what happened; every mismatch or failure is
    an entry in `errors`."""
    tag = tag or uuid.uuid4().hex[:8]
    task_queue = f"soak-{tag}"
    client = await Client.connect(address, namespace="default")
    # The worker has a connection of its own, as separate worker and starter processes would
    # (shared_connection=True: one connection for both, which exposes the empty-DATA-frame
    # GOAWAY defect to the starter's result long-polls; see RELIABILITY.md).
    worker_client = client if shared_connection else await Client.connect(worker_address or address, namespace="default")
    out = LoadResult(sizes=list(sizes))
    sem = asyncio.Semaphore(concurrency)
    done = 0
    inflight = {"bytes": 0, "workflows": 0}  # one event loop: no lock needed

    def enter(size: int) -> None:
        inflight["bytes"] += size
        inflight["workflows"] += 1
        if inflight["bytes"] > out.peak_inflight_bytes:
            out.peak_inflight_bytes = inflight["bytes"]
            out.peak_inflight_workflows = inflight["workflows"]

    def leave(size: int) -> None:
        inflight["bytes"] -= size
        inflight["workflows"] -= 1

    async def one(i: int, size: int) -> None:
        nonlocal done
        wf_id = f"soak-{tag}-{i}"
        async with sem:
            data = make_blob(size, seed * 1_000_003 + i)
            want = hashlib.sha256(data).hexdigest()
            enter(size)
            try:
                got = await client.execute_workflow(SoakWorkflow.run, args=[data, activity_timeout_s], id=wf_id,
                                                    task_queue=task_queue,
                                                    execution_timeout=timedelta(seconds=timeout_s))
                del data
                if hashlib.sha256(got).hexdigest() != want or len(got) != size:
                    out.errors.append(f"{wf_id}: result differs ({len(got)} bytes, expected {size})")
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                cause = getattr(err, "cause", None) or err.__cause__
                out.errors.append(f"{wf_id} ({size} B): {type(err).__name__}: {err}"
                                  + (f" <- {type(cause).__name__}: {cause}" if cause else ""))
            finally:
                leave(size)
            out.workflows += 1
            out.bytes_sent += size
            out.ids.append(wf_id)
            done += 1
            if progress is not None:
                progress.finished_one()
            if progress_every and done % progress_every == 0:
                print(f"[soak] {done}/{len(sizes)} done, {len(out.errors)} errors", flush=True)

    started = time.monotonic()
    async with Worker(worker_client, task_queue=task_queue, workflows=[SoakWorkflow], activities=[echo_blob],
                      workflow_runner=UnsandboxedWorkflowRunner(),
                      max_concurrent_activities=concurrency * 2):
        tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(sizes)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout_s)
    out.ended_at = time.monotonic()
    out.duration_s = out.ended_at - started
    return out


def check_history(history, s3_bucket_dir: Optional[Path], markers=(MARKER,)) -> dict:
    """Asserts nothing plaintext in one history as the server holds it; returns counts."""
    counts = {"encrypted": 0, "references": 0}
    for event in history.events:
        for path, p in iter_payloads(event):
            if ".search_attributes." in f".{path}.":
                continue
            enc = p.metadata.get("encoding")
            if enc == b"binary/encrypted":
                counts["encrypted"] += 1
            elif p.metadata.get("messageType") == REF_TYPE:
                counts["references"] += 1
                assert s3_bucket_dir is not None, f"{path}: a storage reference but no bucket to check"
                claim = json.loads(p.data)["claimData"]
                obj = (s3_bucket_dir / claim["key"]).read_bytes()
                stored = Payload.FromString(obj)
                assert stored.metadata.get("encoding") == b"binary/encrypted", \
                    f"{path}: stored object {claim['key']} is not encrypted: {dict(stored.metadata)}"
                for m in markers:
                    assert m not in obj, f"{path}: plaintext in stored object {claim['key']}"
            else:
                raise AssertionError(f"{path} reached the server unencrypted: {dict(p.metadata)}")
    raw = b"".join(e.SerializeToString() for e in history.events)
    for m in markers:
        assert m not in raw, "plaintext marker in the server's history"
    return counts


async def check_server_side(server_address: str, ids: list[str], s3_bucket_dir: Optional[Path]) -> dict:
    """Reads each workflow's history straight from the server (no gateway, no codec)."""
    client = await Client.connect(server_address, namespace="default")
    totals = {"histories": 0, "encrypted": 0, "references": 0}
    for wf_id in ids:
        history = await client.get_workflow_handle(wf_id).fetch_history()
        c = check_history(history, s3_bucket_dir)
        totals["histories"] += 1
        totals["encrypted"] += c["encrypted"]
        totals["references"] += c["references"]
    return totals
