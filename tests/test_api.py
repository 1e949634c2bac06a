"""The cffi layer and the Python API on this (one-node) host: real model, real library, boring answers.

Each case runs in a fresh interpreter (llama.cpp initialises NUMA once per
process). In the guests, ``test_guest_placement`` and ``test_prop_placement``
hold the same calls to the multi-node answers.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from conftest import numa_nodes, run_json

API = """
import json, os
from llama_cpp import Llama
import numa_llama
from numa_llama import hooks
llm = Llama({model!r}, numa={numa!r}, n_threads=2, n_ctx=64, use_mmap={mmap}, verbose=False)
llm.create_completion("Paris is", max_tokens=2, temperature=0.0)
topo = numa_llama.topology()
placed = numa_llama.placement(llm)
try:
    loc = numa_llama.locality(llm)
    loc = {{"overall": loc.overall, "per_thread": loc.per_thread, "nodes": loc.thread_node}}
except ValueError as e:
    loc = {{"error": str(e)}}
st = numa_llama.stats(llm)
libs = sorted({{line.split()[-1] for line in open("/proc/self/maps") if "libggml" in line or "libllama" in line}})
print(json.dumps({{"nodes": topo.node_ids, "tensors": len(placed),
    "pages": sum(p.pages for p in placed), "per_node": [p.pages_per_node() for p in placed[:3]],
    "off_plan": sum(p.pages_off_plan for p in placed), "planned": sum(bool(p.slabs) for p in placed),
    "locality": loc, "moved": st.pages_moved, "tensors_placed": st.tensors, "waits": list(st.barrier_waits),
    "layout": hooks.layout(2), "libs": libs, "bound": hooks.bind()}}))
"""

pytestmark = pytest.mark.skipif(numa_nodes() != 1, reason="the one-node answers; the guests check the others")


@pytest.mark.model
@pytest.mark.parametrize("numa", ["migrate", False], ids=["migrate", "off"])
def test_one_node_answers_are_the_boring_ones(model_path: Path, numa: str | bool) -> None:
    """One node: every weight page on node 0 per the kernel, locality 1.0, nothing placed or moved."""
    out = run_json(API.format(model=str(model_path), numa=numa, mmap=True))
    assert out["nodes"] == [0]
    assert out["tensors"] >= 100 and out["planned"] == 0  # found in the mapping, no plan on one node
    assert all(set(per) == {"0"} for per in out["per_node"]), out["per_node"]  # JSON keys: the kernel said node 0
    assert out["off_plan"] == 0
    assert out["locality"]["overall"] == 1.0 and out["locality"]["nodes"] == [0, 0]
    assert out["moved"] == 0 and out["tensors_placed"] == 0 and out["waits"] == [0, 0]
    assert out["layout"] in ([0, 0], [-1, -1])  # -1: numa off never initialised the layout
    # the one library llama_cpp loaded, not a second copy: one path per library in the mapping
    names = [Path(p).name for p in out["libs"]]
    assert len(names) == len(set(names)) and out["bound"] in out["libs"], out["libs"]


@pytest.mark.model
def test_without_mmap_locality_finds_the_weights_through_the_graph(model_path: Path) -> None:
    """No file mapping to find the weights in: placement() lists none, and locality() still answers, from the
    weights the decode graph multiplies by (api.graph_weights) in ggml's own buffer."""
    out = run_json(API.format(model=str(model_path), numa="migrate", mmap=False))
    assert out["tensors"] == 0
    assert "error" not in out["locality"], out["locality"]
    assert out["locality"]["overall"] == 1.0 and out["locality"]["nodes"] == [0, 0]


def test_kernel_errors_carry_errno_and_the_question() -> None:
    from numa_llama import kernel

    with pytest.raises(kernel.NumaError) as err:
        kernel.mempolicy(address=4096)  # nothing is mapped at page 1
    assert err.value.errno == errno.EFAULT
    assert "get_mempolicy (the mapping at 0x1000)" in str(err.value)
    assert kernel.page_nodes([0]) == [-errno.EFAULT]  # per page: the kernel's errno in its place


def test_kernel_answers_about_this_process() -> None:
    from numa_llama import kernel

    cpu, node = kernel.getcpu()
    assert cpu in kernel.allowed_cpus() and node in kernel.allowed_nodes()
    buf = bytearray(3 * kernel.page_size())
    import ctypes

    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    assert {n for _, n in kernel.range_nodes(addr, addr + len(buf))} == {node} or numa_nodes() > 1
    assert kernel.mempolicy().mode in kernel.MPOL_MODES.values()


def test_binding_refuses_a_library_that_is_not_loaded() -> None:
    from numa_llama._native import ffi, lib

    err = ffi.new("char[]", 256)
    assert lib.nl_bind(b"/nonexistent/libllama.so", err, 256) == -1
    assert "is not loaded in this process" in ffi.string(err).decode()


def test_a_page_the_kernel_calls_not_present_is_not_off_plan() -> None:
    """-ENOENT (not present) is counted apart: the query names no node for it, so it is neither on plan nor on
    another node; any other errno (-EFAULT: not mapped) is off plan."""
    from numa_llama.api import BOUNDARY, SlabPlan, TensorPlacement  # noqa: PLC0415

    t = TensorPlacement(
        "blk.0.ffn_up_exps.weight",
        0x10000,
        6 * 4096,
        (SlabPlan(0, 0, 8, 3 * 4096), SlabPlan(1, 8, 16, 3 * 4096)),
        4096,
        (0, 0, BOUNDARY, 1, 1, 1),
        (0, -errno.ENOENT, 1, 0, -errno.EFAULT, 1),
    )
    assert (t.pages_off_plan, t.pages_not_present, t.pages_boundary) == (2, 1, 1)
