#!/usr/bin/env python3
"""Proxy CPU per RPC against nginx, across pgw-load runs of different gateway builds.

Each run's `load.csv` (scripts/bench-load.sh --gateway-bin ... --out DIR) already holds
`cpu_vs_nginx`: the proxy's CPU per RPC divided by nginx's in the same run (same upstream,
size and request encoding). This prints, per upstream, one markdown table: a line per
configuration and request encoding, a cell per payload size with every run's ratio per
build ("before" runs → "after" runs) and the change of the mean ratio.

    python3 benches/load-compare.py before=DIR1,DIR2 after=DIR3,DIR4 [--configs gw-off,gw-auth]

The first label is the reference of the change column. Standard library only.
"""

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(dirs):
    """(upstream, config, encoding, size) -> list of (cpu_vs_nginx, cpu_us, nginx_us)."""
    out = defaultdict(list)
    for d in dirs:
        rows = list(csv.DictReader(open(Path(d) / "load.csv", newline="")))
        nginx = {
            (r["upstream"], r["request_encoding"], r["size"]): float(r["proxy_cpu_us_per_rpc"])
            for r in rows
            if r["config"] == "nginx"
        }
        for r in rows:
            if not r.get("cpu_vs_nginx"):
                continue
            key = (r["upstream"], r["config"], r["request_encoding"], int(r["size"]))
            out[key].append(
                (
                    float(r["cpu_vs_nginx"]),
                    float(r["proxy_cpu_us_per_rpc"]),
                    nginx[(r["upstream"], r["request_encoding"], r["size"])],
                )
            )
    return out


def size_name(s):
    if s >= 1 << 20 and s % (1 << 20) == 0:
        return f"{s >> 20} MiB"
    if s >= 1024 and s % 1024 == 0:
        return f"{s >> 10} KiB"
    return f"{s} B"


def main(argv):
    builds, only = [], None
    it = iter(argv)
    for a in it:
        if a == "--configs":
            only = next(it).split(",")
        elif "=" in a:
            label, dirs = a.split("=", 1)
            builds.append((label, load(dirs.split(","))))
        else:
            sys.exit(__doc__)
    if len(builds) < 1:
        sys.exit(__doc__)
    keys = set()
    for _, data in builds:
        keys |= set(data)
    ups = sorted({k[0] for k in keys}, key=lambda u: (u != "echo", u))
    order = ["nginx", "gw-off", "gw-auth", "gw-codec", "gw-offload"]
    for up in ups:
        sizes = sorted({k[3] for k in keys if k[0] == up})
        cfgs = sorted(
            {(k[1], k[2]) for k in keys if k[0] == up and k[1] != "nginx"},
            key=lambda c: (c[1] != "identity", order.index(c[0]) if c[0] in order else 99, c[0]),
        )
        if only:
            cfgs = [c for c in cfgs if c[0] in only]
        labels = " → ".join(b[0] for b in builds)
        print(f"\n{up} upstream: proxy CPU per RPC ÷ nginx's in the same run ({labels}; one figure per run; change: mean ratio of the last build ÷ the first's)\n")
        print("| config | requests | " + " | ".join(size_name(s) for s in sizes) + " |")
        print("| --- | --- |" + " --- |" * len(sizes))
        for cfg, enc in cfgs:
            cells = []
            for s in sizes:
                parts, means = [], []
                for _, data in builds:
                    v = data.get((up, cfg, enc, s), [])
                    parts.append(", ".join(f"{x[0]:.2f}" for x in v) or "—")
                    means.append(statistics.mean(x[0] for x in v) if v else None)
                cell = " → ".join(parts)
                if len(means) > 1 and means[0] and means[-1]:
                    cell += f" ({100 * (means[-1] / means[0] - 1):+.0f} %)"
                cells.append(cell)
            print(f"| {cfg} | {enc} | " + " | ".join(cells) + " |")
        print(f"\n{up} upstream: proxy CPU per RPC, µs (mean of the runs; nginx beside it)\n")
        print("| config | requests | build | " + " | ".join(size_name(s) for s in sizes) + " |")
        print("| --- | --- | --- |" + " --- |" * len(sizes))
        for cfg, enc in cfgs:
            for label, data in builds:
                cells = []
                for s in sizes:
                    v = data.get((up, cfg, enc, s), [])
                    if v:
                        cells.append(
                            f"{statistics.mean(x[1] for x in v):.0f} (nginx {statistics.mean(x[2] for x in v):.0f})"
                        )
                    else:
                        cells.append("—")
                print(f"| {cfg} | {enc} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
