"""``numa-llama bench --hardware FILE``: the real-hardware run, in one JSON file that holds what publishing needs.

It is meant for a machine with two or more real NUMA nodes, which this project does not have: whoever has one
runs it there. On one node it runs all the same (migrate has nothing to place there and distribute nothing to
spread, so the figures test the run, not NUMA), and says so in the file and on stderr.

For each page-cache state (``cold``: dropped, as after a reboot; ``warm``: dropped, then the file read by a
process bound to the first node, as an earlier run there leaves it) and each configuration:

- stock llama.cpp, ``--numa distribute`` (the stock build at the pinned commit);
- the series, ``--numa migrate``;
- on 2+ nodes, PR #14232's one-node baseline (the series' build under ``numactl -m N -N N``, no ``--numa``),

it measures, with the page cache set up before every process:

- where each thread's bytes are: one ``numa_llama.scenarios`` cell (a fresh process through llama-cpp-python,
  the kernel's ``move_pages`` as the oracle). Stock's placement is measured on the series' build with the same
  strategy: with the strategy off the series runs the stock code, so the pages land where stock puts them;
- llama-bench's pp and tg (default pp512, tg128), ``--rounds`` interleaved rounds of ``-r`` repetitions;
- tg as a percentage of two decode rooflines from the bandwidth matrix measured in the same run: the roofline of
  that placement (``roofline.placement_roofline``) and the all-local one (every node reading itself). Prompt
  processing is bound by compute, not by the bytes a token reads: it gets no roofline.

The file holds the machine (uname, CPU model, ``lscpu``, ``numactl --hardware``, THP defrag), the topology (with
the kernel's NUMA balancing and THP settings), the bandwidth matrix with its method, the bytes a token reads, both
builds (path, sha256, llama-bench's build commit and CPU), the series (each patch's sha256), every command run, and
every figure.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from numa_llama import bench, roofline, scenarios
from numa_llama._variants import sha256
from numa_llama.sysfs import Topology, read_topology

CACHES = ("cold", "warm")


class HardwareError(RuntimeError):
    """The run cannot go on here; the message says why, in one line."""


@dataclass(frozen=True)
class Column:
    config: bench.Config
    strategy: str  # the strategy of the placement cell
    prefix: tuple[str, ...] = ()  # what the placement cell runs under


def _text(cmd: Sequence[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine() -> dict:
    """What a reader needs to know of the machine: enough to tell it from another of its kind. NUMA balancing and
    the THP mode are in the document's topology (``Topology.as_dict``), read once there."""
    model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith(("model name", "Model name")):
            model = line.split(":", 1)[1].strip()
            break
    u = platform.uname()
    return {
        "uname": {"system": u.system, "release": u.release, "version": u.version, "machine": u.machine},
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "lscpu": _text(["lscpu"]),
        "numactl_hardware": _text(["numactl", "--hardware"]),
        "thp_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
        "python": sys.version.split()[0],
    }


def series(checkout: Path | None) -> list[dict]:
    """The patches of the series that built the patched llama-bench (empty outside a checkout)."""
    if checkout is None:
        return []
    patches = sorted((checkout / "patches" / "llama.cpp").glob("*.patch"))
    return [{"patch": p.name, "sha256": sha256(p)} for p in patches]


def check(topo: Topology) -> None:
    """Root (the page cache is dropped), and numactl where there are nodes to bind to."""
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise HardwareError("the run drops the page cache (/proc/sys/vm/drop_caches): run it as root")
    if len(topo.compute_nodes()) >= 2 and shutil.which("numactl") is None:
        raise HardwareError("the warm case and the one-node baseline run numactl: apt-get install numactl")


class Cache:
    """Sets the page cache up for one state, and records the commands it runs."""

    def __init__(self, state: str, model: Path, topo: Topology, commands: list[str]) -> None:
        self.state, self.model, self.commands = state, model, commands
        nodes = topo.compute_nodes()
        self.node = nodes[0].id
        self.bind = len(nodes) >= 2

    def __call__(self, _cfg: object = None) -> None:
        scenarios.drop_caches()
        self.commands.append("sync; echo 3 > /proc/sys/vm/drop_caches")
        if self.state != "warm":
            return
        if self.bind:
            share = scenarios.warm_on(self.node, self.model)
            self.commands.append(
                shlex.join(["numactl", f"--membind={self.node}", f"--cpunodebind={self.node}", "cat", str(self.model)])
            )
            if share < 0.99:
                raise HardwareError(
                    f"warm: only {100 * share:.1f}% of the file's cached pages are on node {self.node} after reading "
                    "it bound there (is the node's memory full?)"
                )
        else:
            with open(self.model, "rb") as f:
                while f.read(1 << 24):
                    pass
            self.commands.append(shlex.join(["cat", str(self.model)]))


