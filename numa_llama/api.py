"""The Python API: ``topology()``, ``placement(llm)``, ``locality(llm)`` and ``stats(llm)``.

Every answer about where memory is comes from the kernel (``move_pages`` as a
query, through :mod:`numa_llama.kernel`); the series is asked only what it
*meant* to do (its plan and its counters, through :mod:`numa_llama.hooks`).
On a one-node machine they all work and give the boring answers: everything
on node 0, locality 1.0, nothing moved.

llama.cpp keeps its NUMA state per process: ``placement`` and ``stats``
describe every weight placed in this process, which is ``llm``'s as long as it
is the only model loaded.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from numa_llama import hooks, kernel, sysfs
from numa_llama._build import require_patched_llama_cpp
from numa_llama.decode import Locality, Weight, decode_locality, mapped_weights, weights_locality

if TYPE_CHECKING:
    from llama_cpp import Llama

require_patched_llama_cpp()  # StockLlamaCppError, saying how to fix it, before anything is asked of llama_cpp

BOUNDARY = -1  # intended node of a page that no slab holds whole (it straddles two, or holds a tensor's edge)


def topology() -> sysfs.Topology:
    """Nodes, their CPUs, memory and distances, and which of them this process may use."""
    return sysfs.read_topology()


@dataclass(frozen=True)
class SlabPlan:
    node: int
    row_begin: int
    row_end: int
    nbytes: int  # over all matrices of the tensor


@dataclass(frozen=True)
class TensorPlacement:
    """One weight tensor: its plan (if the series placed it) and, per base page, the kernel's answer."""

    name: str
    address: int
    nbytes: int
    slabs: tuple[SlabPlan, ...]  # empty: not placed (another strategy, or one node)
    page_bytes: int  # base page size, the unit of ``intended``/``actual``
    intended: tuple[int, ...]  # per base page: the slab's node, BOUNDARY, or BOUNDARY for every page if not placed
    actual: tuple[int, ...]  # per base page: the kernel's node, or -errno (-ENOENT: not present, see page_nodes)

    @property
    def pages(self) -> int:
        return len(self.actual)

    @property
    def pages_off_plan(self) -> int:
        """Pages that a slab holds whole but the kernel has elsewhere (or cannot map: any errno but ENOENT)."""
        return sum(
            1
            for want, got in zip(self.intended, self.actual, strict=True)
            if want >= 0 and got != want and got != -errno.ENOENT
        )

    @property
    def pages_not_present(self) -> int:
        """Pages that a slab holds whole and the kernel reports as not present (``-ENOENT``: never touched, or see
        ``kernel.page_nodes``): the query names no node for them, so they are not counted off plan."""
        return sum(
            1 for want, got in zip(self.intended, self.actual, strict=True) if want >= 0 and got == -errno.ENOENT
        )

    @property
    def pages_boundary(self) -> int:
        return sum(1 for want in self.intended if want == BOUNDARY) if self.slabs else 0

    def pages_per_node(self) -> dict[int, int]:
        return dict(sorted(Counter(self.actual).items()))


