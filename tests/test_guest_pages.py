"""Inside a multi-node kernel: pages really move, per the kernel's own move_pages query.

These run in the 2- and 4-node guests (`tox -e numa`), or directly on a
multi-node host. They use raw syscalls through ctypes, independent of
numa-llama's code.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.numa_guest, pytest.mark.nodes4]

libc = ctypes.CDLL(None, use_errno=True)
SYS_MBIND, SYS_MOVE_PAGES = 237, 279  # x86_64
MPOL_BIND, MPOL_MF_MOVE = 2, 1 << 1
PAGE = mmap.PAGESIZE


def node_ids() -> list[int]:
    return sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))


def buffer(pages: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, pages * PAGE)
    for i in range(pages):
        buf[i * PAGE] = 1  # fault every page in
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def move_pages(addr: int, pages: int, nodes: list[int] | None) -> list[int]:
    """move_pages(2): with nodes, move; with None, ask where each page is (the kernel's word)."""
    ptrs = (ctypes.c_void_p * pages)(*[addr + i * PAGE for i in range(pages)])
    status = (ctypes.c_int * pages)()
    node_arr = (ctypes.c_int * pages)(*nodes) if nodes is not None else None
    rc = libc.syscall(SYS_MOVE_PAGES, 0, ctypes.c_ulong(pages), ptrs, node_arr, status, 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages: {os.strerror(err)}")
    return list(status)


def test_guest_has_the_nodes() -> None:
    expected = int(os.environ.get("NUMA_VM_NODES", "2"))
    assert len(node_ids()) >= 2
    if os.environ.get("NUMA_VM"):
        assert len(node_ids()) == expected


def test_mbind_moves_every_page_to_the_last_node() -> None:
    pages = 256
    buf, addr = buffer(pages)
    last = node_ids()[-1]
    mask = ctypes.c_ulong(1 << last)
    rc = libc.syscall(
        SYS_MBIND,
        ctypes.c_void_p(addr),
        ctypes.c_ulong(pages * PAGE),
        MPOL_BIND,
        ctypes.byref(mask),
        ctypes.c_ulong(64),
        MPOL_MF_MOVE,
    )
    assert rc == 0, os.strerror(ctypes.get_errno())
    assert move_pages(addr, pages, None) == [last] * pages
    buf.close()


def test_move_pages_puts_each_page_where_asked() -> None:
    nodes = node_ids()
    pages = 64
    buf, addr = buffer(pages)
    want = [nodes[i % len(nodes)] for i in range(pages)]
    result = move_pages(addr, pages, want)
    assert result == want  # status: the node each page is now on
    assert move_pages(addr, pages, None) == want
    buf.close()
