"""Workflows and activities of test_drop_in.py, in a module of their own so the SDK's default
(sandboxed) workflow runner can import them: the tests run workers with default options."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

from temporalio import activity, workflow

MARKER = "PGW-DROPIN-PLAINTEXT"


def value(n: int, seed: str) -> str:
    """`n` characters that zstd cannot shrink much (base64-like alphabet drawn from SHAKE-256),
    with MARKER every 8 KiB so plaintext is easy to find in the server's history."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    raw = hashlib.shake_256(seed.encode()).digest(n)
    chars = "".join(alphabet[b & 63] for b in raw)
    step = 8192
    return "".join(MARKER + chars[i:i + step - len(MARKER)] for i in range(0, n, step))[:n]


def digest(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@activity.defn
async def echo_digest(data: str, out_len: int) -> str:
    """Returns a value of `out_len` chars derived from the input's digest."""
    return value(out_len, digest(data))


@activity.defn
async def length_of(data: str) -> int:
    return len(data)


@workflow.defn
class LargeActivityIO:
    """Hands `data` to an activity and gets `out_len` chars back."""

    @workflow.run
    async def run(self, data: str, out_len: int) -> dict:
        out = await workflow.execute_activity(echo_digest, args=[data, out_len],
                                              start_to_close_timeout=timedelta(seconds=120))
        return {"in_sha": digest(data), "out_sha": digest(out), "out_len": len(out)}


@workflow.defn
class ManyMediumActivities:
    """Schedules `count` activities with `size`-char inputs in one workflow task."""

    @workflow.run
    async def run(self, count: int, size: int) -> int:
        inputs = [value(size, f"medium-{i}") for i in range(count)]
        lengths = await asyncio.gather(*(
            workflow.execute_activity(length_of, data, start_to_close_timeout=timedelta(seconds=120))
            for data in inputs))
        return sum(lengths)


@workflow.defn
class LargeQueryAnswer:
    """Answers the query `state` with `size` chars until signalled `done`."""

    def __init__(self) -> None:
        self._size = 0
        self._done = False

    @workflow.run
    async def run(self, size: int) -> str:
        self._size = size
        await workflow.wait_condition(lambda: self._done)
        return "done"

    @workflow.query
    def state(self) -> str:
        return value(self._size, "query")

    @workflow.signal
    def done(self) -> None:
        self._done = True


@workflow.defn
class LargeSignal:
    """Returns the digest of the first `load` signal."""

    def __init__(self) -> None:
        self._data: str | None = None

    @workflow.run
    async def run(self) -> dict:
        await workflow.wait_condition(lambda: self._data is not None)
        assert self._data is not None
        return {"sha": digest(self._data), "len": len(self._data)}

    @workflow.signal
    def load(self, data: str) -> None:
        self._data = data
