"""The kernel's own answers about NUMA, independent of the patch series (raw syscalls, no libnuma).

Everything here asks Linux directly, through the compiled ``numa_llama._native``
module: it is the oracle that the series' placement is checked against, and
it works the same on a one-node machine (where every answer is node 0).
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    from numa_llama._native import ffi, lib
except ImportError as e:  # the source checkout's numa_llama, imported instead of the installed one
    raise ImportError(
        f"numa_llama._native is not built next to {__file__}: this is the source checkout's numa_llama, not the "
        "installed one (pip install . builds it). Run Python from elsewhere, or with -P (`python -P -m pytest`) "
        "so the current directory does not come first on sys.path"
    ) from e

MPOL_F_NODE = 1 << 0  # get_mempolicy: return the node of addr, not the policy
MPOL_F_ADDR = 1 << 1  # get_mempolicy: the policy of the mapping at addr
MPOL_MODES = {
    0: "default",
    1: "preferred",
    2: "bind",
    3: "interleave",
    4: "local",
    5: "preferred_many",
    6: "weighted_interleave",
}
_MAX_NODES = 1024


class NumaError(OSError):
    """A NUMA system call failed. ``errno`` is the kernel's; ``what`` says what was being asked."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})")
        self.what = what


def _check(rv: int, what: str) -> int:
    if rv < 0:
        raise NumaError(-rv, what)
    return rv


def page_size() -> int:
    return int(lib.nl_page_size())


def page_nodes(addresses: Sequence[int]) -> list[int]:
    """The node of each page, from ``move_pages(2)`` with no target nodes (a query that moves nothing).

    A page the kernel cannot answer for comes back as ``-errno`` in its place
    (``-ENOENT``: not present, never touched; ``-EFAULT``: not mapped). Written, present pages can also come back
    so while automatic NUMA balancing (``kernel.numa_balancing=1``) samples them: on the guests' Debian 6.1
    kernel, a 2 MiB page under a NUMA-hinting entry answers ``-EFAULT`` and a base page ``-ENOENT``. Measured in
    a 2-node guest, gemma-3-270m without mmap: 11827 and 250 of 60274 weight pages with balancing on, none with
    it off. Read-only file mappings (the model under mmap) are not sampled. Such a page is on a node, but the
    query does not say which.
    """
    n = len(addresses)
    if n == 0:
        return []
    pages = ffi.new("void *[]", [ffi.cast("void *", a) for a in addresses])
    status = ffi.new("int[]", n)
    _check(lib.nl_move_pages_query(n, pages, status), f"move_pages (the node of {n} page(s) from {addresses[0]:#x})")
    return list(status)


def page_nodes_of(pid: int, addresses: Sequence[int]) -> list[int]:
    """:func:`page_nodes` for the pages of process ``pid`` (``move_pages(2)`` on that pid; same user or root)."""
    n = len(addresses)
    if n == 0:
        return []
    pages = ffi.new("void *[]", [ffi.cast("void *", a) for a in addresses])
    status = ffi.new("int[]", n)
    _check(
        lib.nl_move_pages_query_pid(pid, n, pages, status),
        f"move_pages (pid {pid}: the node of {n} page(s) from {addresses[0]:#x})",
    )
    return list(status)


def move_pages(addresses: Sequence[int], node: int) -> list[int]:
    """Move this process's pages to ``node`` (``move_pages(2)``, ``MPOL_MF_MOVE``); per page its node or -errno.

    Not used by the library: tests use it to put memory in a known place before the series acts on it.
    """
    n = len(addresses)
    if n == 0:
        return []
    pages = ffi.new("void *[]", [ffi.cast("void *", a) for a in addresses])
    nodes = ffi.new("int[]", [node] * n)
    status = ffi.new("int[]", n)
    _check(
        lib.nl_move_pages_to(n, pages, nodes, status), f"move_pages ({n} page(s) from {addresses[0]:#x} to node {node})"
    )
    return list(status)


def page_spans(lo: int, hi: int, page: int) -> Iterator[tuple[int, int]]:
    """(page address, bytes of [lo, hi) in that page), for every page that [lo, hi) touches."""
    addr = lo // page * page
    while addr < hi:
        yield addr, min(hi, addr + page) - max(lo, addr)
        addr += page


def range_nodes(lo: int, hi: int) -> list[tuple[int, int]]:
    """(page address, node or -errno) for every base page of [lo, hi)."""
    page = page_size()
    addrs = [a for a, _ in page_spans(lo, hi, page)]
    return list(zip(addrs, page_nodes(addrs), strict=True))


@dataclass(frozen=True)
class MemPolicy:
    mode: str
    nodes: tuple[int, ...]


def _nodemask(mask, words: int) -> tuple[int, ...]:
    bits = ffi.sizeof("unsigned long") * 8
    return tuple(w * bits + b for w in range(words) for b in range(bits) if mask[w] >> b & 1)


def mempolicy(address: int | None = None) -> MemPolicy:
    """``get_mempolicy(2)``: the calling thread's policy, or the policy of the mapping at ``address``."""
    bits = ffi.sizeof("unsigned long") * 8
    words = _MAX_NODES // bits
    mode = ffi.new("int *")
    mask = ffi.new("unsigned long[]", words)
    flags = 0 if address is None else MPOL_F_ADDR
    what = "get_mempolicy (this thread)" if address is None else f"get_mempolicy (the mapping at {address:#x})"
    _check(lib.nl_get_mempolicy(mode, mask, _MAX_NODES, ffi.cast("void *", address or 0), flags), what)
    base_mode = mode[0] & 0xFFFF  # the MPOL_F_* mode flags sit above the mode
    return MemPolicy(MPOL_MODES.get(base_mode, str(base_mode)), _nodemask(mask, words))


def node_of_address(address: int) -> int:
    """``get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)``: the node of the page at address (faulting it in if needed)."""
    mode = ffi.new("int *")
    _check(
        lib.nl_get_mempolicy(mode, ffi.NULL, 0, ffi.cast("void *", address), MPOL_F_NODE | MPOL_F_ADDR),
        f"get_mempolicy (the node of the page at {address:#x})",
    )
    return mode[0]


def getcpu() -> tuple[int, int]:
    """``getcpu(2)``: (CPU, node) the calling thread runs on now."""
    cpu = ffi.new("unsigned int *")
    node = ffi.new("unsigned int *")
    _check(lib.nl_getcpu(cpu, node), "getcpu")
    return cpu[0], node[0]


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this thread may run on (``sched_getaffinity``: taskset, cgroups' cpuset)."""
    out = ffi.new("int[]", 8192)
    n = _check(lib.nl_affinity(out, 8192), "sched_getaffinity")
    return tuple(out[0:n])


def allowed_nodes(status: str | None = None) -> tuple[int, ...]:
    """The nodes this process may allocate on (``Mems_allowed_list`` of ``/proc/self/status``: the cpuset)."""
    from numa_llama.sysfs import parse_list  # noqa: PLC0415

    text = Path("/proc/self/status").read_text() if status is None else status
    for line in text.splitlines():
        if line.startswith("Mems_allowed_list:"):
            return tuple(parse_list(line.split(":", 1)[1], what="Mems_allowed_list"))
    raise NumaError(_errno.ENOENT, "Mems_allowed_list in /proc/self/status")