def _intended(p: hooks.Placement, base_page: int) -> tuple[int, ...]:
    first = p.data // base_page * base_page
    n = -(-(p.data + p.nbytes - first) // base_page)
    want = [BOUNDARY] * n
    for node, pages in p.slab_pages():
        for a in pages:
            want[(a - first) // base_page] = node
    return tuple(want)


def placement(llm: Llama | None = None) -> list[TensorPlacement]:
    """Per weight tensor: bytes, the intended node per slab, the kernel's node per page, pages off plan.

    Under ``--numa migrate`` on several nodes these are the weights the series
    placed. Otherwise (one node, another strategy) nothing was placed: for a
    model loaded with mmap, its weights are found in the mapping and reported
    with the kernel's answers and no plan; without mmap the list is empty.
    """
    base_page = kernel.page_size()
    out: list[TensorPlacement] = []
    placed = hooks.placements() if hooks.has_hook("ggml_backend_cpu_numa_placement") else []
    for p in placed:
        first = p.data // base_page * base_page
        addrs = list(range(first, p.data + p.nbytes, base_page))
        slabs = tuple(
            SlabPlan(s.node, s.row_begin, s.row_end, (s.row_end - s.row_begin) * p.row_bytes * p.n_matrices)
            for s in p.slabs
        )
        out.append(
            TensorPlacement(
                p.name, p.data, p.nbytes, slabs, base_page, _intended(p, base_page), tuple(kernel.page_nodes(addrs))
            )
        )
    if placed or llm is None or not _mmapped(llm):
        return out
    for w in mapped_weights(llm.model_path):
        nbytes = w.n_rows * w.row_bytes * w.n_matrices
        first = w.address // base_page * base_page
        addrs = list(range(first, w.address + nbytes, base_page))
        out.append(
            TensorPlacement(
                w.name, w.address, nbytes, (), base_page, (BOUNDARY,) * len(addrs), tuple(kernel.page_nodes(addrs))
            )
        )
    return out


def _mmapped(llm: Llama) -> bool:
    """Whether llm's model file is mapped in this process (load_mode mmap, and the file really in the mapping)."""
    import llama_cpp  # noqa: PLC0415

    if llm.model_params.load_mode not in (llama_cpp.LLAMA_LOAD_MODE_MMAP, llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK):
        return False
    path = os.path.realpath(llm.model_path)
    with open("/proc/self/maps") as maps:
        return any(line.rstrip("\n").endswith(" " + path) for line in maps)


def _strategy_name(llm: Llama) -> str:
    import llama_cpp  # noqa: PLC0415

    names = {v: k for k, v in llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_NAMES.items()}
    return names.get(int(llm.numa), "off")


def locality(llm: Llama) -> Locality:
    """Of the matmul weight bytes each thread reads for one decode step, the fraction on its own node.

    From the kernel's page answers and the thread layout: under ``migrate`` the
    series' layout and split plan; under ``distribute`` ggml's stock layout
    (thread i on node i mod N) and row chunks. On one node every thread and
    every page is on node 0. Other strategies leave threads unpinned on
    several nodes, so the question has no answer there (ValueError).
    """
    n_threads = int(llm.context_params.n_threads)
    strategy = _strategy_name(llm)
    nodes = sysfs.read_topology().node_ids
    if len(nodes) == 1:
        strategy = "distribute"  # one node: every strategy is "thread i on node 0, stock chunks", nothing placed
    if strategy not in ("migrate", "distribute"):
        raise ValueError(
            f"locality: numa={strategy!r} does not pin threads to nodes on this {len(nodes)}-node "
            "machine, so which node reads which row is not defined; use migrate or distribute"
        )
    if _mmapped(llm):
        return decode_locality(llm.model_path, strategy, n_threads)
    if strategy != "migrate" or not hooks.placements():
        raise ValueError(
            "locality: the model is not mmap'd and no weight was placed, so its weights cannot be "
            "found; load it with use_mmap=True"
        )
    return _placed_locality(n_threads)


def _placed_locality(n_threads: int) -> Locality:
    """decode_locality for migrate from the placed weights (no mmap: the series' records give the addresses)."""
    weights = [(Weight(p.name, p.data, p.n_rows, p.row_bytes, p.n_matrices), p.slabs) for p in hooks.placements()]
    return weights_locality("migrate", tuple(hooks.layout(n_threads)), weights)


@dataclass(frozen=True)
class Stats:
    tensors: int
    pages: int
    pages_in_place: int
    pages_moved: int
    pages_failed: int
    pages_boundary: int
    failed: dict[str, int]  # reason -> pages (eacces, ebusy, enomem, cpuset, other)
    barrier_wait_ns: tuple[int, ...]  # per compute thread
    barrier_waits: tuple[int, ...]
    virtual_nodes: int = 0  # GGML_CPU_NUMA_VIRTUAL: node-local kernels ran over made-up nodes; nothing was placed
    not_placed: str = ""  # why migrate placed nothing ("": it places), in words (hooks.NOT_PLACED)
    place_seconds: float = 0.0  # wall time spent moving pages, all nodes at once
    not_node_local: tuple[tuple[str, str], ...] = ()  # (weight, buffer type) no node-local kernel multiplies (AMX)

    @property
    def pages_per_second(self) -> float | None:
        """Weight pages placed (asked, and moved where needed) per second of placement; None before any."""
        return self.pages / self.place_seconds if self.place_seconds > 0 else None


def stats(llm: Llama | None = None, n_threads: int | None = None) -> Stats:
    """Pages placed, failed and already in place, and the barrier wait per thread (zeros where nothing ran).

    Needs a CPU backend built with the series; on one node, or another
    strategy, every count is zero.
    """
    if n_threads is None:
        n_threads = int(llm.context_params.n_threads) if llm is not None else os.cpu_count() or 1
    st = hooks.stats()
    waits = hooks.barrier_stats(n_threads)
    return Stats(
        st["tensors"],
        st["pages"],
        st["pages_in_place"],
        st["pages_moved"],
        st["pages_failed"],
        st["pages_boundary"],
        {k.removeprefix("failed_"): v for k, v in st.items() if k.startswith("failed_")},
        tuple(w.wait_ns for w in waits),
        tuple(w.waits for w in waits),
        st["virtual_nodes"],
        hooks.NOT_PLACED.get(st["not_placed"], f"reason {st['not_placed']}"),
        st["place_ns"] / 1e9,
        tuple(hooks.not_local()),
    )
