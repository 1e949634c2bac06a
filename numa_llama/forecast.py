"""A forecast, not a measurement: the share of the decode roofline each scenario cell would reach on a 2-socket
server, from the locality measured in a 2-node guest and a published bandwidth figure for that server.

Nothing here runs on the server. The inputs are:

- one ``numa-llama bench --scenarios ... --json`` file from a 2-node machine (a guest is enough: it measures
  where each thread's bytes are, not how fast they move);
- a platform: the peak read bandwidth of each socket's memory and of the link between the sockets, each with
  its published source and figure (``PLATFORMS``).

The model. A decode step reads each weight byte once, and every thread reads the same number of bytes (the
row split). A thread on node *i* with local fraction *l* reads *l* of its bytes from node *i*'s memory and the
rest from the other node's. That gives ``traffic[i][j]``, the fraction of a token's bytes read by node *i*'s
threads from node *j*'s memory. A token then takes at least the longest of:

- each node's memory serving what is read from it: ``sum_i traffic[i][j] / node_gbs``;
- the link carrying every remote byte, both directions together: ``sum_{i != j} traffic[i][j] / link_gbs``.

The roofline is every byte local with both nodes' memory busy: ``1 / (2 * node_gbs)``. The forecast is the
roofline's time over the cell's time, at most 1 by construction. It leaves out latency, the share of the peak a
real machine reaches, caches and compute: it is an upper bound on what placement alone allows. ``numactl``'s
threads are not pinned: the forecast takes them spread evenly over the nodes, each reading the weight pages in
the proportion the kernel reported.

A cell where the kernel did not answer for more than 1% of the weight pages (``unanswered``: automatic NUMA
balancing sampling anonymous memory) has a locality that counts those pages as remote; it gets no forecast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ForecastError(ValueError):
    """Input the forecast cannot use, in one line."""


@dataclass(frozen=True)
class Platform:
    key: str
    name: str
    node_gbs: float  # peak read bandwidth of one socket's memory, GB/s
    link_gbs: float  # peak bandwidth between the two sockets, GB/s
    source: str  # where each figure is published, with the figure as published


LP1852 = (
    "Lenovo Press LP1852, Configuring AMD xGMI Links on the Lenovo ThinkSystem SR665 V3 Server (16 Nov 2023), "
    "https://lenovopress.lenovo.com/lp1852-configuring-amd-xgmi-links-on-thinksystem-sr665-v3: Table 2, "
    '"12 x 4800MHz ... = 460.8 GB/s" (one socket, theoretical); '
)

PLATFORMS = {
    p.key: p
    for p in (
        Platform(
            "epyc9004-4xgmi",
            "2x AMD EPYC 9004, 12 x DDR5-4800 per socket, 4 xGMI links (theoretical peaks)",
            460.8,
            512.0,
            LP1852 + '"Four xGMI links can support a maximum theoretical bandwidth of 512 GB/s between sockets"',
        ),
        Platform(
            "epyc9004-3xgmi",
            "2x AMD EPYC 9004, 12 x DDR5-4800 per socket, 3 xGMI links (theoretical peaks)",
            460.8,
            384.0,
            LP1852 + '"Three xGMI links maximum theoretical bandwidth is 384 GB/s"',
        ),
    )
}

NOT_FOUND = (
    "2x Xeon 6 and 2x Neoverse N2: no published figure for both the socket's memory and the socket-to-socket "
    "link was found to cite, so they are not forecast"
)


def traffic(cell: dict, nodes: Sequence[int]) -> list[list[float]]:
    """traffic[i][j]: the fraction of a token's bytes that node i's threads read from node j's memory."""
    if len(nodes) != 2:
        raise ForecastError(f"the forecast is for 2-socket servers; the input has {len(nodes)} nodes")
    index = {n: k for k, n in enumerate(nodes)}
    t = [[0.0, 0.0], [0.0, 0.0]]
    if cell.get("per_thread"):
        per, where = cell["per_thread"], cell["thread_node"]
        for local, node in zip(per, where, strict=True):
            if node not in index or not 0.0 <= local <= 1.0:
                raise ForecastError(f"{cell['scenario']} / {cell['strategy']}: thread on node {node}, local {local}")
            i = index[node]
            t[i][i] += local / len(per)
            t[i][1 - i] += (1.0 - local) / len(per)
        return t
    share = {int(k): v for k, v in cell["page_share"].items()}
    if not share or set(share) - set(index):
        raise ForecastError(f"{cell['scenario']} / {cell['strategy']}: no per-thread locality and no page share")
    for i in range(2):
        for n, s in share.items():
            t[i][index[n]] += s / 2
    return t


