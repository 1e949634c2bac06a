"""Properties of the split plan, asked of the library's own code (the ``ggml_backend_cpu_numa_plan`` hook).

The hook takes the topology as arguments, so any node count, node numbering,
node weights and thread count can be tried on a one-node host. The checks
below are written from the plan's contract, not from its code: they solve
the page alignment with Python's modular inverse where the library uses an
extended Euclid, and they know nothing of its rounding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
from hypothesis import assume, example, find, given
from hypothesis import strategies as st

from numa_llama import hooks

ROW_GROUP = 64  # the repack/tiled kernels' row unit that every slab boundary must respect
GGML_MEM_ALIGN = 32  # ggml aligns every tensor's data to this
# (ggml type id, name): the types llama.cpp's CPU kernels multiply weights in
TYPES = [(0, "f32"), (1, "f16"), (2, "q4_0"), (8, "q8_0"), (10, "q2_K"), (12, "q4_K"), (14, "q6_K"), (30, "bf16")]
# the unit a weight is planned in: base pages of x86 (4 KiB) and of arm64 kernels (16 and 64 KiB; the series plans
# in base pages, for ggml's own buffers too: tests/test_prop_units.py), and a 2 MiB unit, the contract holding for any
PAGES = [4096, 16384, 65536, 2 * 1024 * 1024]


@dataclass(frozen=True)
class Case:
    n_threads: int
    node_ids: tuple[int, ...]
    weights: tuple[float, ...]
    type_id: int
    ne0: int
    n_rows: int
    data: int
    page: int

    @property
    def row_bytes(self) -> int:
        return hooks.row_bytes(self.type_id, self.ne0)


@st.composite
def cases(draw: st.DrawFn, max_nodes: int = 8) -> Case:
    n_nodes = draw(st.integers(1, max_nodes))
    node_ids = tuple(sorted(draw(st.sets(st.integers(0, 63), min_size=n_nodes, max_size=n_nodes))))  # holes
    weights = tuple(
        draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 7.5]), min_size=n_nodes, max_size=n_nodes))
    )
    assume(sum(weights) > 0)
    type_id, _ = draw(st.sampled_from(TYPES))
    ne0 = hooks.type_block(type_id) * draw(st.integers(1, 48))
    n_rows = draw(st.integers(1, 40_000))
    page = draw(st.sampled_from(PAGES))
    data = 0x7F00_0000_0000 + draw(st.integers(0, 4 * 1024 * 1024 // GGML_MEM_ALIGN)) * GGML_MEM_ALIGN
    return Case(draw(st.integers(1, 96)), node_ids, weights, type_id, ne0, n_rows, data, page)


def first_aligned_row(row_bytes: int, data: int, page: int) -> int | None:
    """The smallest multiple r of ROW_GROUP with data + r*row_bytes on a page boundary (None: there is none)."""
    a, b, m = ROW_GROUP * row_bytes % page, -data % page, page
    g = math.gcd(a, m) if a else m
    if b % g:
        return None
    if m // g == 1:
        return 0
    q = (b // g) * pow(a // g, -1, m // g) % (m // g)
    return ROW_GROUP * q


def effective_weights(weights: tuple[float, ...]) -> list[float]:
    """The weights the library uses: past the first MAX_SLABS nodes with a weight, nodes get none."""
    eff, seen = [], 0
    for w in weights:
        seen += w > 0
        eff.append(w if seen <= hooks.MAX_SLABS else 0.0)
    return eff


def expected_threads(n_threads: int, weights: tuple[float, ...]) -> list[float]:
    """Each node's share of the threads, by weight."""
    eff = effective_weights(weights)
    return [n_threads * w / sum(eff) for w in eff]


