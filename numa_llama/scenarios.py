"""``numa-llama bench --scenarios``: where stock llama.cpp loses locality, measured with the kernel as the oracle.

Each cell is one fresh process (``python -m numa_llama.scenarios``) that loads the model with one strategy, runs
a greedy prompt and two decode steps, and reports what the kernel says: every thread's local fraction of the
weight bytes it multiplies (``api.locality``: ``move_pages`` per page, the thread layout and the row split),
pages moved, load seconds and the text. Before each cell the runner sets the page cache up as the scenario says:

- ``cold``: the page cache dropped, as after a reboot;
- ``warm``: dropped, then the model file read by a process bound to the first node (``numactl --membind=N
  --cpunodebind=N cat``), as an earlier run on that node leaves it;
- ``restart``: dropped, then the same cell run twice; the second process is reported (a server restarted);
- ``no-mmap``: dropped, then loaded with ``use_mmap=False``: the loader thread writes every weight;
- ``repack``: dropped, then the seeded synthetic model with Q4_0 weights (``numa_llama.synthetic``) through the
  ``haswell`` CPU variant, whose CPU_REPACK buffer one loader thread writes. The cell fails unless the graph
  really multiplies by repacked copies (weights outside the file's mapping).
- ``moe``: dropped, then the seeded synthetic mixture of experts (``numa_llama.synthetic.MOE``: 8 experts per
  layer, 2 used per token), mapped. After the short run most experts have not been read by anyone, so their
  pages are in no page cache yet: the cell gives their share (``unanswered``, counted not local as every
  unanswered page is) and, apart, the locality of the pages that are resident (``resident_locality``).

The CPUs per node and the thread count are the same in every cell. ``numactl`` runs under ``numactl
--interleave=all``, the way upstream's help describes it. Its threads are not pinned to nodes, so no thread has
a node and no per-thread locality exists: the cell gives the weight pages' share on each node instead.

The count asks ``move_pages`` about every page. A page the kernel does not answer for counts as not local, and
the cell gives the share of such pages (``unanswered``). With automatic NUMA balancing on
(``kernel.numa_balancing=1``), the kernel samples anonymous pages through NUMA-hinting entries, and on the
Debian 6.1 guest kernel ``move_pages`` answers -EFAULT (2 MiB pages) or -ENOENT for a page while it is being
sampled: in a 2-node guest with the weights in anonymous memory, 12077 of 60274 pages (and none with it off).
The runner records the setting in every cell; it does not change it.

Every scenario needs a machine with two or more nodes that have CPUs this process may use; on one node each
says so (ScenarioError), none is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from numa_llama import synthetic  # stdlib only at import: numpy and gguf load when a model is written

SCENARIOS = ("cold", "warm", "restart", "no-mmap", "repack", "moe")
REPACK_VARIANT = "haswell"  # x86: the first variant with CPU_REPACK (AVX2); the guests run it under TCG
STRATEGIES = ("distribute", "isolate", "numactl", "migrate")
PROMPT = "The capital of France is"


class ScenarioError(RuntimeError):
    """A scenario that cannot run here, in one line."""


@dataclass
class Cell:
    scenario: str
    strategy: str
    threads: int
    text: str
    load_s: float
    first_s: float  # the prompt and two decode steps
    locality: float | None  # overall local fraction of the bytes the threads read; None: threads not pinned
    per_thread: list[float] | None
    thread_node: list[int] | None
    page_share: dict[str, float]  # of the weight pages the kernel has somewhere: the fraction on each node
    pages: int
    pages_moved: int
    pages_failed: int
    place_s: float
    cache_on_first_node: float | None = None  # warm: fraction of the file's page-cache pages on the first node
    unanswered: float = 0.0  # fraction of the weight pages whose node the kernel did not answer (counted not local)
    numa_balancing: int | None = None  # /proc/sys/kernel/numa_balancing during the cell; None: not readable
    prefix: list[str] = field(default_factory=list)
    model: str = ""
    weights: int = 0  # matmul weights the graph reads
    repacked: int = 0  # of them, copies outside the file's mapping (CPU_REPACK); 0 without mmap
    read_bytes: list[int] | None = None  # per thread: the weight bytes it multiplies by in one decode step
    expert_weights: int = 0  # of the weights, stacks of experts (MUL_MAT_ID)
    resident_locality: float | None = None  # locality over only the pages the kernel answered for

    @property
    def worst(self) -> float | None:
        return min(self.per_thread) if self.per_thread else None

    def as_dict(self) -> dict:
        return {**self.__dict__, "worst_thread": self.worst}


def parse(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated list, ``all`` for every one; unknown names raise ScenarioError, naming them."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(allowed)
    bad = [s for s in names if s not in allowed]
    if bad or not names:
        raise ScenarioError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)} or all")
    return names


def check_machine(scenarios: Sequence[str], strategies: Sequence[str]) -> None:
    """Every scenario needs 2+ nodes with usable CPUs; the runner needs root and numactl. One line per problem."""
    from numa_llama.sysfs import read_topology  # noqa: PLC0415

    nodes = read_topology().compute_nodes()
    if len(nodes) < 2:
        raise ScenarioError(
            "\n".join(
                f"scenario {s}: needs 2 or more NUMA nodes with usable CPUs; this machine has {len(nodes)} "
                "(run it in a guest: python build/numa_vm.py --nodes 2 -- numa-llama bench --scenarios ...)"
                for s in scenarios
            )
        )
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise ScenarioError("scenarios drop the page cache (/proc/sys/vm/drop_caches): run them as root")
    if ("warm" in scenarios or "numactl" in strategies) and shutil.which("numactl") is None:
        raise ScenarioError("the warm scenario and the numactl strategy run numactl: apt-get install numactl")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm_on(node: int, model: Path) -> float:
    """Read the file from a process bound to ``node``; return the fraction of its cached pages the kernel has there."""
    subprocess.run(
        ["numactl", f"--membind={node}", f"--cpunodebind={node}", "cat", str(model)],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return cached_share(model, node)


def cached_share(model: Path, node: int) -> float:
    """Map the file, touch every page (the page cache holds it: nothing is read from disk, nothing moves), and
    ask the kernel where each page is: the fraction of the present pages on ``node``."""
    import mmap  # noqa: PLC0415

    from numa_llama import kernel  # noqa: PLC0415

    page = kernel.page_size()
    with open(model, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        ref = kernel.ffi.from_buffer(m)
        first = int(kernel.ffi.cast("uintptr_t", ref))
        for off in range(0, len(m), page):
            m[off]  # noqa: B018  (the touch)
        where = kernel.page_nodes(list(range(first, first + len(m), page)))
        del ref
    present = [n for n in where if n >= 0]
    return sum(n == node for n in present) / len(present) if present else 0.0


def measure(model: Path, strategy: str, threads: int, use_mmap: bool) -> dict:
    """One cell, in this process (a fresh one: the runner starts it): load, run, ask the kernel."""
    from collections import Counter  # noqa: PLC0415

    from llama_cpp import Llama  # noqa: PLC0415

    from numa_llama import api, kernel  # noqa: PLC0415
    from numa_llama.decode import weights_locality  # noqa: PLC0415

    node_before = kernel.getcpu()[1]
    if strategy == "isolate":
        # ggml isolates to the node its numa init runs on, inside Llama(); keep this thread on the node it starts
        # on (whichever the scheduler gave it, as for any user), so that node is known after loading
        from numa_llama.sysfs import read_topology  # noqa: PLC0415

        here = next(n for n in read_topology().compute_nodes() if n.id == node_before)
        os.sched_setaffinity(0, here.usable_cpus)
    t0 = time.perf_counter()
    llm = Llama(
        str(model),
        numa=strategy,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=128,
        use_mmap=use_mmap,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    node_after = kernel.getcpu()[1]
    try:
        t1 = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=2, temperature=0.0, top_k=1)
        first_s = time.perf_counter() - t1
        assert isinstance(out, dict)  # not streamed
        weights = api.graph_weights(llm)
        page = kernel.page_size()
        where: Counter = Counter()
        unanswered = asked = 0
        for w in weights:
            lo = w.address // page * page
            status = kernel.page_nodes(range(lo, w.address + w.n_rows * w.row_bytes * w.n_matrices, page))
            asked += len(status)
            unanswered += sum(1 for n in status if n < 0)
            where.update(n for n in status if n >= 0)
        present = sum(where.values()) or 1
        mapped = _file_ranges(model) if use_mmap else []
        repacked = sum(1 for w in weights if not any(lo <= w.address < hi for lo, hi in mapped)) if mapped else 0
        loc = None
        if strategy in ("distribute", "migrate"):
            loc = api.locality(llm)
        elif strategy == "isolate":
            # ggml runs every thread on the node its numa init ran on (getcpu in ggml_numa_init, inside Llama())
            if node_before != node_after:
                raise ScenarioError(
                    f"isolate: this thread moved from node {node_before} to {node_after} while loading, so the "
                    "node ggml isolated to is not known; run it again"
                )
            loc = weights_locality("distribute", (node_after,) * threads, [(w, None) for w in weights])
        st = api.stats(llm)
    finally:
        llm.close()
    return {
        "strategy": strategy,
        "threads": threads,
        "model": model.name,
        "weights": len(weights),
        "repacked": repacked,
        "expert_weights": sum(1 for w in weights if w.n_matrices > 1),
        "resident_locality": None if loc is None else loc.resident,
        "text": out["choices"][0]["text"],
        "load_s": load_s,
        "first_s": first_s,
        "locality": None if loc is None else loc.overall,
        "per_thread": None if loc is None else list(loc.per_thread),
        "thread_node": None if loc is None else list(loc.thread_node),
        "read_bytes": None if loc is None else list(loc.read_bytes),
        "page_share": {str(n): c / present for n, c in sorted(where.items())},
        "unanswered": unanswered / asked if asked else 0.0,
        "pages": st.pages,
        "pages_moved": st.pages_moved,
        "pages_failed": st.pages_failed,
        "place_s": st.place_seconds,
    }


def _file_ranges(model: Path) -> list[tuple[int, int]]:
    """This process's mappings of the model file (address ranges)."""
    path = os.path.realpath(model)
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip("\n").endswith(" " + path):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def cell_argv(model: Path, strategy: str, threads: int, use_mmap: bool, prefix: Sequence[str] = ()) -> list[str]:
    """The command of one cell: a fresh process that loads, runs and asks the kernel (``measure``)."""
    argv = [*prefix, sys.executable, "-P", "-m", "numa_llama.scenarios", str(model), strategy, str(threads)]
    return argv + ([] if use_mmap else ["--no-mmap"])