def columns(patched: Path, stock: Path, topo: Topology, recipe: bool) -> list[Column]:
    cols = [
        Column(bench.Config("stock-distribute", stock, "distribute"), "distribute"),
        Column(bench.Config("patched-migrate", patched, "migrate"), "migrate"),
    ]
    nodes = topo.compute_nodes()
    if len(nodes) >= 2 and recipe:
        base = bench.one_node_baseline(patched, nodes[0].id, len(nodes[0].usable_cpus))
        cols.insert(0, Column(base, "distribute", base.prefix))
    return cols


def run(
    model: Path,
    patched: Path,
    stock: Path,
    threads: int | None,
    rounds: int,
    reps: int,
    pp: int,
    tg: int,
    bandwidth_mib: int,
    recipe: bool = True,
    checkout: Path | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """The whole run; returns the document ``--hardware FILE`` writes."""
    if not model.is_file():
        raise HardwareError(f"model file not found: {model}")
    topo = read_topology()
    check(topo)
    nodes = topo.compute_nodes()
    threads = threads or sum(len(n.usable_cpus) for n in nodes)
    commands: list[str] = [shlex.join(["numa-llama", *sys.argv[1:]])]
    cols = columns(patched, stock, topo, recipe)
    log("measuring the read-bandwidth matrix")
    matrix = roofline.measure(topo, mib_per_thread=bandwidth_mib, repeats=5)
    tb = roofline.token_bytes(model)
    position = tg / 2  # llama-bench's tg decodes from an empty cache: on average it holds half of the tokens
    all_local = roofline.roofline_tokens_per_s(matrix.local(), tb.at(position)) if tg else None
    results: list[dict] = []
    for state in CACHES:
        prep = Cache(state, model, topo, commands)
        placement: dict[str, dict] = {}
        for col in cols:
            log(f"{state} / {col.config.label}: where each thread's bytes are")
            prep()
            n = col.config.threads or threads
            commands.append(shlex.join(scenarios.cell_argv(model, col.strategy, n, True, col.prefix)))
            try:
                cell, _ = scenarios.run_cell(model, col.strategy, n, True, 1800, None, col.prefix)
            except scenarios.ScenarioError as e:
                raise HardwareError(f"{state} / {col.config.label}: placement: {e}") from None
            placement[col.config.label] = cell
        for col in cols:
            commands.append(shlex.join(col.config.argv(model, threads, pp, tg, reps)))
        res = bench.compare(
            [c.config for c in cols],
            model,
            threads,
            rounds=rounds,
            pp=pp,
            tg=tg,
            reps=reps,
            progress=_prefixed(log, state),
            prepare=prep,
        )
        runs = {}
        for col in cols:
            lab = col.config.label
            cell = placement[lab]
            run_ = {"placement": cell, "tests": {}}
            for t in res.tests:
                xs = res.samples[lab][t]
                entry: dict = {
                    "tokens_per_s": xs,
                    "mean": statistics.mean(xs),
                    "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                    "median": statistics.median(xs),
                    "roofline": None,
                }
                if t.startswith("tg"):
                    entry["roofline"] = _roofline(matrix, cell, tb.at(position), entry["median"], all_local)
                else:
                    entry["roofline_note"] = "prompt processing is bound by compute, not by the bytes a token reads"
                run_["tests"][t] = entry
            runs[lab] = run_
        results.append({"page_cache": state, "result": res.as_dict(), "markdown": res.markdown(), "runs": runs})
    builds = {}
    for label, exe in (("stock", stock), ("patched", patched)):
        labels = [c.config.label for c in cols if c.config.exe == exe]
        info: dict = next((r["result"]["info"].get(lab, {}) for r in results for lab in labels), {})
        builds[label] = {
            "exe": str(exe),
            "sha256": sha256(exe),
            "build_commit": info.get("build_commit"),
            "cpu_info": info.get("cpu_info"),
            "backends": info.get("backends"),
        }
    same = builds["stock"]["sha256"] == builds["patched"]["sha256"]
    from numa_llama import __version__  # noqa: PLC0415

    return {
        "what": "numa-llama bench --hardware: stock distribute against the series' migrate, cold and warm page cache",
        "numa_llama": __version__,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "numa": len(nodes) >= 2,
        "notes": _notes(len(nodes), same),
        "machine": machine(),
        "topology": topo.as_dict(),
        "bandwidth": {**matrix.as_dict(), "table": matrix.table()},
        "token_bytes": {**tb.as_dict(), "kv_position": position, "bytes_per_token": tb.at(position)},
        "all_local_roofline_tokens_per_s": all_local,
        "model": {"path": str(model), "bytes": model.stat().st_size},
        "threads": threads,
        "rounds": rounds,
        "reps": reps,
        "builds": builds,
        "same_binary": same,
        "series": series(checkout),
        "commands": commands,
        "results": results,
    }


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: log(f"{prefix}: {line}")


def _roofline(matrix: roofline.Matrix, cell: dict, bytes_per_token: float, tps: float, all_local: float | None) -> dict:
    """tg against the placement's roofline and the all-local one; a share above 100% is an error, kept as one."""
    out: dict = {"bytes_per_token": bytes_per_token, "all_local_tokens_per_s": all_local}
    try:
        if not cell.get("per_thread"):
            raise roofline.RooflineError("the placement cell gave no per-thread locality")
        flows = roofline.traffic(
            cell["per_thread"],
            cell["thread_node"],
            cell.get("read_bytes"),
            {int(k): v for k, v in cell["page_share"].items()},
        )
        limit = roofline.placement_roofline(matrix, flows, bytes_per_token)
        out["traffic"] = [{"cpu_node": i, "mem_node": j, "fraction": f} for (i, j), f in sorted(flows.items())]
        out["placement_tokens_per_s"] = limit
        out["percent_of_placement"] = roofline.percent_of_roofline(tps, limit)
        if all_local:
            out["percent_of_all_local"] = roofline.percent_of_roofline(tps, all_local)
        out["error"] = None
    except roofline.RooflineError as e:
        out["error"] = str(e)
    return out


def _notes(n_nodes: int, same_binary: bool) -> list[str]:
    notes = []
    if n_nodes < 2:
        notes.append(
            "one NUMA node: migrate has nothing to place and distribute nothing to spread, so these figures test "
            "the run; they are no NUMA result"
        )
    if same_binary:
        notes.append("the stock and the patched llama-bench are the same file: the stock column is not stock")
    return notes


def errors(doc: dict) -> list[str]:
    """Every roofline that could not be given, one line each (a share above 100% among them)."""
    out = []
    for r in doc["results"]:
        for lab, run_ in r["runs"].items():
            for t, e in run_["tests"].items():
                if e.get("roofline") and e["roofline"]["error"]:
                    out.append(f"{r['page_cache']} / {lab} / {t}: roofline: {e['roofline']['error']}")
    return out


def report(doc: dict) -> str:
    """llama-bench's tables per page-cache state, then tg against the rooflines."""
    out = []
    for r in doc["results"]:
        out += [f"page cache {r['page_cache']}:", "", r["markdown"], ""]
        out += [
            "| page cache | build | locality | worst thread | test | t/s (median) | placement roofline | % | "
            "all-local roofline | % |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for lab, run_ in r["runs"].items():
            cell = run_["placement"]
            loc = "—" if cell.get("locality") is None else f"{100 * cell['locality']:.2f}%"
            worst = "—" if not cell.get("per_thread") else f"{100 * min(cell['per_thread']):.2f}%"
            for t, e in run_["tests"].items():
                roof = e.get("roofline") or {}
                if not roof or roof.get("error"):
                    tail = "— | — | — | —" if not roof else f"error: {roof['error']} | — | — | —"
                else:
                    tail = (
                        f"{roof['placement_tokens_per_s']:.2f} | {roof['percent_of_placement']:.1f}% | "
                        f"{roof['all_local_tokens_per_s']:.2f} | {roof.get('percent_of_all_local', 0.0):.1f}%"
                    )
                out.append(f"| {r['page_cache']} | {lab} | {loc} | {worst} | {t} | {e['median']:.2f} | {tail} |")
        out.append("")
    out += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(out).rstrip()
