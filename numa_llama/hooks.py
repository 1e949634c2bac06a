"""The patch series' hooks (``ggml_backend_cpu_numa_*``) and the kernel's page query, through ctypes.

The hooks are reached the way the series hands them out: the CPU backend's
``ggml_backend_reg_get_proc_address`` in the library ``llama_cpp`` loaded,
never a second copy. The kernel's word on where a page is comes from
``move_pages(2)`` with no target nodes, independent of the series'
bookkeeping. (The typed cffi layer replaces this module later.)
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

MAX_SLABS = 16  # GGML_CPU_NUMA_MAX_SLABS
_SYS_MOVE_PAGES = {"x86_64": 279, "aarch64": 239, "ppc64le": 301}
_STAT_FIELDS = ("tensors pages pages_in_place pages_moved pages_failed pages_boundary failed_eacces failed_ebusy "
                "failed_enomem failed_cpuset failed_other").split()


class _Split(ctypes.Structure):
    _fields_ = [("n_slabs", ctypes.c_int), ("node", ctypes.c_int * MAX_SLABS),
                ("row_begin", ctypes.c_int64 * (MAX_SLABS + 1))]


class _Placement(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p), ("nbytes", ctypes.c_size_t),
                ("row_bytes", ctypes.c_size_t), ("matrix_bytes", ctypes.c_size_t), ("n_rows", ctypes.c_int64),
                ("n_matrices", ctypes.c_int64), ("n_threads", ctypes.c_int), ("page_bytes", ctypes.c_size_t),
                ("split", _Split)]


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in _STAT_FIELDS]


class _BarrierStats(ctypes.Structure):
    _fields_ = [("waits", ctypes.c_int64), ("wait_ns", ctypes.c_int64)]


class HookUnavailable(RuntimeError):
    """The loaded CPU backend does not hand out this hook (a build without GGML_CPU_NUMA, or an older series)."""


@dataclass(frozen=True)
class Slab:
    node: int
    row_begin: int
    row_end: int


@dataclass(frozen=True)
class Placement:
    """A weight the series placed, and the plan it placed it by."""

    name: str
    data: int
    nbytes: int
    row_bytes: int
    matrix_bytes: int
    n_rows: int
    n_matrices: int
    n_threads: int
    page_bytes: int
    slabs: tuple[Slab, ...]

    def slab_pages(self) -> Iterator[tuple[int, list[int]]]:
        """(intended node, base-page addresses wholly inside that node's slab), per matrix and slab."""
        unit = self.page_bytes
        base_page = os.sysconf("SC_PAGESIZE")
        for e in range(self.n_matrices):
            base = self.data + e * self.matrix_bytes
            for s in self.slabs:
                lo = -(-(base + s.row_begin * self.row_bytes) // unit) * unit
                hi = (base + s.row_end * self.row_bytes) // unit * unit
                if hi > lo:
                    yield s.node, list(range(lo, hi, base_page))


@cache
def _cpu_reg() -> tuple[ctypes.CDLL, int]:
    import llama_cpp.llama_cpp as lib  # noqa: PLC0415

    dll = lib._lib
    dll.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    dll.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    dll.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    dll.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    dll.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    dll.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    dev = dll.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        raise HookUnavailable("no CPU backend is registered in the loaded llama_cpp library")
    return dll, dll.ggml_backend_dev_backend_reg(dev)


def _hook(name: str, restype, *argtypes):
    dll, reg = _cpu_reg()
    addr = dll.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise HookUnavailable(f"the loaded CPU backend has no hook {name!r} (not a GGML_CPU_NUMA build?)")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


def layout(n_threads: int) -> list[int]:
    """The node id of each compute thread under ``--numa migrate`` (after NUMA init)."""
    out = (ctypes.c_int * n_threads)()
    _hook("ggml_backend_cpu_numa_layout", ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))(n_threads, out)
    return list(out)


def stats() -> dict[str, int]:
    """Page counts of every placement so far (in_place + moved + failed + boundary == pages)."""
    st = _Stats()
    _hook("ggml_backend_cpu_numa_stats", None, ctypes.POINTER(_Stats))(ctypes.byref(st))
    return {name: getattr(st, name) for name in _STAT_FIELDS}


@dataclass(frozen=True)
class BarrierWait:
    """Time one compute thread (by index) spent in the node-aware barrier, over every graph so far."""

    thread: int
    waits: int
    wait_ns: int


def barrier_stats(n_threads: int, reset: bool = False) -> list[BarrierWait]:
    """Per thread index: barriers passed and nanoseconds waited in the node-aware barrier.

    All zero where the stock barrier runs (one node, or another strategy).
    """
    out = (_BarrierStats * n_threads)()
    fn = _hook("ggml_backend_cpu_numa_barrier_stats", ctypes.c_int, ctypes.c_int, ctypes.POINTER(_BarrierStats),
               ctypes.c_bool)
    fn(n_threads, out, reset)
    return [BarrierWait(i, s.waits, s.wait_ns) for i, s in enumerate(out)]


def placements() -> list[Placement]:
    fn = _hook("ggml_backend_cpu_numa_placement", ctypes.c_bool, ctypes.c_size_t, ctypes.POINTER(_Placement))
    out: list[Placement] = []
    p = _Placement()
    while fn(len(out), ctypes.byref(p)):
        s = p.split
        slabs = tuple(Slab(s.node[k], s.row_begin[k], s.row_begin[k + 1]) for k in range(s.n_slabs))
        out.append(Placement(p.name.decode(), p.data, p.nbytes, p.row_bytes, p.matrix_bytes, p.n_rows,
                             p.n_matrices, p.n_threads, p.page_bytes, slabs))
    return out


_libc = ctypes.CDLL(None, use_errno=True)


def page_nodes(addresses: Sequence[int]) -> list[int]:
    """The kernel's answer: the node of each page (or -errno, e.g. -ENOENT for a page not present)."""
    nr = _SYS_MOVE_PAGES.get(os.uname().machine)
    if nr is None:
        raise OSError(f"move_pages: unknown syscall number on {os.uname().machine}")
    n = len(addresses)
    pages = (ctypes.c_void_p * n)(*addresses)
    status = (ctypes.c_int * n)()
    if _libc.syscall(nr, 0, ctypes.c_ulong(n), pages, None, status, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages (query of {n} pages): {os.strerror(err)}")
    return list(status)


def page_spans(lo: int, hi: int, page: int) -> Iterator[tuple[int, int]]:
    """(page address, bytes of [lo, hi) in that page), for every page that [lo, hi) touches."""
    addr = lo // page * page
    while addr < hi:
        yield addr, min(hi, addr + page) - max(lo, addr)
        addr += page


def slab_locality() -> dict[int, float]:
    """Per node: the fraction of the bytes of its slabs (all placed weights) that the kernel reports on it.

    Where the kernels follow the split plan (the generic ``mul_mat`` path as of
    patch 0004: each node's threads multiply only its slab's rows), this is the
    fraction of matmul weight bytes that node's threads read from their own
    node. Pages are asked of the kernel, not taken from the series' counts.
    """
    base_page = os.sysconf("SC_PAGESIZE")
    local: dict[int, int] = {}
    total: dict[int, int] = {}
    for p in placements():
        for e in range(p.n_matrices):
            base = p.data + e * p.matrix_bytes
            for s in p.slabs:
                spans = list(page_spans(base + s.row_begin * p.row_bytes, base + s.row_end * p.row_bytes, base_page))
                for (_, nbytes), node in zip(spans, page_nodes([a for a, _ in spans]), strict=True):
                    total[s.node] = total.get(s.node, 0) + nbytes
                    if node == s.node:
                        local[s.node] = local.get(s.node, 0) + nbytes
    return {node: local.get(node, 0) / total[node] for node in sorted(total)}
