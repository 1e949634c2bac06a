"""``numa-llama bench --scenarios``: its bad input (host), the weight finder it rests on (host), and the warm-cache
scenario where stock loses locality (a 2-node guest, the seeded synthetic model: the real model's full matrix is
``tox -e scenarios``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_json

from numa_llama import scenarios
from numa_llama.sysfs import read_topology


def cli(*args: str, cpus: set[int] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "numa_llama", "bench", *args],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_an_unknown_scenario_is_named_in_one_line() -> None:
    proc = cli("--scenarios", "warm,tepid")
    assert proc.returncode == 2
    assert one_line(proc) == (
        "numa-llama: unknown scenario tepid; choose from cold, warm, restart, no-mmap, repack, moe or all"
    )


def test_an_unknown_strategy_is_named_in_one_line() -> None:
    proc = cli("--scenarios", "warm", "--strategies", "distribute,off")
    assert proc.returncode == 2
    assert "unknown strategy off" in one_line(proc)


def test_a_model_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    proc = cli(str(tmp_path / "missing.gguf"), "--scenarios", "warm")
    assert proc.returncode == 2
    assert "missing.gguf" in one_line(proc) and proc.stdout == ""


def test_on_one_node_each_scenario_says_it_needs_nodes(synthetic_model: Path) -> None:
    """Every scenario asked for gets its own line (none is skipped), and nothing is printed as a result. On a
    multi-node machine the process is first confined to one node's CPUs, which is a one-node machine to it."""
    first = read_topology().compute_nodes()[0]
    proc = cli(str(synthetic_model), "--scenarios", "all", cpus=set(first.usable_cpus))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [f"scenario {s}" for s in scenarios.SCENARIOS]
    assert all("needs 2 or more NUMA nodes with usable CPUs; this machine has 1" in line for line in lines)


def test_the_graph_finds_every_weight_the_file_maps(model_path: Path) -> None:
    """The eval callback's weights are the GGUF's matmul weights, with their shapes, with or without mmap. With
    mmap, each is at its address in the file mapping unless CPU_REPACK made a copy (the AVX2 and AVX-512
    variants repack Q4_K): then it is outside the mapping, which is what the threads read."""
    out = run_json(
        f"""
import json
from llama_cpp import Llama
from numa_llama import api
from numa_llama.decode import mapped_weights
def rows(ws):
    return [[w.name, w.address, w.n_rows, w.row_bytes, w.n_matrices] for w in ws]
res = {{}}
for mm in (True, False):
    llm = Llama({str(model_path)!r}, n_threads=2, n_ctx=64, use_mmap=mm, verbose=False)
    res[str(mm)] = rows(api.graph_weights(llm))
    if mm:
        res["mapped"] = rows(mapped_weights(llm.model_path))
    llm.close()
print(json.dumps(res))
"""
    )
    mapped = {w[0]: w for w in out["mapped"]}
    graph_mm = {w[0]: w for w in out["True"]}
    graph_anon = {w[0]: w for w in out["False"]}
    assert len(graph_mm) == 127  # gemma-3-270m: 18 layers x 7 matrices, and the tied output embedding
    assert set(graph_mm) == set(graph_anon) and set(graph_mm) <= set(mapped)
    for name, w in [*graph_mm.items(), *graph_anon.items()]:
        assert w[2:] == mapped[name][2:], name
    lo = min(w[1] for w in out["mapped"])
    hi = max(w[1] + w[2] * w[3] * w[4] for w in out["mapped"])
    in_file = [n for n, w in graph_mm.items() if w[1] == mapped[n][1]]
    copies = [n for n, w in graph_mm.items() if not lo <= w[1] < hi]
    print(f"mmap: {len(in_file)} weights read in the file mapping, {len(copies)} repacked copies")
    assert len(in_file) + len(copies) == len(graph_mm)


