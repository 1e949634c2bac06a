"""``numa-llama bench --hardware FILE``: the real-hardware run's roofline model, its bad input, and one real run
on this host (one node: the run is tested, not NUMA; the file says so)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import bench_build
import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

from numa_llama import roofline
from numa_llama.sysfs import read_topology


def numa_llama(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "numa_llama", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def matrix(local: float, remote: float) -> roofline.Matrix:
    """Two nodes, 2 CPUs each: ``local`` GB/s reading one's own node, ``remote`` the other's."""
    cells = {(i, j): roofline.Cell(i, j, 2, 1 << 20, (local if i == j else remote,)) for i in (0, 1) for j in (0, 1)}
    return roofline.Matrix((0, 1), (0, 1), cells, 1, 1, 1)


B = 250e6  # bytes a token reads


def test_all_local_placement_gives_the_sum_of_the_diagonal() -> None:
    m = matrix(100.0, 40.0)
    flows = roofline.traffic([1.0] * 4, [0, 0, 1, 1], None, {0: 0.5, 1: 0.5})
    assert flows == {(0, 0): 0.5, (1, 1): 0.5}
    assert roofline.placement_roofline(m, flows, B) == pytest.approx(200e9 / B)
    assert roofline.placement_roofline(m, flows, B) == pytest.approx(roofline.roofline_tokens_per_s(m.local(), B))


def test_every_page_on_node_0_is_bound_by_that_memory_and_the_link() -> None:
    """Stock's warm case: node 1's threads read everything from node 0. Node 0's memory serves the whole token
    (at most 100 GB/s), and node 1's threads pull their half at 40 GB/s: the slower of the two bounds it."""
    m = matrix(100.0, 40.0)
    flows = roofline.traffic([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], None, {0: 1.0})
    assert flows == {(0, 0): 0.5, (1, 0): 0.5}
    assert roofline.placement_roofline(m, flows, B) == pytest.approx(1 / max(B / 100e9, 0.5 * B / 40e9))
    # with a fast link the memory of node 0 is the bound: half the all-local roofline
    assert roofline.placement_roofline(matrix(100.0, 100.0), flows, B) == pytest.approx(100e9 / B)


def test_read_bytes_weigh_the_threads() -> None:
    """A thread that reads 3 times the bytes counts 3 times: equal weights would give 0.5 local here."""
    flows = roofline.traffic([1.0, 0.0], [0, 1], [300, 100], {0: 1.0})
    assert flows == {(0, 0): 0.75, (1, 0): 0.25}


def test_remote_bytes_go_where_the_pages_are() -> None:
    """4 nodes: a thread's remote bytes are spread over the other nodes by their page share."""
    flows = roofline.traffic([0.5], [0], None, {0: 0.5, 1: 0.375, 2: 0.125, 3: 0.0})
    assert flows == pytest.approx({(0, 0): 0.5, (0, 1): 0.375, (0, 2): 0.125})


@pytest.mark.parametrize(
    "per_thread, nodes, read, says",
    [
        ([], [], None, "no threads"),
        ([1.0], [0, 1], None, "not one node per thread"),
        ([1.5], [0], None, "local fraction of 1.5"),
        ([0.5], [0], None, "names no other node"),
        ([1.0, 1.0], [0, 1], [1], "byte counts do not match"),
    ],
)
def test_bad_placements_are_named(per_thread: list[float], nodes: list[int], read: list[int] | None, says: str) -> None:
    with pytest.raises(roofline.RooflineError, match=says):
        roofline.traffic(per_thread, nodes, read, {})


@given(
    local=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    share0=st.floats(0.0, 1.0),
    remote=st.floats(1.0, 100.0),
)
def test_no_placement_beats_every_byte_local(local: list[float], share0: float, remote: float) -> None:
    """Whatever the placement, the bound is at most the all-local one (the two memories serve every byte), and it
    is a positive, finite rate. A model that let one node's threads read another node's memory without
    counting that memory's time would beat all-local where each node's threads read half of their bytes from the
    other node over a link as fast as local memory (every pair's stream a quarter of the bytes)."""
    m = matrix(100.0, remote)
    where = [0, 0, 1, 1]
    got = roofline.placement_roofline(m, roofline.traffic(local, where, None, {0: share0, 1: 1.0 - share0}), B)
    assert 0 < got < math.inf
    assert got <= 200e9 / B * (1 + 1e-9)


