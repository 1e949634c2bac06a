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
from numa_llama.decode import Locality, Weight, mapped_weights, weights_locality

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
    # the weights the graph multiplies by, wherever they are: the file mapping, ggml's buffer without mmap, or a
    # repacked copy (CPU_REPACK multiplies by that, not by the file's pages)
    weights = graph_weights(llm)
    if strategy == "migrate":
        plans = {p.data: p.slabs for p in hooks.placements()}
        if not plans:
            raise ValueError(
                "locality: migrate placed no weight here (stats().not_placed says why), so no thread has a plan"
            )
        return weights_locality("migrate", tuple(hooks.layout(n_threads)), [(w, plans.get(w.address)) for w in weights])
    thread_node = tuple(nodes[i % len(nodes)] for i in range(n_threads))  # stock: thread i on node i mod N
    return weights_locality("distribute", thread_node, [(w, None) for w in weights])


def graph_weights(llm: Llama) -> list[Weight]:
    """The weights that one decode step's matrix products read, wherever ggml keeps them.

    A second, small context on ``llm``'s model decodes one token with an eval callback
    (``cb_eval``, ggml's scheduler hook) that records ``src[0]`` of every ``MUL_MAT`` and
    ``MUL_MAT_ID`` node: the weight's name, address and shape. That finds weights that no file
    mapping shows: loaded without mmap into ggml's own buffer, or repacked (``CPU_REPACK``). The
    callback asks for no tensor, so the graph runs as it does without it.
    """
    import ctypes  # noqa: PLC0415

    import llama_cpp  # noqa: PLC0415

    from numa_llama.kernel import ffi, lib  # noqa: PLC0415

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 16
    params.n_threads = params.n_threads_batch = int(llm.context_params.n_threads)
    callback = int(ffi.cast("uintptr_t", ffi.addressof(lib, "nl_matmul_weights_cb")))
    params.cb_eval = ctypes.cast(callback, llama_cpp.ggml_backend_sched_eval_callback)
    lib.nl_matmul_weights_reset()
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise ValueError("locality: llama.cpp could not make a second context to find the weights")
    try:
        token = (llama_cpp.llama_token * 1)(llm.token_bos() if llm.token_bos() >= 0 else 0)
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token, 1))
        if rc != 0:
            raise ValueError(f"locality: decoding one token to find the weights failed (llama_decode: {rc})")
    finally:
        llama_cpp.llama_free(ctx)
    out: list[Weight] = []
    name = ffi.new("char[]", 128)
    data = ffi.new("uintptr_t *")
    ne = ffi.new("int64_t[4]")
    nb = ffi.new("size_t[4]")
    while (rv := lib.nl_matmul_weight(len(out), name, 128, data, ne, nb)) == 1:
        out.append(Weight(ffi.string(name).decode(), int(data[0]), int(ne[1]), int(nb[1]), int(ne[2])))
    if rv < 0:
        raise ValueError("locality: the graph multiplies by more weights than numa_llama records (8192)")
    if not out:
        raise ValueError("locality: the decode graph multiplied by no weight")
    return out


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
    huge_pages_split: int = 0  # transparent huge pages that held rows of two nodes, laid out again in base pages

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
        st["huge_pages_split"],
    )