def test_the_table_names_a_text_that_differs() -> None:
    common = dict(threads=4, load_s=1.0, first_s=0.5, pages=0, pages_moved=0, pages_failed=0, place_s=0.0)
    a = scenarios.Cell(
        "warm", "distribute", text=" Paris", locality=0.5, per_thread=[1.0, 0.0], thread_node=[0, 1],
        page_share={"0": 1.0}, unanswered=0.125, **common,
    )  # fmt: skip
    b = scenarios.Cell(
        "warm", "numactl", text=" Lyon", locality=None, per_thread=None, thread_node=None,
        page_share={"0": 0.5, "1": 0.5}, prefix=["numactl", "--interleave=all"], **common,
    )  # fmt: skip
    rows = scenarios.table([a, b]).splitlines()
    assert rows[2] == "| warm | distribute | 50.00% | 0.00% | 0: 100.0% | 12.50% | 0 | 1.00 | same |"
    assert rows[3] == (
        "| warm | numactl (under numactl --interleave=all) | — | — | 0: 50.0% / 1: 50.0% | 0.00% | 0 | 1.00 "
        "| DIFFERS: ' Lyon' |"
    )


COUNT_UNANSWERED = """
import json, sys
from pathlib import Path
from numa_llama import kernel, scenarios
real = kernel.page_nodes
seen = {"asked": 0, "refused": 0}
def every_third_refused(addresses):
    out = real(addresses)
    for i in range(len(out)):
        seen["asked"] += 1
        if seen["asked"] % 3 == 0:
            out[i] = -14
            seen["refused"] += 1
    return out
kernel.page_nodes = every_third_refused
cell = scenarios.measure(Path(sys.argv[1]), "isolate", 1, True)
print(json.dumps({"cell": cell, **seen}))
"""


def test_pages_the_kernel_does_not_answer_for_are_counted_apart(synthetic_model: Path) -> None:
    """A page move_pages answers -EFAULT or -ENOENT for (NUMA balancing sampling it, in the guests) is counted in
    ``unanswered`` and left out of the node shares; here the kernel's answer is refused for every third page."""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", COUNT_UNANSWERED, str(synthetic_model)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cell = out["cell"]
    assert out["asked"] >= 1000 and out["refused"] == out["asked"] // 3
    assert cell["unanswered"] == out["refused"] / out["asked"]
    assert sum(cell["page_share"].values()) == pytest.approx(1.0)
    assert cell["per_thread"] == [pytest.approx(1.0 - out["refused"] / out["asked"], abs=0.01)]


@pytest.mark.numa_guest
def test_warm_on_node_0_stock_loses_what_migrate_keeps(synthetic_model: Path) -> None:
    """The page cache warmed by a reader bound to the first node: stock distribute's threads on the other node
    read remote memory for every weight; migrate moves those pages and every thread reads its own node."""
    proc = cli(str(synthetic_model), "--scenarios", "warm", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    cells = {c["strategy"]: c for c in res["cells"]}
    assert list(cells) == list(scenarios.STRATEGIES)
    first = read_topology().compute_nodes()[0].id
    print(
        scenarios.table([scenarios.Cell(**{k: v for k, v in c.items() if k != "worst_thread"}) for c in res["cells"]])
    )
    for c in cells.values():
        assert c["cache_on_first_node"] >= 0.99, c  # the scenario really is "warm on the first node"
        assert c["text"] == cells["distribute"]["text"] and c["text"]
    d = cells["distribute"]
    others = [loc for loc, node in zip(d["per_thread"], d["thread_node"], strict=True) if node != first]
    assert others and max(others) <= 0.05  # the other node's threads read (almost) nothing local
    assert d["pages_moved"] == 0 and d["page_share"].get(str(first), 0) >= 0.99
    m = cells["migrate"]
    assert min(m["per_thread"]) >= 0.995 and m["pages_moved"] > 0 and m["pages_failed"] == 0
    assert len(set(m["thread_node"])) >= 2  # threads on both nodes: the case where stock loses
    assert cells["numactl"]["locality"] is None  # threads not pinned: no per-thread answer, the page share instead
    assert sum(cells["numactl"]["page_share"].values()) == pytest.approx(1.0)
    iso = cells["isolate"]
    assert len(set(iso["thread_node"])) == 1
