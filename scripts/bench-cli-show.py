#!/usr/bin/env python3
"""CLI `workflow show` benchmark (BENCHMARKS.md, section "CLI workflow show").

The remote codec endpoint as the `temporal` CLI uses it. Starts a Temporal dev server and the
gateway (zstd + AES-256-GCM, codec endpoint on) on free loopback ports, writes one workflow
through the gateway whose history has `--events` events (default 2,000) holding `--payloads`
encrypted payloads (default 1,000): the start input, then `payloads - 1` signals carrying one
payload each, then signals without arguments (no payload) up to the event count. No worker
runs, so the history is exactly that. It checks the event count and that every payload at the
server is `binary/encrypted` without the plaintext marker, then times
`temporal workflow show --output json` `--runs` times in three ways:

  plain        straight to the server, no codec endpoint (payloads shown encrypted: baseline);
  codec        straight to the server with --codec-endpoint http://<gateway codec endpoint>;
  gateway      through the gateway's gRPC port (it decodes in the gRPC path), no codec endpoint.

Each output is checked (all payloads there; `codec` and `gateway` show every plaintext marker,
`plain` none). Reported per way: wall clock (median, min-max), the CLI's CPU (utime + stime of
the child), the gateway's CPU per run (from /proc), the HTTP requests the CLI made to the
codec endpoint per run (`pgw_codec_requests_total` on the gateway's admin listener) and the
time the endpoint spent answering them (`pgw_codec_request_duration_seconds_sum`: the rest of
the difference to `plain` is the CLI's own work and the round trips). Prints a
markdown table and writes benches/results/cli-show.json.

    ~/.cache/payload-gateway/venv/bin/python scripts/bench-cli-show.py [--runs 5]

Needs the gateway binary: target/$PGW_PROFILE/payload-gateway (PGW_PROFILE defaults to
`release`; `ci` uses target/ci), or PGW_GATEWAY_BIN; and the venv from scripts/setup.sh.
Everything started here is stopped on exit, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if "PGW_GATEWAY_BIN" not in os.environ:
    os.environ["PGW_GATEWAY_BIN"] = str(REPO / "target" / os.environ.get("PGW_PROFILE", "release") / "payload-gateway")
sys.path.insert(0, str(REPO / "tests"))

import rig  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402
from temporalio.client import Client  # noqa: E402

KEY = bytes(range(32))
MARKER = "PGW-CLI-SHOW-PLAINTEXT"


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def item(i: int, size: int) -> dict:
    """A signal argument of about `size` bytes of JSON with a numbered plaintext marker."""
    head = {"seq": i, "marker": f"{MARKER}-{i:05d}", "note": ""}
    pad = max(0, size - len(json.dumps(head)))
    head["note"] = ("order line shipped to warehouse " * (pad // 32 + 1))[:pad]
    return head


def walk_payloads(node, found: list[tuple[bytes, bytes]]) -> None:
    """(encoding, data) of every payload in a proto3-JSON tree (bytes fields are base64)."""
    if isinstance(node, dict):
        meta = node.get("metadata")
        if isinstance(meta, dict) and "encoding" in meta:
            found.append((base64.b64decode(meta["encoding"]), base64.b64decode(node.get("data", ""))))
        for v in node.values():
            walk_payloads(v, found)
    elif isinstance(node, list):
        for v in node:
            walk_payloads(v, found)


async def build_history(gw_address: str, server_address: str, wf_id: str, events: int, payloads: int,
                        size: int, concurrency: int = 16) -> dict:
    """Writes the workflow through the gateway; checks it at the server. Returns its shape."""
    client = await Client.connect(gw_address)
    handle = await client.start_workflow("CliShowWorkflow", item(0, size), id=wf_id, task_queue=f"{wf_id}-no-worker")
    # started + first workflow task scheduled = 2 events, 1 payload; one event per signal
    with_payload = payloads - 1
    without = events - 2 - with_payload
    if without < 0:
        raise ValueError(f"{events} events cannot hold {payloads} payloads this way")
    sem = asyncio.Semaphore(concurrency)

    async def signal(i: int) -> None:
        async with sem:
            if i <= with_payload:
                await handle.signal("item", item(i, size))
            else:
                await handle.signal("tick")

    # in order of kind (payload signals first) so the history reads like a batch of work
    await asyncio.gather(*(signal(i) for i in range(1, with_payload + 1)))
    await asyncio.gather(*(signal(i) for i in range(with_payload + 1, with_payload + without + 1)))
    direct = await Client.connect(server_address)
    hist = await direct.get_workflow_handle(wf_id).fetch_history()
    n_events = len(hist.events)
    found: list[tuple[bytes, bytes]] = []
    walk_payloads([MessageToDict(e) for e in hist.events], found)
    if n_events != events:
        raise AssertionError(f"history has {n_events} events, wanted {events}")
    if len(found) != payloads:
        raise AssertionError(f"history holds {len(found)} payloads, wanted {payloads}")
    bad = [enc for enc, _ in found if enc != b"binary/encrypted"]
    if bad:
        raise AssertionError(f"{len(bad)} payloads at the server are not binary/encrypted: {sorted(set(bad))}")
    if any(MARKER.encode() in data for _, data in found):
        raise AssertionError("plaintext marker found at the server")
    return {"events": n_events, "payloads": len(found), "stored_payload_bytes": sum(len(d) for _, d in found)}


def codec_metrics(admin_port: int) -> tuple[dict[str, int], float]:
    """`pgw_codec_requests_total` by `route/status`, and the seconds the gateway spent answering
    them (`pgw_codec_request_duration_seconds_sum`, all routes), from the admin listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    seconds = 0.0
    for line in text.splitlines():
        if line.startswith("pgw_codec_requests_total{"):
            labels, value = line[len("pgw_codec_requests_total{"):].rsplit("} ", 1)
            kv = dict(p.split("=", 1) for p in labels.split(","))
            out[f"{kv['route'].strip(chr(34))}/{kv['status'].strip(chr(34))}"] = int(float(value))
        elif line.startswith("pgw_codec_request_duration_seconds_sum{"):
            seconds += float(line.rsplit(" ", 1)[1])
    return out, seconds


