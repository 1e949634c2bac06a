"""Weights in extra buffers whose kernels do not follow the split plan (AMX, KleidiAI): reported, never placed.

No machine here has such a buffer (AMX faults or is refused on ours; KleidiAI and spacemit do not build on x86),
so the harness stands one in: a host buffer named NL_EXTRA with the CPU buffer's functions. The series cannot
tell it from a real extra buffer by anything but its type, which is what it goes by.
"""

from __future__ import annotations

import os

from conftest import run_json

WORKER = """
import json, os
import llama_cpp
llama_cpp.llama_backend_init()
llama_cpp.llama_numa_init(llama_cpp.GGML_NUMA_STRATEGY_MIGRATE)
from numa_llama import api, hooks, kernel
nodes = {nodes}
extra = hooks.Weight("blk.0.ffn_up.weight", 2, 256, 512, buffer_type="NL_EXTRA")  # q4_0
plain = hooks.Weight("blk.0.ffn_down.weight", 2, 256, 512)
data = bytes(range(256)) * (extra.nbytes // 256)
extra.set(data)
plain.set(data)
pages = [a for a, _ in kernel.page_spans(extra.data, extra.data + extra.nbytes, kernel.page_size())]
if nodes:  # every page of the stand-in bound to the first node, to see whether anything moves it. Bound, not
    # just moved: automatic NUMA balancing moves anonymous pages that move_pages put elsewhere back to their readers
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_ulong(1 << nodes[0])
    lo, hi = pages[0], pages[-1] + kernel.page_size()
    SYS_MBIND, MPOL_BIND, MPOL_MF_MOVE = 237, 2, 2
    rv = libc.syscall(SYS_MBIND, ctypes.c_void_p(lo), ctypes.c_ulong(hi - lo), MPOL_BIND, ctypes.byref(mask),
                      ctypes.c_ulong(64), MPOL_MF_MOVE)
    assert rv == 0, ctypes.get_errno()
x = bytes(4 * 256 * 3)
outs = [w.mul(x, 3, 2) for w in (extra, plain)]
st = api.stats()
print(json.dumps({{"not_local": hooks.not_local(), "stats_count": hooks.stats()["tensors_not_local"],
                  "api": [list(t) for t in st.not_node_local], "tensors": st.tensors, "same": outs[0] == outs[1],
                  "placed": [p.name for p in hooks.placements()],
                  "extra_nodes": sorted(set(kernel.page_nodes(pages))) if nodes else []}}))
"""


def test_a_weight_in_another_extra_buffer_is_reported_not_node_local(tmp_path) -> None:
    """Under a virtual 2-node topology (the kernels follow the plan, nothing is placed): the NL_EXTRA weight is
    named, with its buffer type, in the hook, the stats and api.stats; the product equals the CPU buffer's."""
    env = {**os.environ, "GGML_CPU_NUMA_VIRTUAL": "2"}
    proc = run_json(WORKER.format(nodes="[]"), env=env)
    assert proc["not_local"] == [["blk.0.ffn_up.weight", "NL_EXTRA"]], proc
    assert proc["stats_count"] == 1 and proc["api"] == [["blk.0.ffn_up.weight", "NL_EXTRA"]]
    assert proc["same"], "the stand-in buffer's product differs from the CPU buffer's"
