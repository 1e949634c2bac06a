"""--numa migrate on a multi-node kernel: pages are where the plan says, per the kernel; results unchanged.

Each case runs in its own process (llama.cpp initialises NUMA once per process). The
kernel's move_pages query is the oracle; the series' own counts are checked against it.

The model is the seeded synthetic Llama (``numa_llama.synthetic``): every tensor starts on a page and every
slab boundary the plan draws falls on one, so with mmap no page straddles two slabs and the answer is exact
(every slab page on its node, 100% of each node's weight bytes local). The real model runs once per guest, in
test_guest_model.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_json

from numa_llama import synthetic

pytestmark = pytest.mark.numa_guest

PLACE = """
import ctypes, json
if not {mmap}:  # base pages (PR_SET_THP_DISABLE): a 2 MiB page would hold several of these small weights' slabs
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
from collections import Counter
from llama_cpp import Llama
from numa_llama import hooks, kernel
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
# the memory policy of each weight's first whole slab page (anonymous memory is bound, a file's page cache is not)
policies = Counter(kernel.mempolicy(address=pages[0]).mode
                   for p in hooks.placements() for _, pages in list(p.slab_pages())[:1] if pages)
print(json.dumps({{"policies": dict(policies), "text": text, "stats": hooks.stats(),
                  "on_plan": on_plan, "off_plan": off_plan,
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
def test_pages_are_where_the_plan_says(synthetic_model: Path, use_mmap: bool, per_node: int) -> None:
    """After placement the kernel reports every page of node k's slab on node k; the counts add up."""
    nodes = nodes_with_cpus()
    out = place(synthetic_model, per_node * len(nodes), use_mmap)
    st = out["stats"]
    assert out["text"].strip()
    assert sorted(set(out["layout"])) == nodes  # every node computes (more threads than CPUs is fine)
    assert out["tensors"] == st["tensors"] == synthetic.matmul_weights()
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
    # anonymous weights are bound MPOL_PREFERRED: MPOL_BIND would make a later fault on a full node (swap-in,
    # a huge page collapsed) wake the OOM killer instead of falling back to another node
    assert set(out["policies"]) == ({"default"} if use_mmap else {"preferred"}), out["policies"]
    # The generic mul_mat multiplies each node's slab on that node (patch 0004): what its threads read from
    # their own node. mmap'd, the synthetic model's slabs are whole pages: nothing straddles, every byte is
    # local. Without mmap, ggml's buffer puts tensors 32-byte aligned: the pages straddling slabs are lost
    # (97.9-99.5% per node measured at 2 nodes). THP placement is checked with the real model (test_guest_model).
    locality = out["locality"]
    assert sorted(int(n) for n in locality) == nodes
    if use_mmap:
        assert st["pages_boundary"] == 0 and min(locality.values()) == 1.0, (st, locality)
    else:
        assert st["pages_boundary"] > 0 and min(locality.values()) >= 0.95, (st, locality)


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


def test_pages_shared_with_another_process_are_counted_not_fatal(synthetic_model: Path) -> None:
    """A second process mapping the same GGUF makes its pages unmovable (EACCES): counted, and the model runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(model=str(synthetic_model))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        word, on_node0 = holder.stdout.readline().split()
        assert word == "mapped" and int(on_node0) > 0
        out = place(synthetic_model, len(nodes_with_cpus()), True)
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


@pytest.mark.parametrize("per_node", [1, 2], ids=["1-thread-per-node", "2-threads-per-node"])
def test_decode_locality_migrate_beside_stock_distribute(synthetic_model: Path, per_node: int) -> None:
    """Of the weight bytes each thread multiplies for one token, all are on its node with migrate.

    Stock distribute is measured beside it, the same way, from a cold page cache in the guest (printed with
    -s); migrate then starts from the pages distribute left. Distribute is not held to a bound: with a cold
    cache and an mmap'd model its pages land where its threads first read them, often their own node.
    """
    threads = per_node * len(nodes_with_cpus())
    stock, migrate = (
        run_json(LOCALITY.format(model=str(synthetic_model), strategy=s, threads=threads))
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
    # the synthetic model's slabs are whole pages (mmap'd): nothing straddles, so nothing may be remote
    assert min(migrate["per_thread"]) == 1.0 and st["pages_boundary"] == 0, migrate
    assert st["pages_failed"] == 0 and 0 <= st["pages_moved"] <= st["pages"]  # moved / weight pages <= 1.0
    assert len(stock["per_thread"]) == threads and all(0.0 <= f <= 1.0 for f in stock["per_thread"])


ROUNDS = """
import json
from llama_cpp import Llama
from numa_llama import hooks
from numa_llama.decode import decode_locality
# llama.cpp multiplies with n_threads for decode and n_threads_batch for prompts; llama-cpp-python's defaults differ
llm = Llama({model!r}, numa="migrate", n_threads=3, n_threads_batch=4, n_ctx=128, verbose=False)
rounds = []
for prompt in ["Paris is the capital of", "The river runs to the", "One two three four", "Memory is read by"]:
    llm.reset()  # the whole prompt again, as a batch: n_threads_batch
    text = llm.create_completion(prompt, max_tokens=3, temperature=0.0)["choices"][0]["text"]
    st = hooks.stats()
    rounds.append({{"text": text, "pages": st["pages"], "moved": st["pages_moved"], "tensors": st["tensors"],
                   "failed": st["pages_failed"],
                   "decode": decode_locality({model!r}, "migrate", 3).per_thread,
                   "batch": decode_locality({model!r}, "migrate", 4).per_thread}})
print(json.dumps({{"rounds": rounds, "layout3": hooks.layout(3), "layout4": hooks.layout(4)}}))
"""


def test_other_thread_counts_find_the_weights_placed(synthetic_model: Path) -> None:
    """n_threads=3 beside n_threads_batch=4: placed in round 1, never again; every thread local after each round.

    Measured before the fix (a 2-node guest, 2 CPUs per node, gemma-3-270m): every round placed the whole model
    twice and moved about 20400 pages, 1.68 x the weight pages after 4 rounds, growing without end.
    """
    out = run_json(ROUNDS.format(model=str(synthetic_model)), timeout=900)
    rounds = out["rounds"]
    for i, r in enumerate(rounds):
        print(
            f"round {i + 1}: {r['tensors']} weights placed, {r['pages']} pages asked, {r['moved']} moved; "
            f"decode locality per thread {r['decode']}, prompt {r['batch']}"
        )
    assert len(set(out["layout3"])) == len(set(out["layout4"])) == len(nodes_with_cpus())  # both split
    first = rounds[0]
    assert first["tensors"] == synthetic.matmul_weights() and first["failed"] == 0
    for r in rounds[1:]:
        assert (r["tensors"], r["pages"], r["moved"]) == (first["tensors"], first["pages"], first["moved"]), rounds
    for r in rounds:
        assert r["text"].strip() and min(r["decode"]) >= 0.995 and min(r["batch"]) >= 0.995, r


DECODER = """
import sys
from llama_cpp import Llama
llm = Llama({model!r}, numa="migrate", n_threads={threads}, n_ctx=128, verbose=False)
llm.eval(llm.tokenize(b"Paris is"))
for _ in range(8):  # warm-up: the first graphs place the weights and size the buffers
    llm.eval([llm.sample(temp=0.0)])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(32):
    llm.eval([llm.sample(temp=0.0)])
print("done", flush=True)
sys.stdin.readline()
"""


def _traced(status: Path) -> bool:
    try:
        return any(ln.startswith("TracerPid:") and ln.split()[1] != "0" for ln in status.read_text().splitlines())
    except OSError:
        return True  # a thread that has gone


def test_decoding_maps_and_binds_nothing_per_token(synthetic_model: Path, tmp_path: Path) -> None:
    """strace -f over 32 decoded tokens, after 8 warm-up tokens: no mmap, munmap or mbind.

    llama-cpp-python attaches no threadpool, so ggml makes one for every graph; the node-aware barrier's pages
    and the per-node src1 buffers used to be mapped, bound and unmapped with it: 3 mmap, 3 munmap and 4 mbind
    per token in a 2-node guest. move_pages (the per-graph check that placed weights are still placed) is
    counted too, as the control that strace saw the decode.
    """
    import signal
    import time

    threads = len(nodes_with_cpus())  # the measurement: n_threads=2 in a 2-node guest
    worker = subprocess.Popen(
        [sys.executable, "-c", DECODER.format(model=str(synthetic_model), threads=threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    out = tmp_path / "strace.txt"
    tracer = None
    try:
        assert worker.stdout.readline().strip() == "ready"
        trace = ["strace", "-f", "-qq", "-o", str(out), "-e", "trace=mmap,munmap,mbind,move_pages", "-p"]
        tracer = subprocess.Popen([*trace, str(worker.pid)], stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # until every thread of the worker is traced
            tasks = Path(f"/proc/{worker.pid}/task").iterdir()
            if tracer.poll() is not None or all(_traced(t / "status") for t in tasks):
                break
            time.sleep(0.1)
        assert tracer.poll() is None, tracer.communicate()[1]
        worker.stdin.write("\n")
        worker.stdin.flush()
        assert worker.stdout.readline().strip() == "done"
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
        worker.communicate("\n", timeout=120)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        name = line.split(None, 1)[1].split("(", 1)[0] if " " in line else ""
        calls[name] = calls.get(name, 0) + 1
    print(f"system calls over 32 decoded tokens, {threads} threads: {calls}")
    assert calls.get("move_pages", 0) >= 32, ("strace saw no decode", calls)
    assert calls.get("mmap", 0) == calls.get("munmap", 0) == calls.get("mbind", 0) == 0, calls


POLICY = """
import json
from llama_cpp import Llama
from numa_llama import hooks
llm = Llama({model!r}, numa="migrate", n_threads={threads}, n_ctx=64, verbose=True)
text = llm.create_completion("Paris is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
print(json.dumps({{"text": text, "stats": hooks.stats()}}))
"""


def _policy_run(model: Path, prefix: list[str]) -> tuple[dict, str]:
    code = POLICY.format(model=str(model), threads=len(nodes_with_cpus()))
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def policy_control(synthetic_model: Path) -> dict:
    """The same run without numactl: it places every weight."""
    control, _ = _policy_run(synthetic_model, [])
    assert control["stats"]["tensors"] == synthetic.matmul_weights() and control["stats"]["not_placed"] == 0
    return control


@pytest.mark.parametrize(
    "numactl,reason,line",
    [
        (["--interleave=all"], 2, "this process already has a memory policy (interleave"),
        (["--cpunodebind=0"], 3, "NUMA nodes have CPUs this process may use (a cpuset, or numactl -N): nothing"),
    ],
    ids=["interleave", "one-usable-node"],
)
def test_what_the_user_chose_is_respected(
    synthetic_model: Path, policy_control: dict, numactl: list[str], reason: int, line: str
) -> None:
    """Under numactl --interleave=all, or with one usable node, migrate moves and binds nothing, says so once,
    and gives the text it gives where it places (the control, run without numactl, places every weight)."""
    control = policy_control
    out, stderr = _policy_run(synthetic_model, ["numactl", *numactl])
    st = out["stats"]
    print(f"numactl {' '.join(numactl)}: not_placed={st['not_placed']}, tensors {st['tensors']}, pages {st['pages']}")
    assert st["not_placed"] == reason and st["tensors"] == st["pages"] == st["pages_moved"] == 0, st
    assert sum(line in ln for ln in stderr.splitlines()) == 1, stderr[-3000:]
    assert out["text"] == control["text"] and out["text"].strip()


COLD = """
import json
with open("/proc/sys/vm/drop_caches", "w") as f:  # a cold page cache: placement faults the weights in itself
    f.write("3")
from llama_cpp import Llama
from numa_llama import api
llm = Llama({model!r}, numa="migrate", n_threads={threads}, n_ctx=64, verbose=False)
llm.create_completion("Paris is", max_tokens=1, temperature=0.0)
st = api.stats(llm)
print(json.dumps({{"pages": st.pages, "in_place": st.pages_in_place, "moved": st.pages_moved,
                  "failed": st.pages_failed, "boundary": st.pages_boundary, "seconds": st.place_seconds,
                  "per_second": st.pages_per_second}}))
"""


def test_each_node_places_its_own_slabs_and_the_time_is_reported(synthetic_model: Path) -> None:
    """From a cold page cache, each node's slabs are faulted in by a thread of that node: the kernel puts the pages
    there at once, and almost none has to move. One thread placing every node's slabs would fault them all in on
    its own node and then move every other node's share (about half the pages on 2 nodes). The placement reports
    its seconds and pages/s."""
    st = run_json(COLD.format(model=str(synthetic_model), threads=len(nodes_with_cpus())))
    print(
        f"cold placement: {st['pages']} pages, {st['in_place']} in place, {st['moved']} moved, {st['failed']} "
        f"failed, in {st['seconds']:.3f} s ({st['per_second']:,.0f} pages/s)"
    )
    assert st["failed"] == 0 and st["pages"] > 0
    assert st["moved"] <= 0.02 * st["pages"], st
    assert st["seconds"] > 0 and 0 < st["per_second"] < float("inf"), st


def test_a_weight_no_node_local_kernel_reads_is_left_where_it_is() -> None:
    """The stand-in extra buffer (tests/test_not_local.py) on real nodes: its pages stay on the first node, where
    they were put; the CPU-buffer weight beside it is placed."""
    from test_not_local import WORKER

    nodes = nodes_with_cpus()
    out = run_json(WORKER.format(nodes=repr(nodes)))
    print(f"not node-local: {out['not_local']}; placed: {out['placed']}; the stand-in's pages on {out['extra_nodes']}")
    assert out["not_local"] == [["blk.0.ffn_up.weight", "NL_EXTRA"]] and out["placed"] == ["blk.0.ffn_down.weight"]
    assert out["extra_nodes"] == [nodes[0]] and out["same"]
