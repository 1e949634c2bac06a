"""llama.cpp's own tests of the series, built against the patched ggml: test-barrier, test-cpu-numa, test-backend-ops.

``build/ggml_tests.py`` builds them (``guest``: the sse42 variant; ``tsan``:
ThreadSanitizer; ``guest-avx2``: the haswell variant, whose repack and tiled
kernels sse42 lacks). On the host they are built here; in a guest, whose
checkout is read-only, ``tox -e numa`` has built them before the guest boots.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ggml_tests
import pytest
from conftest import ROOT, run_json

IN_GUEST = bool(os.environ.get("NUMA_VM"))
NEEDED = {
    "guest": ["test-barrier", "test-cpu-numa", "test-backend-ops"],
    "tsan": ["test-barrier"],
    "tsan-avx2": ["test-cpu-numa"],
    "guest-avx2": ["test-cpu-numa", "test-backend-ops"],
}
# test-backend-ops cases whose weights are big enough to split over nodes (most of its cases have 16 rows, one row
# group: they run the stock path), for the guest, where each case costs seconds: mul_mat (q4_K) and mul_mat_id
# (F32 to Q6_K; 1 to 129 tokens, so the generic, llamafile, tiled and chunked paths all run)
# 16 cases: an odd-row q4_K weight (1023 rows) at a decode and a batch width, and MUL_MAT_ID over 4 experts
# (top-2) for every type at 1 and 32 tokens. Every case's weights are placed; the results of many more shapes
# are tested on the host under a virtual topology (test_prop_kernels.py).
BACKEND_OPS_GUEST = (
    r"^type_a=(f32|f16|q4_0|q8_0|q4_K|q6_K),type_b=f32,(m=1023,n=(1|8),k=4096,"
    r"bs=\[1,1\]|n_mats=4,n_used=2,b=0,m=512,n=(1|32),k=256)"
)
THP_OFF = [
    sys.executable,
    "-c",
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(41, 1, 0, 0, 0); os.execv(sys.argv[1], sys.argv[1:])",
]  # PR_SET_THP_DISABLE, kept across exec: base pages


def node_count() -> int:
    root = Path("/sys/devices/system/node")
    return sum(1 for d in root.glob("node[0-9]*") if (d / "cpulist").read_text().strip())


@pytest.fixture(scope="session")
def bins() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for flavor, tests in NEEDED.items():
        if IN_GUEST and flavor.startswith("tsan"):  # ThreadSanitizer runs on the host only, over virtual nodes
            continue
        if IN_GUEST:
            out[flavor] = ROOT / "_build" / f"ggml-{flavor}" / "bin"
            missing = [t for t in tests if not (out[flavor] / t).exists()]
            if missing:
                pytest.fail(
                    f"{missing} not built for {flavor}: run `python build/ggml_tests.py --flavor {flavor}` "
                    "on the host before booting the guest (tox -e numa does)"
                )
        else:
            out[flavor] = ggml_tests.build_tests(ROOT / "vendor" / "llama.cpp", flavor, tests, log=lambda _: None)
    return out


def run(
    exe: Path, *args: object, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def backend_ops_passed(out: str) -> int:
    """test-backend-ops' count of passed cases; asserts that none failed."""
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    assert m, out[-2000:]
    assert m.group(1) == m.group(2), out[-3000:]
    assert "FAIL" not in out
    return int(m.group(1))


