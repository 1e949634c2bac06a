"""The real model under a virtual 2-, 3- and 4-node topology on this one-node host: logits bitwise those of off.

On one real node, ``migrate`` runs the same code as ``off``, so a comparison
of the two proves nothing about the node-local paths. Under
``GGML_CPU_NUMA_VIRTUAL=N`` the CPU backend lays its threads out over N
virtual nodes: every weight's rows are split by the plan and multiplied node by
node (generic, repack, llamafile sgemm teams), src1 is converted per node and
the node-aware barrier runs, while no page is placed. The worker reports what
ran (the virtual node count, the thread layout, the waits in the node-aware
barrier), so this test fails if the virtual topology did nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_prop_results import Worker

pytestmark = pytest.mark.model

MAX_THREADS = 8  # on 2 cores
# (threads, batch): 1 to 4 threads per node, thread counts that are not a multiple of the node count, a decode
# batch (one token: the gemv paths) and prompt batches (the repack gemm and llamafile sgemm paths)
CASES = {
    2: [(2, 1), (2, 16), (3, 16), (4, 16), (6, 5), (8, 64)],
    3: [(3, 1), (3, 16), (4, 16), (6, 16), (7, 5)],
    4: [(4, 1), (4, 16), (5, 16), (8, 16)],
}
TOKENS = 24


@pytest.fixture(scope="module")
def reference(model_path: Path):
    w = Worker(model_path, "off", True)
    yield w
    w.close()


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "no-mmap"])
@pytest.mark.parametrize("nodes", sorted(CASES), ids=lambda n: f"{n}-virtual-nodes")
def test_logits_under_a_virtual_topology_are_bitwise_those_of_numa_off(
    model_path: Path, reference: Worker, nodes: int, use_mmap: bool
) -> None:
    """Why it must hold: the node-local paths change which thread multiplies a row and where src1 is converted,
    never the sums a row's dot product adds up; one logit off is a row computed twice, skipped or mixed up."""
    virt = Worker(model_path, "migrate", use_mmap, env={"GGML_CPU_NUMA_VIRTUAL": str(nodes)})
    try:
        for threads, batch in CASES[nodes]:
            assert threads <= MAX_THREADS
            got = virt.ask(threads, batch, 40, TOKENS)
            want = reference.ask(threads, batch, 40, TOKENS)
            assert got["virtual_nodes"] == nodes, got
            assert sorted(set(got["layout"])) == list(range(nodes)), got["layout"]
            assert len(got["barrier_waits"]) == threads and min(got["barrier_waits"]) > 0, got["barrier_waits"]
            assert got["sha256"] == want["sha256"], (nodes, threads, batch)
            print(
                f"virtual {nodes} nodes, mmap={use_mmap}, {threads} threads (layout {got['layout']}), "
                f"batch {batch}: logits sha256 {got['sha256'][:16]} as off "
                f"({got['eval_s']:.1f} s + {want['eval_s']:.1f} s)"
            )
    finally:
        virt.close()
