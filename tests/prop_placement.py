"""Placement properties, run in a process of their own under ``--numa migrate`` (see test_prop_placement.py).

llama.cpp initialises NUMA once per process, so this file is a script, not a
test module: ``python prop_placement.py`` runs the hypothesis properties
below, prints what they checked, and exits non-zero with hypothesis's
falsifying (shrunk) example when one fails.

Weights are made with the cffi harness (``hooks.Weight``: a ggml tensor in a
CPU buffer marked WEIGHTS, as a model's are) and placed by the real path, a
mul_mat computed by the CPU backend. Where each page is comes from the
kernel's ``move_pages`` query.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys

PR_SET_THP_DISABLE = 41
# base pages, as in test-backend-ops' guest runs: THP would make the small weights' slabs share huge pages
ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)

import llama_cpp  # noqa: E402
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (the hypothesis profiles)

llama_cpp.llama_backend_init()
llama_cpp.llama_numa_init(llama_cpp.GGML_NUMA_STRATEGY_MIGRATE)

from numa_llama import hooks, kernel, sysfs  # noqa: E402

NODES = [n.id for n in sysfs.read_topology().compute_nodes()]
TYPES = [0, 1, 2, 8, 12, 14]  # f32 f16 q4_0 q8_0 q4_K q6_K
NAMES = ["blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.ffn_down.weight", "output.weight"]
checked = {"weights": 0, "pages": 0, "boundary_pages": 0}


def big_enough(shape: tuple[str, int, int, int, int]) -> bool:
    """At least 3 whole pages per node's slab: whether a slab holds a whole page then does not depend on the
    address the allocator hands out (which no example controls), so a failure replays."""
    _, type_id, ne0, ne1, _ = shape
    return hooks.row_bytes(type_id, ne0) * ne1 >= 4 * kernel.page_size() * len(NODES)


def shapes() -> st.SearchStrategy[tuple[str, int, int, int, int]]:
    """(name, type, ne0, ne1, ne2): a model's tensor names, rows of 1-32 blocks, 64-2048 rows, 1-2 experts."""
    return (
        st.tuples(
            st.sampled_from(NAMES), st.sampled_from(TYPES), st.integers(1, 32), st.integers(64, 2048), st.integers(1, 2)
        )
        .map(lambda t: (t[0], t[1], t[2] * hooks.type_block(t[1]), t[3], t[4]))
        .filter(big_enough)
    )


def thread_counts() -> st.SearchStrategy[int]:
    return st.integers(len(NODES), 3 * len(NODES))


def record_of(w: hooks.Weight) -> hooks.Placement | None:
    return next((p for p in hooks.placements() if p.data == w.data), None)


def assert_on_plan(w: hooks.Weight, n_threads: int) -> None:
    """The kernel reports every page of node k's slab on node k; the series' record matches the weight."""
    p = record_of(w)
    assert p is not None, f"{w.name} ({w.shape}) was multiplied with {n_threads} threads but never placed"
    assert (p.name, p.nbytes) == (w.name, w.nbytes), (p, w.name, n_threads)
    assert p.slabs == hooks.split_of(w.type_id, w.shape[0], w.shape[1], w.data), (p, "not this process's plan")
    off = []
    for node, pages in p.slab_pages():
        for addr, got in zip(pages, kernel.page_nodes(pages), strict=True):
            checked["pages"] += 1
            if got != node:
                off.append((hex(addr), node, got))
    assert not off, f"{w.name}: {len(off)} slab page(s) off plan (address, want, kernel says): {off[:5]}"
    st_ = hooks.stats()
    assert st_["pages"] == st_["pages_in_place"] + st_["pages_moved"] + st_["pages_failed"] + st_["pages_boundary"]
    checked["weights"] += 1


