"""Fault cases that need a guest of their own shape: a memory-only node, and a node outside the cpuset.

These boot their guests from the host (marker ``vm``), like ``test_numa_vm``;
the kernel's move_pages answer is the oracle, and the model must still run.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.vm

RUN = """
import json
from collections import Counter
from llama_cpp import Llama
from numa_llama import hooks
llm = Llama({model!r}, numa={numa!r}, n_threads={threads}, n_ctx=64, verbose={verbose})
out = llm.create_completion("Paris is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
where = Counter()
slab_nodes = set()
if {numa!r} == "migrate":
    for p in hooks.placements():
        for node, pages in p.slab_pages():
            slab_nodes.add(node)
            for got in hooks.page_nodes(pages):
                where[f"{{node}}->{{got}}"] += 1
print(json.dumps({{"text": out, "layout": hooks.layout({threads}) if {numa!r} == "migrate" else [],
                  "stats": hooks.stats() if {numa!r} == "migrate" else {{}}, "where": where,
                  "slab_nodes": sorted(slab_nodes)}}))
"""


def guest(args: list[str], shell: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "build" / "numa_vm.py"), *args, "--timeout", str(timeout), "--", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=timeout + 120,
        cwd=ROOT,
    )


def script(model_path, numa: str, threads: int, verbose: bool = False) -> str:
    code = RUN.format(model=str(model_path), numa=False if numa == "off" else numa, threads=threads, verbose=verbose)
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def last_json(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_memory_only_node_gets_no_threads_and_no_slabs(synthetic_model) -> None:
    """Nodes 0 and 1 have a CPU, node 2 only memory (CXL-like): threads and slabs go to 0 and 1 only."""
    proc = guest(
        ["--nodes", "3", "--cpus-per-node", "1,1,0", "--mem-per-node", "1G,1G,512M"],
        script(synthetic_model, "off", 2) + " && " + script(synthetic_model, "migrate", 2),
    )
    off, migrate = last_json(proc)
    assert migrate["text"] == off["text"] and migrate["text"].strip()
    assert sorted(set(migrate["layout"])) == [0, 1]
    assert migrate["slab_nodes"] == [0, 1]
    assert all(k.split("->")[0] == k.split("->")[1] for k in migrate["where"]), migrate["where"]
    assert migrate["stats"]["pages_failed"] == 0


CPUSET = (
    "mount -t cgroup2 none /sys/fs/cgroup && echo +cpuset > /sys/fs/cgroup/cgroup.subtree_control && "
    "mkdir /sys/fs/cgroup/numa-llama && echo 0 > /sys/fs/cgroup/numa-llama/cpuset.mems && "
    "echo $$ > /sys/fs/cgroup/numa-llama/cgroup.procs && grep Mems_allowed_list /proc/self/status >&2 && "
)


def test_node_outside_the_cpuset_is_counted_and_the_model_runs(synthetic_model) -> None:
    """cpuset.mems = 0 on a 2-node guest: node 1's slabs cannot move there; counted, warned once, same text."""
    proc = guest(
        ["--nodes", "2"],
        CPUSET + script(synthetic_model, "off", 2) + " && " + script(synthetic_model, "migrate", 2, verbose=True),
    )
    off, migrate = last_json(proc)
    assert "Mems_allowed_list:\t0\n" in proc.stderr
    assert migrate["text"] == off["text"] and migrate["text"].strip()
    st = migrate["stats"]
    assert st["failed_cpuset"] > 0 and st["pages_failed"] == st["failed_cpuset"]
    assert st["pages"] == st["pages_in_place"] + st["pages_moved"] + st["pages_failed"] + st["pages_boundary"]
    assert proc.stderr.count("node outside the cpuset") == 1
    # node 0's slabs are on node 0; node 1's stay where the kernel put them (node 0: the only memory allowed)
    assert all(k in ("0->0", "1->0") for k in migrate["where"]), migrate["where"]