def run_cell(
    model: Path,
    strategy: str,
    threads: int,
    use_mmap: bool,
    timeout: float,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] | None = None,
) -> tuple[dict, list[str]]:
    if prefix is None:
        prefix = ["numactl", "--interleave=all"] if strategy == "numactl" else []
    prefix = list(prefix)
    argv = cell_argv(model, strategy, threads, use_mmap, prefix)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        raise ScenarioError(f"{strategy}: the run took longer than {timeout:.0f} s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ScenarioError(f"{strategy}{' (no mmap)' if not use_mmap else ''}: the run failed: {last}")
    return json.loads(lines[-1]), prefix


def run(
    model: Path,
    scenarios: Sequence[str],
    strategies: Sequence[str],
    threads: int | None = None,
    log: Callable[[str], None] = lambda line: None,
    timeout: float = 1800,
) -> list[Cell]:
    """Every scenario with every strategy, one fresh process per cell (two for restart)."""
    from numa_llama.sysfs import read_topology  # noqa: PLC0415

    if not model.is_file():
        raise ScenarioError(f"model {model}: no such file")
    check_machine(scenarios, strategies)
    topo = read_topology()
    nodes = topo.compute_nodes()
    threads = threads or sum(len(n.usable_cpus) for n in nodes)
    first = nodes[0].id
    cells: list[Cell] = []
    repack_model = _repack_model() if "repack" in scenarios else None
    moe_model = _synthetic_model("moe", "mixture of experts", synthetic.MOE) if "moe" in scenarios else None
    setting = topo.numa_balancing or ""
    balancing = int(setting) if setting.isdigit() else None
    for sc in scenarios:
        for st in strategies:
            drop_caches()
            cache = warm_on(first, model) if sc == "warm" else None
            if cache is not None and cache < 0.99:
                raise ScenarioError(
                    f"warm: only {100 * cache:.1f}% of the file's cached pages are on node {first} after reading it "
                    "bound there (is the node's memory full?), so this is not the warm-on-node case"
                )
            if sc == "restart":
                run_cell(model, st, threads, True, timeout)  # the run before the restart: it leaves the page cache
            if sc == "repack":
                assert repack_model is not None
                out, prefix = run_cell(
                    repack_model, st, threads, True, timeout, {"NUMA_LLAMA_CPU_VARIANT": REPACK_VARIANT}
                )
                if not out["repacked"]:
                    raise ScenarioError(
                        f"repack / {st}: the {REPACK_VARIANT} variant multiplied by no repacked weight "
                        f"({out['weights']} weights, all in the file's mapping), so this is not the repack case"
                    )
            elif sc == "moe":
                assert moe_model is not None
                out, prefix = run_cell(moe_model, st, threads, True, timeout)
                if not out["expert_weights"]:
                    raise ScenarioError(
                        f"moe / {st}: the graph multiplied by no stack of experts ({out['weights']} weights), so "
                        "this is not the mixture-of-experts case"
                    )
            else:
                out, prefix = run_cell(model, st, threads, sc != "no-mmap", timeout)
            cell = Cell(scenario=sc, cache_on_first_node=cache, prefix=prefix, numa_balancing=balancing, **out)
            cells.append(cell)
            log(
                f"{sc} / {st}: {_fmt(cell.locality)} overall, worst thread {_fmt(cell.worst)}, "
                f"{cell.pages_moved} pages moved, load {cell.load_s:.1f} s"
            )
    return cells


def _repack_model() -> Path:
    """The seeded synthetic model with Q4_0 weights, from numa-llama's cache (written there if it can be)."""
    import platform  # noqa: PLC0415

    if platform.machine() not in ("x86_64", "AMD64"):
        raise ScenarioError(f"scenario repack: runs the x86 {REPACK_VARIANT} variant; this is {platform.machine()}")
    return _synthetic_model("repack", "Q4_0 model", synthetic.Shape(quant="q4_0"))


def _synthetic_model(scenario: str, what: str, shape: synthetic.Shape) -> Path:
    """A seeded synthetic model from numa-llama's cache, written there if it can be; a guest sees the cache
    read-only, so there it must have been written first (tox does: python -m numa_llama.synthetic)."""
    try:
        return synthetic.cached(shape)
    except OSError as e:
        raise ScenarioError(
            f"scenario {scenario}: the synthetic {what} is not in the cache and cannot be written here ({e}); "
            "run python -m numa_llama.synthetic first"
        ) from e


def _label(c: Cell) -> str:
    if c.scenario == "repack":
        return f"repack ({c.repacked} of {c.weights} weights repacked)"
    if c.scenario == "moe":
        resident = _fmt(c.resident_locality)
        return f"moe ({c.expert_weights} of {c.weights} weights expert stacks; resident pages {resident} local)"
    return c.scenario


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def table(cells: Sequence[Cell]) -> str:
    """The markdown table: one row per cell; the text column compares each cell's text with the first cell's of
    the same model."""
    refs: dict[str, str] = {}
    for c in cells:
        refs.setdefault(c.model, c.text)
    rows = [
        "| scenario | strategy | locality | worst thread | weight pages per node | unanswered | pages moved | load s "
        "| text |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        label = f"{c.strategy} (under {' '.join(c.prefix)})" if c.prefix else c.strategy
        scenario = _label(c)
        share = " / ".join(f"{k}: {100 * v:.1f}%" for k, v in c.page_share.items())
        rows.append(
            f"| {scenario} | {label} | {_fmt(c.locality)} "
            f"| {_fmt(c.worst)} | {share} | {_fmt(c.unanswered)} | {c.pages_moved} | {c.load_s:.2f} | "
            f"{'same' if c.text == refs[c.model] else 'DIFFERS: ' + repr(c.text)} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """The cell worker: ``python -m numa_llama.scenarios MODEL STRATEGY THREADS [--no-mmap]``; one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m numa_llama.scenarios")
    ap.add_argument("model")
    ap.add_argument("strategy", choices=STRATEGIES)
    ap.add_argument("threads", type=int)
    ap.add_argument("--no-mmap", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = measure(Path(args.model), args.strategy, args.threads, not args.no_mmap)
    except (ScenarioError, ValueError) as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