def make(shape: tuple[str, int, int, int, int]) -> hooks.Weight:
    name, type_id, ne0, ne1, ne2 = shape
    w = hooks.Weight(name, type_id, ne0, ne1, ne2)
    w.set(bytes([0x11]) * w.nbytes)
    # The heap hands back memory that earlier examples placed: every page starts on the first node, so each
    # example is the same whatever ran before, and every other node's slab has to move.
    # (Best effort: a page the kernel cannot move now, -EBUSY say, is left; placement has to move it anyway.)
    pages = [a for a, _ in kernel.page_spans(w.data, w.data + w.nbytes, kernel.page_size())]
    for _ in range(3):
        pages = [a for a, got in zip(pages, kernel.move_pages(pages, NODES[0]), strict=True) if got != NODES[0]]
        if not pages:
            break
    return w


def multiply(w: hooks.Weight, n_threads: int) -> None:
    w.mul(bytes(4 * w.shape[0] * w.shape[2]), 1, n_threads)  # one column: a decode step


@settings(max_examples=max(10, settings().max_examples // 10))
@given(shapes(), thread_counts())
def placement_follows_the_plan(shape: tuple[str, int, int, int, int], n_threads: int) -> None:
    """After a weight's first product, every page of node k's slab is on node k (boundary pages aside).

    Why it must hold: the node-local kernels have node k's threads read exactly node k's slab; a slab page
    elsewhere is read across the interconnect on every token.
    """
    w = make(shape)
    try:
        multiply(w, n_threads)
        note(
            f"{w.name}: type {hooks.type_name(shape[1])} {shape[2:]} threads {n_threads} layout "
            f"{hooks.layout(n_threads)}"
        )
        assert_on_plan(w, n_threads)
    finally:
        w.free()


class PlacementMachine(RuleBasedStateMachine):
    """Allocate, place, free, re-place and change the thread count; a plain dict is the model.

    Why it must hold: llama.cpp frees and reloads models in one process (memory reused at the same
    addresses), and the thread count changes between graphs (n_threads for decode, n_threads_batch for
    prompts); each weight must be on its plan whatever came before at its address, and a weight placed once
    is not placed again when another thread count multiplies it (no page asked or moved again).
    """

    weights = Bundle("weights")

    def __init__(self) -> None:
        super().__init__()
        # key -> (weight, threads it was last multiplied with); names repeat (a freed weight's name comes back,
        # maybe at the same address), as when a model is closed and loaded again
        self.live: dict[int, tuple[hooks.Weight, int | None]] = {}
        self.keys = itertools.count()

    @rule(target=weights, shape=shapes())
    def allocate(self, shape):
        key = next(self.keys)
        self.live[key] = (make(shape), None)
        return key

    @rule(key=weights, n_threads=thread_counts())
    def place(self, key, n_threads):
        if key in self.live:
            w, before = self.live[key]
            pages = hooks.stats()["pages"]
            multiply(w, n_threads)
            if before is not None:
                assert hooks.stats()["pages"] == pages, (
                    f"{w.name}: placed again when multiplied with {n_threads} threads after {before}"
                )
            self.live[key] = (w, n_threads)

    @rule(key=consumes(weights))
    def free(self, key):
        if key in self.live:
            w, _ = self.live.pop(key)
            w.free()

    @invariant()
    def every_placed_weight_is_on_plan(self):
        for w, n_threads in self.live.values():
            if n_threads is not None:
                assert_on_plan(w, n_threads)

    def teardown(self):
        for w, _ in self.live.values():
            w.free()


PlacementMachine.TestCase.settings = settings(max_examples=max(5, settings().max_examples // 20), stateful_step_count=8)


def main() -> int:
    print(
        f"placement properties: nodes {NODES}, GGML_CPU_NUMA_WEIGHTS={os.environ.get('GGML_CPU_NUMA_WEIGHTS')}, "
        f"profile {settings._current_profile}",
        flush=True,
    )
    if len(NODES) < 2:
        print("fewer than 2 nodes with CPUs: nothing is placed here", file=sys.stderr)
        return 2
    placement_follows_the_plan()
    print(
        f"placement_follows_the_plan: ok ({checked['weights']} weights, {checked['pages']} slab pages asked)",
        flush=True,
    )
    before = dict(checked)
    PlacementMachine.TestCase("runTest").runTest()
    print(
        f"PlacementMachine: ok ({checked['weights'] - before['weights']} weight checks, "
        f"{checked['pages'] - before['pages']} slab pages asked)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