def bound_pages(out: str) -> tuple[int, int, int]:
    """test-cpu-numa's reading of /proc/self/numa_maps: mappings bound to one node (the barrier's counters and the
    src1 buffers; the weights' pages are asked of move_pages), their pages, pages elsewhere."""
    m = re.search(
        r"numa_maps: (\d+) mapping\(s\) bound to one node \(besides the weights\), (\d+) page\(s\), "
        r"(\d+) on another node",
        out,
    )
    assert m, out[-2000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def failure(out: str, err: str = "") -> str:
    """What a failed run says: its failing lines first (a case's line can be far from the tail), then the tail."""
    bad = [line for line in out.splitlines() if re.search(r"FAIL|DIFFERENT|off plan|Assertion|error", line)]
    return "\n".join(["failing lines:", *bad, "--- tail of stdout:", out[-2000:], "--- tail of stderr:", err[-1500:]])


def products_local(out: str) -> int:
    """How many products test-cpu-numa saw computed node by node (the CPU backend's own count)."""
    m = re.search(r"test-cpu-numa: (\d+) product\(s\) computed node by node", out)
    assert m, out[-2000:]
    return int(m.group(1))


def cases_passed(out: str) -> tuple[int, int]:
    m = re.search(r"test-cpu-numa: (\d+)/(\d+) cases passed", out)
    assert m, out[-2000:]
    return int(m.group(1)), int(m.group(2))


# -- on the host (one node) ----------------------------------------------------------------------------


def test_barrier_passes_and_orders_memory(bins: dict[str, Path]) -> None:
    """The stock barrier, as the series leaves it, passes the order test the series added."""
    proc = run(bins["guest"] / "test-barrier", 2, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "n_steps: 256" in proc.stderr  # the order test ran
    assert "read before they were written" not in proc.stderr


def test_barrier_refuses_an_unknown_strategy(bins: dict[str, Path]) -> None:
    proc = run(bins["guest"] / "test-barrier", 2, 1, "interleave")
    assert proc.returncode == 1
    assert "usage:" in proc.stderr and "migrate" in proc.stderr


def test_barrier_under_thread_sanitizer(bins: dict[str, Path]) -> None:
    """The thread pool and its barrier, instrumented, under --numa migrate on one node: no report."""
    proc = run(bins["tsan"] / "test-barrier", 2, 1, "migrate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ThreadSanitizer" not in proc.stderr


def test_backend_ops_mul_mat_with_migrate_on_one_node(bins: dict[str, Path]) -> None:
    """test-backend-ops -b CPU --numa migrate on the one-node host: every MUL_MAT case against the reference."""
    proc = run(bins["guest-avx2"] / "test-backend-ops", "-b", "CPU", "--numa", "migrate", "-t", 2, "-o", "MUL_MAT")
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert backend_ops_passed(proc.stdout) > 1000


def test_backend_ops_refuses_an_unknown_strategy(bins: dict[str, Path]) -> None:
    proc = run(bins["guest"] / "test-backend-ops", "-b", "CPU", "--numa", "interleave", "-o", "ADD")
    assert proc.returncode == 1
    assert "unknown or unsupported NUMA strategy 'interleave'" in proc.stderr


def test_cpu_numa_on_one_node_runs_the_stock_path(bins: dict[str, Path]) -> None:
    proc = run(bins["guest"] / "test-cpu-numa", 2)
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert "one node: both runs take the stock path" in proc.stdout
    passed, ran = cases_passed(proc.stdout)
    assert passed == ran == 31  # 6 types x (3 mul_mat + 2 mul_mat_id), and the huge-page case; sse42 repacks none


# -- on the host, under a virtual topology (GGML_CPU_NUMA_VIRTUAL): the node-local paths, no page placed ---


@pytest.mark.parametrize("flavor,cases", [("guest", 31), ("guest-avx2", 41)], ids=["sse42", "haswell"])
def test_cpu_numa_every_case_over_virtual_nodes(bins: dict[str, Path], flavor: str, cases: int) -> None:
    """test-cpu-numa's own cases (every matmul path the variant has) over 3 virtual nodes, 4 threads (2, 1, 1):
    node-local and bitwise the stock split, and it says that no page was placed or checked."""
    proc = run(bins[flavor] / "test-cpu-numa", 4, env={"GGML_CPU_NUMA_VIRTUAL": "3"}, timeout=300)
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert "4 thread(s) on 3 node(s) [0,0,1,2]: virtual nodes (GGML_CPU_NUMA_VIRTUAL)" in proc.stdout
    assert products_local(proc.stdout) >= cases  # every case's product was computed by per-node teams
    assert cases_passed(proc.stdout) == (cases, cases)
    assert "DIFFERENT" not in proc.stdout and "0 weights placed" in proc.stdout
    assert "no weight page is placed (virtual nodes own no memory)" in proc.stderr


def test_virtual_topology_refuses_a_bad_count(bins: dict[str, Path]) -> None:
    """GGML_CPU_NUMA_VIRTUAL=zero: one warning line naming the value, and the real topology (one node) is used."""
    proc = run(bins["guest"] / "test-cpu-numa", 2, "q8_0", env={"GGML_CPU_NUMA_VIRTUAL": "zero"})
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert "GGML_CPU_NUMA_VIRTUAL=zero is not a node count from 1 to 64: ignored" in proc.stderr
    assert "one node: both runs take the stock path" in proc.stdout


@pytest.mark.parametrize("nodes,threads", [(2, 3), (4, 6), (4, 8)])
def test_node_aware_barrier_over_virtual_nodes(bins: dict[str, Path], nodes: int, threads: int) -> None:
    """The node-aware barrier orders memory over virtual nodes (nodes share the 2 CPUs; uneven layouts)."""
    proc = run(
        bins["guest"] / "test-barrier",
        threads,
        1,
        "migrate",
        env={"GGML_CPU_NUMA_VIRTUAL": str(nodes), "GGML_CPU_NUMA_DEBUG": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"node-aware barrier over {nodes} nodes" in proc.stderr
    assert "n_steps: 256" in proc.stderr and "read before they were written" not in proc.stderr


@pytest.mark.parametrize("nodes,threads", [(3, 4), (4, 5)])
def test_node_aware_barrier_over_virtual_nodes_under_thread_sanitizer(
    bins: dict[str, Path], nodes: int, threads: int
) -> None:
    """The node-aware barrier, instrumented, over 3 and 4 virtual nodes (a node with 2 threads): no report.

    The barrier's synchronisation does not depend on whether a node is real (the layout gives each thread its
    node), so this stands for the 4-node guest's TSan run, which took 207 s under TCG."""
    proc = run(
        bins["tsan"] / "test-barrier",
        threads,
        1,
        "migrate",
        env={"GGML_CPU_NUMA_VIRTUAL": str(nodes), "GGML_CPU_NUMA_DEBUG": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"node-aware barrier over {nodes} nodes" in proc.stderr
    assert "ThreadSanitizer" not in proc.stderr


# llamafile sgemm teams (f32, f16 and bf16 at 9 and 40 tokens; the issue-13 router and vocabulary shapes, where
# a node refuses its team), repacked gemm/gemv and the tiled mul_mat_id, over 3 virtual nodes, uneven
TSAN_TEAM_CASES = [
    "f32:256:128:0:0:9",
    "f16:64:32001:0:0:9",
    "f16:512:640:0:0:40",
    "bf16:256:384:0:0:40",
    "f32:256:1000:0:0:9",
    "q4_0:512:640:0:0:40:repack",
    "q4_K:256:384:4:2:9:repack",
    "f16:256:384:8:2:40",
]


def test_sgemm_teams_and_repack_over_virtual_nodes_under_thread_sanitizer(bins: dict[str, Path]) -> None:
    """The AVX2 build's node-local paths, instrumented (TSan): per-node teams with their own chunk counters,
    barriers and work buffers (llamafile sgemm, the generic chunks, repack and tiled MoE); 4 threads over 3
    virtual nodes: no report, and every case bitwise the stock split."""
    args = [a for c in TSAN_TEAM_CASES for a in ("--case", c)]
    proc = run(bins["tsan-avx2"] / "test-cpu-numa", 4, *args, env={"GGML_CPU_NUMA_VIRTUAL": "3"}, timeout=600)
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert "4 thread(s) on 3 node(s) [0,0,1,2]: virtual nodes" in proc.stdout, proc.stdout[:500]
    assert cases_passed(proc.stdout) == (len(TSAN_TEAM_CASES), len(TSAN_TEAM_CASES))


# -- in the multi-node guests --------------------------------------------------------------------------


@pytest.mark.numa_guest
@pytest.mark.nodes4
def test_node_aware_barrier(bins: dict[str, Path]) -> None:
    """With migrate on 2+ nodes the threadpool runs the node-aware barrier, and it orders memory.

    One thread per node: more threads than vCPUs spin for minutes under TCG (90 s at 2 nodes, 195 s at 4). The
    barrier over several threads per node and uneven layouts, and under TSan, runs on the host over virtual
    nodes (test_node_aware_barrier_over_virtual_nodes*): its synchronisation does not depend on a node being
    real, only on the layout."""
    nodes = node_count()
    proc = run(bins["guest"] / "test-barrier", nodes, 1, "migrate", env={"GGML_CPU_NUMA_DEBUG": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"node-aware barrier over {nodes} nodes" in proc.stderr
    assert "n_steps: 256" in proc.stderr
    assert "read before they were written" not in proc.stderr


BALANCING = Path("/proc/sys/kernel/numa_balancing")


@contextmanager
def numa_balancing_off() -> Iterator[None]:
    """Automatic NUMA balancing off for a check of where pages are, and back as it was.

    test-cpu-numa also computes each product the stock way, where a node's threads read the other node's rows:
    balancing may then migrate a page (a CI run saw 511 pages of one 2 MiB run of slab 0 go to node 1 after
    placement put them on node 0). That is the kernel acting on a later access, not placement; the page check asks
    what placement did. The guests' Debian kernel has balancing on."""
    old = BALANCING.read_text() if BALANCING.exists() and os.access(BALANCING, os.W_OK) else None
    if old is not None and old.strip() != "0":
        BALANCING.write_text("0")
    try:
        yield  # not root on a multi-node host: as the machine is
    finally:
        if old is not None and old.strip() != "0":
            BALANCING.write_text(old)


@pytest.mark.numa_guest
@pytest.mark.parametrize(
    "extra", [0, pytest.param(-1, marks=pytest.mark.nodes4)], ids=["threads=nodes", "threads=2*nodes-1"]
)
def test_node_local_kernels_are_bitwise_stock(bins: dict[str, Path], extra: int) -> None:
    """Every matmul path (sse42 build): node-local output == stock split output, and every slab page on plan.

    The results of every path, over 1 to 8 virtual nodes and many more shapes, are tested on the host
    (test_prop_kernels.py); here the kernel (move_pages) checks the pages of the 31 weights.

    One of them (36 MiB of F32, in a buffer of its own mapping) is backed by transparent huge pages where the
    guest allows them (THP "always", the Debian default): its slab boundaries fall inside huge pages, which must be
    laid out again in base pages so that every base page of each slab is on its node. Before that fix: 133 of its
    9214 slab pages off plan at 2 nodes."""
    nodes = node_count()
    threads = nodes if extra == 0 else 2 * nodes - 1
    with numa_balancing_off():
        proc = run(bins["guest"] / "test-cpu-numa", threads)
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert re.search(rf"on {nodes} node\(s\) \[[0-9,]+\]: pages placed and checked", proc.stdout), proc.stdout[:500]
    assert products_local(proc.stdout) >= 31
    assert cases_passed(proc.stdout) == (31, 31)
    assert "FAIL" not in proc.stdout and "DIFFERENT" not in proc.stdout
    huge = re.search(r"huge pages\s+bitwise equal, pages on plan (\d+)/(\d+)", proc.stdout)
    assert huge and huge.group(1) == huge.group(2) != "0", proc.stdout[-3000:]
    kb = re.search(r"(\d+) kB of the weight's buffer in huge pages before placement", proc.stdout)
    assert kb, proc.stdout[-2000:]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert int(kb.group(1)) > 0, "no huge page backed the weight: the case would check nothing more"


@pytest.mark.numa_guest
def test_node_local_repack_and_tiled_kernels(bins: dict[str, Path]) -> None:
    """The AVX2 build: the repacked weights (Q4_0, Q4_K; anonymous memory) placed on their nodes, node-local and
    bitwise stock.

    Each node's team converts src1 into its own work buffer, bound to the node: the kernel (numa_maps) puts every
    page of the barrier's counters and of the work buffers on its node (the weights' pages are asked of move_pages).
    The AVX2 build runs some 30 times slower than sse42 under TCG: only the 10 repacked cases (and two more) run; the
    results of the repack, tiled and llamafile paths are tested on the host (test_prop_kernels.py).
    """
    nodes = node_count()
    # the 10 repacked cases, and two that convert src1 per node on every node (the repack kernels convert src1
    # themselves), so that numa_maps shows a bound src1 buffer on each node
    cases = [f"{t}:512:640:0:0:{n}:repack" for t in ("q4_0", "q4_K") for n in (1, 5, 40)]
    cases += [f"{t}:256:384:4:2:{n}:repack" for t in ("q4_0", "q4_K") for n in (1, 9)]
    cases += ["q4_K:512:640:0:0:40", "f16:512:640:0:0:40"]  # last: the largest src1 (40 tokens x 1 KiB of F16)
    args = [a for c in cases for a in ("--case", c)]
    with numa_balancing_off():
        proc = run(bins["guest-avx2"] / "test-cpu-numa", nodes, *args, env={"GGML_CPU_NUMA_DEBUG": "2"})
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert cases_passed(proc.stdout) == (12, 12)
    repacked = [line for line in proc.stdout.splitlines() if " repack " in line and "bitwise equal" in line]
    assert len(repacked) == 10, proc.stdout  # q4_0 and q4_K, 3 mul_mat + 2 mul_mat_id each
    work = re.search(rf"work buffers of (\d+) bytes on each of {nodes} nodes", proc.stderr)
    assert work and int(work.group(1)) > 0, proc.stderr[-2000:]
    mappings, pages, off = bound_pages(proc.stdout)
    assert off == 0 and mappings >= 2 * nodes and pages > 0, (mappings, pages, off)


@pytest.mark.numa_guest
def test_backend_ops_with_migrate(bins: dict[str, Path]) -> None:
    """test-backend-ops -b CPU --numa migrate (every tensor of a case counts as a weight): the products whose
    weights split over the nodes, placed in base pages, against the CPU reference implementation."""
    nodes = node_count()
    exe = bins["guest"] / "test-backend-ops"
    proc = subprocess.run(
        [
            *THP_OFF,
            str(exe),
            "-b",
            "CPU",
            "--numa",
            "migrate",
            "-t",
            str(nodes),
            "-o",
            "MUL_MAT,MUL_MAT_ID",
            "-p",
            BACKEND_OPS_GUEST,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "GGML_CPU_NUMA_DEBUG": "1"},
    )
    assert proc.returncode == 0, failure(proc.stdout, proc.stderr)
    assert backend_ops_passed(proc.stdout) == 16
    placed = re.findall(r"so far (\d+) pages: (\d+) in place, (\d+) moved, (\d+) failed", proc.stderr)
    assert placed, proc.stderr[-2000:]
    pages, in_place, moved, failed = map(int, placed[-1])
    assert failed == 0 and moved > 0 and in_place + moved > pages // 2, placed[-1]


BARRIER_STATS = """
import json
from llama_cpp import Llama
from numa_llama import hooks
llm = Llama({model!r}, numa="migrate", n_threads={threads}, n_ctx=64, verbose=False)
llm.create_completion("Paris is", max_tokens=2, temperature=0.0)
untimed = [[w.waits, w.wait_ns] for w in hooks.barrier_stats({threads}, reset=True)]  # asking starts the clock
llm.create_completion("Rome is", max_tokens=4, temperature=0.0)
timed = [[w.waits, w.wait_ns] for w in hooks.barrier_stats({threads})]
print(json.dumps({{"untimed": untimed, "timed": timed}}))
"""


@pytest.mark.numa_guest
def test_every_thread_waits_in_the_node_aware_barrier(synthetic_model: Path) -> None:
    """A model under migrate: the barrier counts every thread's waits, and times them once a tool has asked for
    its statistics (before that it reads no clock: the wait times are 0)."""
    threads = node_count()
    out = run_json(BARRIER_STATS.format(model=str(synthetic_model), threads=threads))
    untimed, stats = out["untimed"], out["timed"]
    assert len(untimed) == len(stats) == threads
    assert all(waits > 100 and ns == 0 for waits, ns in untimed), untimed
    assert all(waits > 100 and ns > 0 for waits, ns in stats), stats


@pytest.mark.model
def test_no_barrier_statistics_where_the_stock_barrier_runs(model_path: Path) -> None:
    """One node (or another strategy): the stock barrier runs, and the hook says nobody waited in ours."""
    if node_count() >= 2:
        pytest.skip("this host has several nodes: the node-aware barrier runs here")
    out = run_json(BARRIER_STATS.format(model=str(model_path), threads=2))
    assert out == {"untimed": [[0, 0], [0, 0]], "timed": [[0, 0], [0, 0]]}
