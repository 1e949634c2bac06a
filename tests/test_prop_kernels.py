"""Every node-local matmul kernel, at native speed on this one-node host, under a virtual topology.

``GGML_CPU_NUMA_VIRTUAL=N`` (the series) makes the CPU backend lay its threads
out over N made-up nodes of the CPUs that exist, so that the split plan, the
node-local generic, repack, tiled and ``mul_mat_id`` paths, the llamafile sgemm
teams, src1 per node and the node-aware barrier all run here, with no page
placed. ``GGML_CPU_NUMA_WEIGHTS`` gives each node its own number of threads.

Each example is one run of llama.cpp's ``test-cpu-numa`` (the series' harness,
linked to the built ggml) on one drawn case: it computes the product once as a
weight (node-local rows) and once unmarked (the stock split), with the same
kernels in the same process, and compares the outputs byte for byte. Bitwise is
the right bar: each output element is one row's dot product (generic, repack,
tiled) or one tile element of sgemm, whose order of summation over K does not
depend on which thread or node computes it.

A hang is a failure: each run has a time limit. The draws run through the
``sse42`` and ``haswell`` CPU variants and the best one whose probe executes
here (all native): sse42 has no repack, tiled or llamafile kernels.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import ggml_tests
import pytest
from conftest import ROOT
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from numa_llama import hooks

FLAVORS = {"sse42": "guest", "haswell": "guest-avx2", "best": "best"}  # best: zen4 or sapphirerapids, say
MAX_THREADS = 8  # on 2 cores: more threads than CPUs, and virtual nodes share CPUs
TIME_LIMIT_S = float(os.environ.get("NUMA_LLAMA_CASE_TIMEOUT", "60"))  # a case takes < 1 s here; past this it hangs
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
# examples per property and variant (x2 variants): ci 150 + 80 (about 40 s), default 40 + 20
MUL_MAT_EXAMPLES = {"ci": 150, "expensive": 1500}.get(PROFILE, 40)
MUL_MAT_ID_EXAMPLES = {"ci": 80, "expensive": 800}.get(PROFILE, 20)
OTHER_THREADS_EXAMPLES = {"ci": 50, "expensive": 500}.get(PROFILE, 15)

TYPES_32 = ["f32", "f16", "bf16", "q4_0", "q8_0", "iq4_nl"]  # blocks of 1 or 32 values
TYPES_256 = ["q4_K", "q6_K"]  # blocks of 256
REPACKED = ["q4_0", "q8_0", "iq4_nl", "q4_K"]  # the types the CPU_REPACK buffer takes (AVX2 and up)
ODD_VOCABULARIES = [32001, 50257, 151936]
ROUTER_ROWS = [8, 16, 24, 32, 64, 96, 128]


@pytest.fixture(scope="module", params=sorted(FLAVORS))
def harness(request: pytest.FixtureRequest) -> Path:
    bin_dir = ggml_tests.build_tests(
        ROOT / "vendor" / "llama.cpp", FLAVORS[request.param], ["test-cpu-numa"], log=lambda _: None
    )
    return bin_dir / "test-cpu-numa"


@st.composite
def layouts(draw: st.DrawFn) -> list[int]:
    """Threads per virtual node: 1 to 8 nodes, uneven, nodes with one thread, at most 8 threads in all."""
    nodes = draw(st.integers(1, MAX_THREADS))
    counts = [1] * nodes
    for _ in range(draw(st.integers(0, MAX_THREADS - nodes))):
        counts[draw(st.integers(0, nodes - 1))] += 1
    return counts


@st.composite
def mul_mat_cases(draw: st.DrawFn) -> str:
    typ = draw(st.sampled_from(TYPES_32 + TYPES_256))
    block = 256 if typ in TYPES_256 else 32
    rows = draw(st.one_of(st.sampled_from(ROUTER_ROWS), st.integers(8, 1100), st.sampled_from(ODD_VOCABULARIES)))
    big = rows > 4096
    k = block * draw(st.integers(1, 1 if big else 4))
    tokens = draw(st.sampled_from([1, 2, 9] if big else [1, 2, 9, 512]))
    if tokens == 512:
        rows = min(rows, 256)
    repack = typ in REPACKED and draw(st.booleans())
    return f"{typ}:{k}:{rows}:0:0:{tokens}" + (":repack" if repack else "")


@st.composite
def mul_mat_id_cases(draw: st.DrawFn) -> str:
    typ = draw(st.sampled_from(TYPES_32 + TYPES_256))
    block = 256 if typ in TYPES_256 else 32
    experts = draw(st.sampled_from([2, 4, 8, 32, 128]))
    used = draw(st.integers(1, min(8, experts)))
    rows = draw(st.one_of(st.sampled_from(ROUTER_ROWS), st.integers(8, 520)))
    k = block * draw(st.integers(1, 2))
    tokens = draw(st.sampled_from([1, 2, 9, 33]))
    repack = typ in REPACKED and draw(st.booleans())
    return f"{typ}:{k}:{rows}:{experts}:{used}:{tokens}" + (":repack" if repack else "")


def run_case(exe: Path, counts: list[int], case: str, threads: int | None = None) -> None:
    """One case in its own process under the virtual topology: bitwise equal to the stock split, within the limit.

    The nodes' weights are ``counts``; ``threads`` (default: their sum, one thread per unit of weight) is the
    thread count, shared among the nodes by those weights.
    """
    per_node = counts
    if threads is None:
        threads = sum(counts)
    else:
        ids, weights = list(range(len(counts))), [float(c) for c in counts]
        per_node = list(hooks.plan(threads, ids, weights, 1, 1, 0, 4096).threads)
    env = {**os.environ, "GGML_CPU_NUMA_VIRTUAL": str(len(counts)), "GGML_CPU_NUMA_WEIGHTS": ",".join(map(str, counts))}
    env.pop("GGML_CPU_NUMA_DEBUG", None)
    note(
        f"GGML_CPU_NUMA_VIRTUAL={len(counts)} GGML_CPU_NUMA_WEIGHTS={env['GGML_CPU_NUMA_WEIGHTS']} "
        f"{exe} {threads} --case {case}"
    )
    try:
        proc = subprocess.run(
            [str(exe), str(threads), "--case", case], capture_output=True, text=True, timeout=TIME_LIMIT_S, env=env
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(
            f"hung: no result within {TIME_LIMIT_S:.0f} s ({case}, threads per node {counts}); "
            f"it printed: {out[-1500:]}"
        )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-2500:]}\n{proc.stderr[-1500:]}"
    # the layout the backend used is the one drawn
    expect = ",".join(str(node) for node, c in enumerate(per_node) for _ in range(c))
    with_threads = sum(1 for c in per_node if c > 0)
    if len(counts) > 1 and with_threads > 1:
        assert f"on {with_threads} node(s) [{expect}]: virtual nodes" in out, out[-2000:]
    elif len(counts) > 1:  # the harness names one node with threads so; the kernels still take the plan's rows
        assert f"on 1 node(s) [{expect}]: one node" in out, out[-2000:]
    else:
        assert "one node: both runs take the stock path" in out, out[-2000:]
    if "not applicable" in out:
        return  # the repack buffer does not take this type on this variant: nothing was computed
    assert re.search(r"test-cpu-numa: 1/1 cases passed", out), out[-2000:]
    assert "bitwise equal" in out and "DIFFERENT" not in out, out[-2000:]


@settings(max_examples=MUL_MAT_EXAMPLES)
@given(counts=layouts(), case=mul_mat_cases())
@example(counts=[1, 1, 1, 1], case="f32:256:128:0:0:9")  # a 128-row router on 4 nodes: slabs 64/0/64/0
@example(counts=[1, 1, 1, 1], case="f16:64:32001:0:0:9")  # an odd vocabulary on 4 nodes
@example(counts=[3, 1, 2], case="q4_0:64:50257:0:0:2")
def test_mul_mat_node_local_is_bitwise_stock(harness: Path, counts: list[int], case: str) -> None:
    """mul_mat of a weight under any virtual layout gives the stock split's output, byte for byte."""
    run_case(harness, counts, case)


