"""--numa migrate on a multi-node kernel: pages are where the plan says, per the kernel; results unchanged.

Each case runs in its own process (llama.cpp initialises NUMA once per process). The
kernel's move_pages query is the oracle; the series' own counts are checked against it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_json

pytestmark = [pytest.mark.numa_guest, pytest.mark.model]

PLACE = """
import json
from collections import Counter
from llama_cpp import Llama
from numa_llama import hooks
llm = Llama({model!r}, numa="migrate", n_threads={threads}, n_ctx=64, use_mmap={mmap}, verbose=False)
text = llm.create_completion("Paris is", max_tokens=1, temperature=0.0)["choices"][0]["text"]
on_plan = off_plan = 0
off = Counter()
for p in hooks.placements():
    for node, pages in p.slab_pages():
        for got in hooks.page_nodes(pages):
            if got == node:
                on_plan += 1
            else:
                off_plan += 1
                off[(p.name, node, got)] += 1
print(json.dumps({{"text": text, "stats": hooks.stats(), "on_plan": on_plan, "off_plan": off_plan,
                  "locality": hooks.slab_locality(),
                  "off": [list(k) + [v] for k, v in off.most_common(5)], "layout": hooks.layout({threads}),
                  "tensors": len(hooks.placements())}}))
"""


def nodes_with_cpus() -> list[int]:
    root = Path("/sys/devices/system/node")
    return sorted(int(d.name[4:]) for d in root.glob("node[0-9]*") if (d / "cpulist").read_text().strip())


def place(model_path: Path, threads: int, use_mmap: bool) -> dict:
    return run_json(PLACE.format(model=str(model_path), threads=threads, mmap=use_mmap))


@pytest.mark.parametrize(
    "use_mmap,per_node",
    [
        pytest.param(True, 1, id="mmap-1-thread-per-node", marks=pytest.mark.nodes4),
        pytest.param(True, 2, id="mmap-2-threads-per-node"),
        pytest.param(False, 1, id="no-mmap-1-thread-per-node"),
        pytest.param(False, 2, id="no-mmap-2-threads-per-node", marks=pytest.mark.nodes4),
    ],
)
def test_pages_are_where_the_plan_says(model_path: Path, use_mmap: bool, per_node: int) -> None:
    """After placement the kernel reports every page of node k's slab on node k; the counts add up."""
    nodes = nodes_with_cpus()
    out = place(model_path, per_node * len(nodes), use_mmap)
    st = out["stats"]
    assert out["text"].strip()
    assert sorted(set(out["layout"])) == nodes  # every node computes (more threads than CPUs is fine)
    assert out["tensors"] == st["tensors"] >= 100  # gemma-3-270m multiplies by 127 weights
    assert out["off_plan"] == 0, out["off"]
    assert out["on_plan"] > 0
    assert st["pages"] == st["pages_in_place"] + st["pages_moved"] + st["pages_failed"] + st["pages_boundary"]
    assert st["pages_failed"] == 0
    assert st["pages_moved"] <= st["pages"]  # pages moved / weight pages <= 1.0
    print(
        f"placement, {len(nodes)} nodes, {per_node} thread(s) per node, mmap={use_mmap}: {st['tensors']} weights, "
        f"{st['pages']} pages, {st['pages_in_place']} in place, {st['pages_moved']} moved "
        f"({st['pages_moved'] / st['pages']:.3f} of the weight pages), {st['pages_failed']} failed, "
        f"{st['pages_boundary']} on slab boundaries; {out['on_plan']} slab pages on plan, {out['off_plan']} off"
    )
    assert out["on_plan"] == st["pages_in_place"] + st["pages_moved"]
    # The generic mul_mat multiplies each node's slab on that node (patch 0004): what its threads read from
    # their own node. Base pages (mmap) lose only the pages that straddle slabs (which node those land on
    # varies run to run: 99.1-100% per node measured at 4 nodes); with THP (no mmap) a
    # 2 MiB page straddles most of this small model's slabs, so only a floor is asserted there.
    locality = out["locality"]
    assert sorted(int(n) for n in locality) == nodes
    assert min(locality.values()) >= (0.98 if use_mmap else 0.5), locality  # measured 99.1-100% with mmap