def check_plan(c: Case, split: hooks.Split) -> None:
    """The plan's contract; raises AssertionError naming the clause that fails."""
    slabs = split.slabs
    # threads: all given out, each node within one thread of its weight's share (largest remainder)
    assert sum(split.threads) == c.n_threads, ("threads not all given out", split.threads)
    for got, want in zip(split.threads, expected_threads(c.n_threads, c.weights), strict=True):
        assert abs(got - want) < 1, ("thread share not proportional to the node weights", split.threads)
    # every row owned exactly once: slabs tile [0, n_rows) in order, one per node with a weight, whatever the
    # thread count (a node left without threads by a small count still owns its slab: placed once, for any count)
    eff = effective_weights(c.weights)
    weighted = [n for n, w in zip(c.node_ids, eff, strict=True) if w > 0]
    assert [s.node for s in slabs] == weighted, ("slab nodes", slabs)
    assert len(slabs) <= hooks.MAX_SLABS, ("more slabs than the struct holds", len(slabs))
    assert slabs[0].row_begin == 0 and slabs[-1].row_end == c.n_rows, ("rows not covered", slabs)
    for a, b in zip(slabs, slabs[1:], strict=False):
        assert a.row_end == b.row_begin, ("a row owned twice or never", slabs)
    assert all(s.row_begin <= s.row_end for s in slabs), ("a slab runs backwards", slabs)
    # boundaries: whole row groups always; page aligned whenever the rows allow an aligned grid
    rb = c.row_bytes
    per = c.page // math.gcd(c.page, rb)  # rows spanning a whole number of pages
    unit = math.lcm(ROW_GROUP, per)
    first = first_aligned_row(rb, c.data, c.page)
    aligned = first is not None and c.n_rows >= first + 2 * unit * len(slabs)
    step = unit if aligned else ROW_GROUP
    shares = [w for w in eff if w > 0]
    cum = 0.0
    for k, s in enumerate(slabs[:-1]):
        b = s.row_end
        if 0 < b < c.n_rows:
            assert b % ROW_GROUP == 0, ("boundary splits a row group", k, b)
            if aligned:
                assert (c.data + b * rb) % c.page == 0, ("boundary not page aligned", k, b)
        # shares: each boundary within half a grid step of the node's point proportional to the weights
        cum += shares[k]
        target = c.n_rows * cum / sum(shares)
        assert abs(b - target) <= step / 2 + 1, ("share not proportional to the weights", k, b, target, step)


def plan(c: Case) -> hooks.Split:
    return hooks.plan(c.n_threads, c.node_ids, c.weights, c.n_rows, c.row_bytes, c.data, c.page)


@given(cases())
@example(Case(4, (0, 1), (1.0, 1.0), 12, 640, 262144, 0x7F0000001000, 4096))  # gemma-3-270m's ffn, 2 nodes
@example(Case(3, (0, 2, 5), (1.0, 1.0, 1.0), 0, 64, 1000, 0x7F0000000000, 4096))  # holes in the node numbers
@example(Case(80, tuple(range(70)), (1.0,) * 70, 0, 64, 8192, 0x7F0000000000, 4096))  # more nodes than slabs
def test_split_plan_contract(c: Case) -> None:
    """Every row has exactly one owner, boundaries respect pages and row groups, shares follow the weights.

    Why it must hold: a row owned twice is multiplied twice (wrong results), a row owned never is not
    multiplied; a boundary inside a row group breaks the repacked kernels, one inside a page leaves that
    page on one node while the other reads it; shares unlike the weights leave one node's threads idle; and
    shares that followed the thread count would move pages each time llama.cpp switches between n_threads and
    n_threads_batch.
    """
    check_plan(c, plan(c))


def naive_split(c: Case) -> hooks.Split:
    """An equal split: n_rows / n_nodes rows each, threads likewise, ignoring weights, pages and row groups."""
    n = len(c.node_ids)
    threads = tuple(c.n_threads * (k + 1) // n - c.n_threads * k // n for k in range(n))
    bounds = [c.n_rows * k // n for k in range(n + 1)]
    return hooks.Split(tuple(hooks.Slab(c.node_ids[k], bounds[k], bounds[k + 1]) for k in range(n)), threads)


def _fails(check, c: Case, split: hooks.Split) -> bool:
    try:
        check(c, split)
    except AssertionError:
        return True
    return False


def test_the_contract_rejects_a_naive_equal_split() -> None:
    """The property has teeth: hypothesis finds an input where an equal split breaks it (printed, shrunk)."""
    bad = find(cases(max_nodes=4), lambda c: _fails(check_plan, c, naive_split(c)))
    print(f"naive equal split fails the plan contract on {bad}")
    with pytest.raises(AssertionError):
        check_plan(bad, naive_split(bad))
    check_plan(bad, plan(bad))  # while the library's plan holds there


@given(cases(max_nodes=4))
def test_split_plan_is_a_function_of_its_inputs(c: Case) -> None:
    """The same inputs give the same plan: placement and every product must agree on who owns a row."""
    assert plan(c) == plan(c)


@given(cases(max_nodes=4), st.integers(1, 96))
@example(Case(3, (0, 1), (2.0, 2.0), 12, 640, 262144, 0x7F0000001000, 4096), 4)  # n_threads 3, n_threads_batch 4
@example(Case(1, (0, 1, 2, 3), (1.0,) * 4, 0, 64, 128, 0x7F0000000000, 4096), 4)  # fewer threads than nodes
def test_the_slabs_do_not_depend_on_the_thread_count(c: Case, other_threads: int) -> None:
    """Two thread counts give the same slabs: a weight is placed once.

    Why it must hold: llama.cpp multiplies with n_threads for decode and n_threads_batch for prompts, and
    llama-cpp-python's defaults differ (cpu_count//2 and cpu_count). A plan that followed the thread count
    would re-place every weight at every switch, for as long as the server runs.
    """
    assert plan(dataclasses.replace(c, n_threads=other_threads)).slabs == plan(c).slabs