def test_hardware_is_a_run_of_its_own() -> None:
    proc = numa_llama("bench", "--hardware", "x.json", "--scenarios", "warm")
    assert proc.returncode == 2
    assert "--hardware is a run of its own" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_model_is_one_line(tmp_path: Path) -> None:
    proc = numa_llama("bench", str(tmp_path / "nope.gguf"), "--hardware", str(tmp_path / "out.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"numa-llama: model file not found: {tmp_path / 'nope.gguf'}"
    assert not (tmp_path / "out.json").exists()


@pytest.fixture(scope="module")
def patched_bench() -> Path:
    return bench_build.build_bench("patched", log=lambda _: None)


@pytest.mark.model
@pytest.mark.skipif(not os.access("/proc/sys/vm/drop_caches", os.W_OK), reason="drops the page cache: needs root")
def test_the_hardware_run_writes_everything_publishing_needs(patched_bench: Path, tmp_path: Path) -> None:
    """One round of pp16/tg4 with the patched llama-bench in both columns (building stock here would cost CI
    minutes; the file says the two are one binary). On one node the placement roofline is the all-local one."""
    out = tmp_path / "hw.json"
    proc = numa_llama(
        "bench", "--hardware", str(out), "--llama-bench", str(patched_bench), "--stock-bench", str(patched_bench),
        "-t", "2", "--rounds", "1", "-r", "1", "-p", "16", "-n", "4", "--bandwidth-mib", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    topo = read_topology()
    one_node = len(topo.compute_nodes()) == 1
    assert doc["numa"] is (not one_node)
    assert doc["same_binary"] is True
    assert any("not stock" in n for n in doc["notes"])
    assert any("no NUMA result" in n for n in doc["notes"]) is one_node
    assert "no NUMA result" in proc.stderr or not one_node
    assert doc["builds"]["patched"]["sha256"] == hashlib.sha256(patched_bench.read_bytes()).hexdigest()
    assert doc["machine"]["uname"]["machine"] and doc["machine"]["cpus"] == os.cpu_count()
    assert doc["topology"]["nodes"] and doc["bandwidth"]["cells"] and "MPOL_BIND" in doc["bandwidth"]["method"]
    assert len(doc["series"]) >= 1 and all(len(p["sha256"]) == 64 for p in doc["series"])
    assert any("drop_caches" in c for c in doc["commands"])
    assert any(c.startswith(str(patched_bench)) and "--numa migrate" in c for c in doc["commands"])
    assert [r["page_cache"] for r in doc["results"]] == ["cold", "warm"]
    tb = doc["token_bytes"]
    assert tb["kv_position"] == 2 and tb["bytes_per_token"] == tb["weights"] + 2 * tb["kv_per_position"]
    for r in doc["results"]:
        assert set(r["runs"]) >= {"stock-distribute", "patched-migrate"}
        assert "| model | size | params | backend | threads | build | test | t/s |" in r["markdown"]
        for lab, run in r["runs"].items():
            cell = run["placement"]
            assert len(cell["per_thread"]) == 2 and all(0 <= x <= 1 for x in cell["per_thread"])
            assert set(run["tests"]) == {"pp16", "tg4"}
            pp, tg = run["tests"]["pp16"], run["tests"]["tg4"]
            assert pp["roofline"] is None and "compute" in pp["roofline_note"]
            assert tg["median"] > 0 and math.isfinite(tg["median"])
            roof = tg["roofline"]
            assert roof["error"] is None, (r["page_cache"], lab, roof)
            assert 0 < roof["percent_of_placement"] <= 100
            assert roof["percent_of_placement"] == pytest.approx(100 * tg["median"] / roof["placement_tokens_per_s"])
            if one_node:
                assert cell["per_thread"] == [1.0, 1.0]
                assert roof["placement_tokens_per_s"] == pytest.approx(roof["all_local_tokens_per_s"])
    assert "placement roofline" in proc.stdout and "| warm | patched-migrate |" in proc.stdout