def check_output(way: str, stdout: str, payloads: int) -> None:
    found: list[tuple[bytes, bytes]] = []
    walk_payloads(json.loads(stdout), found)
    if len(found) != payloads:
        raise AssertionError(f"{way}: output shows {len(found)} payloads, wanted {payloads}")
    markers = sum(1 for _, d in found if MARKER.encode() in d)
    if way == "plain":
        if markers or MARKER in stdout:
            raise AssertionError("plain: plaintext marker in the output without a codec")
        if any(enc != b"binary/encrypted" for enc, _ in found):
            raise AssertionError("plain: a payload not shown encrypted")
    elif markers != payloads or any(enc != b"json/plain" for enc, _ in found):
        raise AssertionError(f"{way}: {markers} of {payloads} payloads decoded")


def run_way(way: str, argv: list[str], runs: int, payloads: int, gw: rig.Gateway) -> dict:
    times, cli_cpu, gw_cpu, requests, gw_busy = [], [], [], [], []
    for r in range(runs + 1):  # the first run warms caches and connections; not counted
        (m0, d0), g0, c0 = codec_metrics(gw.admin_port), cpu_secs(gw.proc.pid), children_cpu()
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        c1, g1, (m1, d1) = children_cpu(), cpu_secs(gw.proc.pid), codec_metrics(gw.admin_port)
        if p.returncode != 0:
            raise RuntimeError(f"{way}: temporal exited {p.returncode}: {p.stderr[-2000:]}")
        check_output(way, p.stdout, payloads)
        delta = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1 if m1.get(k, 0) != m0.get(k, 0)}
        if any(not k.endswith("/200") for k in delta):
            raise AssertionError(f"{way}: codec endpoint answered other than 200: {delta}")
        print(f"{way:8} run {r}{' (warm-up)' if r == 0 else ''}: {wall:7.3f} s  CLI CPU {c1 - c0:6.3f} s  "
              f"gateway CPU {g1 - g0:6.3f} s  codec requests {delta or 0} answered in {d1 - d0:6.3f} s",
              file=sys.stderr, flush=True)
        if r == 0:
            continue
        times.append(wall)
        cli_cpu.append(c1 - c0)
        gw_cpu.append(g1 - g0)
        requests.append(sum(delta.values()))
        gw_busy.append(d1 - d0)
    return {"wall_s": times, "cli_cpu_s": cli_cpu, "gw_cpu_s": gw_cpu, "codec_requests": requests,
            "codec_answer_s": gw_busy,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per way (after one warm-up run)")
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--payloads", type=int, default=1000)
    ap.add_argument("--payload-bytes", type=int, default=256, help="JSON size of each signal argument")
    ap.add_argument("--ways", default="plain,codec,gateway", help="comma-separated subset")
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "cli-show.json"))
    args = ap.parse_args()
    rig.install_cleanup_handlers()
    work = Path(tempfile.mkdtemp(prefix="pgw-cli-show-"))
    server = gw = None
    try:
        server = rig.TemporalServer(work / "temporal").start()
        gw = rig.Gateway(work / "gw", server.address, extra_env={"PGW_BENCH_KEY": base64.b64encode(KEY).decode()})
        gw.configure({
            **gw.listener_sections(codec_server=True),
            "encryption": {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_BENCH_KEY"}]},
            "compression": {"enabled": True},
        })
        gw.start()
        wf_id = f"cli-show-{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        shape = asyncio.run(build_history(gw.address, server.address, wf_id, args.events, args.payloads, args.payload_bytes))
        print(f"history: {shape} written in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        cli = rig.temporal_bin()
        base = [cli, "workflow", "show", "--workflow-id", wf_id, "--namespace", "default", "--output", "json"]
        ways = {
            "plain": base + ["--address", server.address],
            "codec": base + ["--address", server.address, "--codec-endpoint", f"http://127.0.0.1:{gw.codec_port}"],
            "gateway": base + ["--address", gw.address],
        }
        results = {w: run_way(w, ways[w], args.runs, args.payloads, gw) for w in args.ways.split(",")}
    finally:
        if gw is not None:
            gw.stop()
        if server is not None:
            server.stop()
    base_s = results["plain"]["median_s"] if "plain" in results else None
    print(f"\n`temporal workflow show --output json`, {shape['events']} events, {shape['payloads']} encrypted payloads, "
          f"{args.runs} runs each (median, min–max):\n")
    print("| way | wall clock | vs plain | CLI CPU / run | gateway CPU / run | codec HTTP requests / run "
          "| time in the codec endpoint / run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    labels = {"plain": "server, no codec (encrypted shown)", "codec": "server + `--codec-endpoint` (gateway)",
              "gateway": "through the gateway's gRPC port"}
    for w, r in results.items():
        rel = f"{r['median_s'] / base_s:.2f}×" if base_s else "—"
        print(f"| {labels[w]} | {1e3 * r['median_s']:.0f} ms ({1e3 * r['min_s']:.0f}–{1e3 * r['max_s']:.0f}) | {rel} "
              f"| {1e3 * statistics.median(r['cli_cpu_s']):.0f} ms | {1e3 * statistics.median(r['gw_cpu_s']):.0f} ms "
              f"| {statistics.median(r['codec_requests']):.0f} | {1e3 * statistics.median(r['codec_answer_s']):.0f} ms |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"history": shape, "payload_bytes": args.payload_bytes, "runs": args.runs,
                               "gateway_bin": os.environ["PGW_GATEWAY_BIN"], "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