HOLDER = """
import ctypes, mmap, os, sys
f = open({model!r}, "rb")
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
size = os.fstat(f.fileno()).st_size
p = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
pages = (ctypes.c_void_p * n)(*[p + i * mmap.PAGESIZE for i in range(n)])
for i in range(n):
    ctypes.c_char.from_address(pages[i]).value  # fault in: now this process maps every page
nodes = (ctypes.c_int * n)(*([0] * n))  # all on node 0 while no one else maps them
status = (ctypes.c_int * n)()
assert libc.syscall(279, 0, ctypes.c_ulong(n), pages, nodes, status, 0) == 0, ctypes.get_errno()
print("mapped", sum(1 for s in status if s == 0), flush=True)
sys.stdin.read()
"""


def test_pages_shared_with_another_process_are_counted_not_fatal(model_path: Path) -> None:
    """A second process mapping the same GGUF makes its pages unmovable (EACCES): counted, and the model runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(model=str(model_path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        word, on_node0 = holder.stdout.readline().split()
        assert word == "mapped" and int(on_node0) > 0
        out = place(model_path, len(nodes_with_cpus()), True)
    finally:
        holder.communicate("", timeout=60)
    st = out["stats"]
    assert out["text"].strip()
    assert st["failed_eacces"] > 0 and st["pages_failed"] == st["failed_eacces"]
    assert st["pages"] == st["pages_in_place"] + st["pages_moved"] + st["pages_failed"] + st["pages_boundary"]
    assert st["pages_moved"] == 0  # every page that had to move is shared with the holder


LOCALITY = """
import json, os
if os.environ.get("NUMA_VM") and {strategy!r} == "distribute":  # a cold page cache: nothing placed by earlier runs
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
from llama_cpp import Llama
from numa_llama.decode import decode_locality
llm = Llama({model!r}, numa={strategy!r}, n_threads={threads}, n_ctx=64, verbose=False)
llm.create_completion("Paris is", max_tokens=2, temperature=0.0)
loc = decode_locality({model!r}, {strategy!r}, {threads})
stats = None
if {strategy!r} == "migrate":
    from numa_llama import hooks
    stats = hooks.stats()
print(json.dumps({{"per_thread": loc.per_thread, "overall": loc.overall, "nodes": loc.thread_node, "stats": stats}}))
"""


@pytest.mark.parametrize("per_node", [1], ids=["1-thread-per-node"])  # 2 per node: by hand (minutes per run)
def test_decode_locality_migrate_beside_stock_distribute(model_path: Path, per_node: int) -> None:
    """Of the weight bytes each thread multiplies for one token, >= 99.5% are on its node with migrate.

    Stock distribute is measured beside it, the same way, from a cold page cache in the guest (printed with
    -s); migrate then starts from the pages distribute left. Distribute is not held to a bound: with a cold
    cache and an mmap'd model its pages land where its threads first read them, often their own node.
    """
    threads = per_node * len(nodes_with_cpus())
    stock, migrate = (
        # a whole decode from a cold page cache over 9p under TCG: over 300 s on some machines of our kind
        run_json(LOCALITY.format(model=str(model_path), strategy=s, threads=threads), timeout=1200)
        for s in ("distribute", "migrate")
    )
    for name, loc in (("distribute", stock), ("migrate", migrate)):
        per_thread = " ".join(f"{f:.4f}" for f in loc["per_thread"])
        print(f"decode locality, {threads} threads, {name}: {loc['overall']:.4f} (per thread {per_thread})")
    st = migrate["stats"]
    print(
        f"migrate after distribute: {st['pages_moved']} of {st['pages']} weight pages moved "
        f"({st['pages_moved'] / st['pages']:.3f}), {st['pages_in_place']} in place, {st['pages_failed']} failed"
    )
    assert len(migrate["per_thread"]) == threads
    assert min(migrate["per_thread"]) >= 0.995, migrate
    assert st["pages_failed"] == 0 and 0 <= st["pages_moved"] <= st["pages"]  # moved / weight pages <= 1.0
    assert len(stock["per_thread"]) == threads and all(0.0 <= f <= 1.0 for f in stock["per_thread"])