@settings(max_examples=MUL_MAT_ID_EXAMPLES)
@given(counts=layouts(), case=mul_mat_id_cases())
@example(counts=[1, 1, 1, 1], case="f32:64:128:128:8:9")  # 128 experts, top-8
@example(counts=[2, 1, 1], case="q4_K:256:96:8:2:33:repack")
def test_mul_mat_id_node_local_is_bitwise_stock(harness: Path, counts: list[int], case: str) -> None:
    """mul_mat_id (MoE, top-k routing) under any virtual layout gives the stock split's output, byte for byte."""
    run_case(harness, counts, case)


@settings(max_examples=OTHER_THREADS_EXAMPLES)
@given(counts=layouts(), threads=st.integers(1, MAX_THREADS), case=st.one_of(mul_mat_cases(), mul_mat_id_cases()))
@example(counts=[2, 2], threads=3, case="q4_K:256:640:0:0:1")  # n_threads 3 beside n_threads_batch 4
@example(counts=[1, 1, 1, 1], threads=2, case="f32:256:128:0:0:9")  # nodes without threads: their slabs adopted
@example(counts=[1, 1, 1, 1], threads=1, case="q4_0:64:96:8:2:9:repack")
@example(counts=[1, 3], threads=1, case="f16:64:32001:0:0:2")
def test_another_thread_count_on_the_same_plan_is_bitwise_stock(
    harness: Path, counts: list[int], threads: int, case: str
) -> None:
    """The plan follows the nodes' weights, not the thread count: with any count (fewer threads than nodes too,
    where a node without threads leaves its slab to a neighbour) every product is the stock split's, byte for byte.
    """
    run_case(harness, counts, case, threads)