def share_of_roofline(t: list[list[float]], p: Platform) -> float:
    """The roofline's time per byte over this traffic's: 1.0 is every node reading only its own memory."""
    memory = max((t[0][j] + t[1][j]) / p.node_gbs for j in range(2))
    link = (t[0][1] + t[1][0]) / p.link_gbs
    return (1.0 / (2 * p.node_gbs)) / max(memory, link)


MAX_UNANSWERED = 0.01


def forecast(result: dict, platforms: Sequence[Platform]) -> list[dict]:
    """One row per cell of a ``bench --scenarios --json`` result: the measured locality and each forecast (None
    where the kernel left more than MAX_UNANSWERED of the weight pages unanswered)."""
    nodes = [n["id"] for n in result["topology"]["nodes"] if n["usable_cpus"]]
    rows = []
    for c in result["cells"]:
        if "unanswered" not in c:
            raise ForecastError(
                "the result does not say how many pages the kernel left unanswered (made before that was counted); "
                "run numa-llama bench --scenarios again"
            )
        t = traffic(c, nodes)
        known = c["unanswered"] <= MAX_UNANSWERED
        rows.append(
            {
                "scenario": c["scenario"],
                "strategy": c["strategy"],
                "locality": c["locality"],
                "unanswered": c["unanswered"],
                "traffic": t,
                "forecast": {p.key: share_of_roofline(t, p) if known else None for p in platforms},
            }
        )
    return rows


def table(rows: Sequence[dict], platforms: Sequence[Platform]) -> str:
    head = " | ".join(f"{p.key}: share of the roofline" for p in platforms)
    out = [
        "FORECAST, not a measurement (inputs: the locality measured in a 2-node guest; the platforms' published "
        "theoretical peaks, cited below)",
        "",
        f"| scenario | strategy | locality (measured) | {head} |",
        "| --- | --- | ---: |" + " ---: |" * len(platforms),
    ]
    for r in rows:
        loc = "—" if r["locality"] is None else f"{100 * r['locality']:.2f}%"
        cells = " | ".join(
            "—" if r["forecast"][p.key] is None else f"{100 * r['forecast'][p.key]:.1f}%" for p in platforms
        )
        out.append(f"| {r['scenario']} | {r['strategy']} | {loc} | {cells} |")
    out.append("")
    out.extend(f"- {p.key}: {p.name}; node {p.node_gbs} GB/s, link {p.link_gbs} GB/s. {p.source}" for p in platforms)
    skipped = [
        f"{r['scenario']} / {r['strategy']} ({100 * r['unanswered']:.1f}%)"
        for r in rows
        if r["unanswered"] > MAX_UNANSWERED
    ]
    if skipped:
        out.append(
            "- —: the kernel did not answer for more than 1% of the weight pages, so the measured locality is not "
            "known well enough to forecast from: " + ", ".join(skipped)
        )
    out.append(f"- {NOT_FOUND}.")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """``numa-llama forecast RESULT.json [--platform KEY ...] [--json]``: bad input is one line, exit 2."""
    unknown = [k for k in args.platform or [] if k not in PLATFORMS]
    if unknown:
        print(
            f"numa-llama: forecast: unknown platform {', '.join(unknown)}; known: {', '.join(PLATFORMS)}",
            file=sys.stderr,
        )
        return 2
    platforms = [PLATFORMS[k] for k in (args.platform or sorted(PLATFORMS))]
    try:
        result = json.loads(Path(args.result).read_text())
        rows = forecast(result, platforms)
    except OSError as e:
        print(f"numa-llama: forecast: {args.result}: {e.strerror or e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as e:  # ForecastError, bad JSON, not a scenarios result
        what = str(e) if isinstance(e, ForecastError) else f"not a bench --scenarios --json result ({e!r})"
        print(f"numa-llama: forecast: {args.result}: {what}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"forecast": True, "platforms": [p.__dict__ for p in platforms], "rows": rows}, indent=2))
    else:
        print(table(rows, platforms))
    return 0
