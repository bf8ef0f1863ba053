#!/usr/bin/env python3
"""Cost of protected search attributes per list call (issue 26), all rows in one run.

Starts a Temporal dev server and two gateways in front of it, both encrypting with the same
static key: `gw-plain` protects nothing, `gw-protected` protects `CustomerEmail`. Seeds 10
workflows with a plaintext `CustomerEmail` (directly at the server) and 10 through
`gw-protected` (tokens at the server). Then, in interleaved rounds, times raw
`ListWorkflowExecutions` calls (gRPC, page size 100, one connection per path):

- `no match`: `CustomerEmail = "nobody@example.com"` directly, through `gw-plain` (forwarded
  as is) and through `gw-protected` (parsed and rewritten to the token; nothing matches);
- `10 matches`: `gw-plain` listing the 10 plaintext workflows vs `gw-protected` listing the 10
  protected ones by their e-mail (query rewrite plus 10 tokens opened in the response);
- `10 matches, 2 keys`: the same on a third gateway with a second (older) key in its keyring, so
  the query carries two tokens.

    PGW_GATEWAY_BIN=target/release/payload-gateway \\
      ~/.cache/payload-gateway/venv/bin/python benches/search-attributes.py [--calls 400]

Prints a markdown table (median, p90, mean per call in ms, and the difference to the reference
row of its group).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import rig  # noqa: E402
from temporalio.api.enums.v1 import IndexedValueType  # noqa: E402
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest  # noqa: E402
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsr  # noqa: E402
from temporalio.api.workflowservice.v1 import service_pb2_grpc  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes  # noqa: E402

EMAIL = SearchAttributeKey.for_keyword("CustomerEmail")


def gateway(workdir: Path, upstream: str, name: str, keys: dict[str, bytes], protect: list[str]) -> rig.Gateway:
    gw = rig.Gateway(rig.new_tmpdir(workdir, f"{name}-"), upstream, config={}, name=name)
    gw.configure({
        **gw.listener_sections(),
        "encryption": {"enabled": True, "active_key": "k1", "keys": rig.key_files(gw.workdir, keys)},
        "storage": {"enabled": False},
        "search_attributes": {"protect": protect},
    })
    return gw.start()


async def seed(server: str, protected: str, tag: str) -> tuple[str, str]:
    direct = await Client.connect(server)
    await direct.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace="default", search_attributes={"CustomerEmail": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD}))
    through = await Client.connect(protected)
    plain, secret = f"plain-{tag}@example.com", f"secret-{tag}@example.com"
    for i in range(10):
        await direct.start_workflow("Idle", id=f"bench-plain-{tag}-{i}", task_queue="bench-none",
                                    search_attributes=TypedSearchAttributes([SearchAttributePair(EMAIL, plain)]))
        await through.start_workflow("Idle", id=f"bench-prot-{tag}-{i}", task_queue="bench-none",
                                     search_attributes=TypedSearchAttributes([SearchAttributePair(EMAIL, secret)]))
    # Visibility is eventually consistent: wait until both lists are complete.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        a = (await direct.count_workflows(f'CustomerEmail = "{plain}"')).count
        b = (await through.count_workflows(f'CustomerEmail = "{secret}"')).count
        if a == 10 and b == 10:
            break
        await asyncio.sleep(0.3)
    return plain, secret


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=400, help="calls per row (in rounds of 20)")
    args = ap.parse_args()
    workdir = Path(rig.new_tmpdir(Path(os.environ.get("TMPDIR", "/tmp")), "pgw-sa-bench-"))
    tag = uuid.uuid4().hex[:8]
    k1, k0 = os.urandom(32), os.urandom(32)
    # The dev server limits visibility calls per namespace (10/s by default): lifted for the bench.
    server = rig.TemporalServer(workdir / "temporal", name="temporal-bench", dynamic_config={
        "frontend.namespaceRPS.visibility": 100000, "frontend.globalNamespaceRPS.visibility": 100000,
        "frontend.namespaceRPS": 100000, "frontend.globalNamespaceRPS": 100000}).start()
    gws = []
    try:
        gw_plain = gateway(workdir, server.address, "gw-plain", {"k1": k1}, [])
        gws.append(gw_plain)
        gw_prot = gateway(workdir, server.address, "gw-protected", {"k1": k1}, ["CustomerEmail"])
        gws.append(gw_prot)
        gw_two = gateway(workdir, server.address, "gw-protected-2keys", {"k1": k1, "k0": k0}, ["CustomerEmail"])
        gws.append(gw_two)
        plain, secret = asyncio.run(seed(server.address, gw_prot.address, tag))
        nobody = '"nobody@example.com"'
        rows = [
            ("no match", "direct", server.address, f"CustomerEmail = {nobody}", 0),
            ("no match", "gw-plain (forwarded as is)", gw_plain.address, f"CustomerEmail = {nobody}", 0),
            ("no match", "gw-protected (query rewritten)", gw_prot.address, f"CustomerEmail = {nobody}", 0),
            ("10 matches", "gw-plain (plaintext values)", gw_plain.address, f'CustomerEmail = "{plain}"', 10),
            ("10 matches", "gw-protected (rewrite + 10 tokens opened)", gw_prot.address,
             f'CustomerEmail = "{secret}"', 10),
            ("10 matches", "gw-protected, 2 keys (2 tokens in the query)", gw_two.address,
             f'CustomerEmail = "{secret}"', 10),
        ]
        channels = {addr: rig.channel(addr) for addr in {r[2] for r in rows}}
        stubs = {addr: service_pb2_grpc.WorkflowServiceStub(ch) for addr, ch in channels.items()}
        times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
        for i, (_, label, addr, query, want) in enumerate(rows):  # warm up and check
            got = stubs[addr].ListWorkflowExecutions(wsr.ListWorkflowExecutionsRequest(
                namespace="default", query=query, page_size=100))
            if len(got.executions) != want:
                raise SystemExit(f"{label}: expected {want} executions, got {len(got.executions)}")
        for _ in range(max(1, args.calls // 20)):
            for i, (_, _, addr, query, _) in enumerate(rows):
                request = wsr.ListWorkflowExecutionsRequest(namespace="default", query=query, page_size=100)
                for _ in range(20):
                    t0 = time.perf_counter()
                    stubs[addr].ListWorkflowExecutions(request)
                    times[i].append((time.perf_counter() - t0) * 1000)
        for ch in channels.values():
            ch.close()
    finally:
        for gw in gws:
            gw.stop()
        server.stop()
    print(f"| group | path | calls | median ms | p90 ms | mean ms | median vs first row of group |")
    print("|---|---|---|---|---|---|---|")
    reference = {}
    for i, (group, label, _, _, _) in enumerate(rows):
        t = sorted(times[i])
        median = statistics.median(t)
        reference.setdefault(group, median)
        delta = median - reference[group]
        print(f"| {group} | {label} | {len(t)} | {median:.3f} | {t[int(len(t) * 0.9)]:.3f} | "
              f"{statistics.fmean(t):.3f} | {'+' if delta >= 0 else ''}{delta * 1000:.0f} µs |")


if __name__ == "__main__":
    main()
