"""The read-bandwidth matrix and the decode roofline: measured figures, and clear errors on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from numa_llama import roofline
from numa_llama.kernel import NumaError
from numa_llama.sysfs import read_topology


def numa_llama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "numa_llama", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_the_bandwidth_matrix_is_a_positive_finite_figure_with_its_spread() -> None:
    """The short form CI runs: every (CPU node, memory node) cell, 3 repeats of 32 MiB per thread.

    A reading loop that the compiler dropped, or a clock read at the wrong place, gives a figure no memory has
    (above 10 TB/s) or no figure at all; a matrix that skips a node misses a cell."""
    proc = numa_llama("topology", "--bandwidth", "--bandwidth-mib", "32", "--bandwidth-repeats", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    bw = json.loads(proc.stdout)["bandwidth"]
    topo = read_topology()
    cpu_nodes = [n.id for n in topo.compute_nodes()]
    assert bw["cpu_nodes"] == cpu_nodes and bw["repeats"] == 3 and bw["mib_per_thread"] == 32
    assert "MPOL_BIND" in bw["method"]
    cells = {(c["cpu_node"], c["mem_node"]): c for c in bw["cells"]}
    assert set(cells) == {(i, j) for i in cpu_nodes for j in bw["mem_nodes"]}
    for c in cells.values():
        samples = c["samples_gb_s"]
        assert len(samples) == 3 and all(math.isfinite(s) and 0 < s < 10_000 for s in samples), c
        assert c["min_gb_s"] <= c["median_gb_s"] <= c["max_gb_s"]
        assert c["spread"] == pytest.approx((c["max_gb_s"] - c["min_gb_s"]) / c["median_gb_s"])
        assert c["threads"] == len(topo.nodes[topo.node_ids.index(c["cpu_node"])].usable_cpus)


@pytest.mark.numa_guest
def test_every_cell_of_the_matrix_reads_memory_on_its_node() -> None:
    """Several nodes: each cell's buffers are bound to their memory node, and the C loop asks the kernel where 64
    pages of each buffer are before it reads (a cell whose pages are elsewhere fails, naming move_pages). Under
    TCG the figures are not speeds; the binding is what this checks."""
    proc = numa_llama("topology", "--bandwidth", "--bandwidth-mib", "4", "--bandwidth-repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    bw = json.loads(proc.stdout)["bandwidth"]
    nodes = [n.id for n in read_topology().compute_nodes()]
    assert len(nodes) >= 2
    cells = {(c["cpu_node"], c["mem_node"]): c for c in bw["cells"]}
    assert set(cells) == {(i, j) for i in nodes for j in bw["mem_nodes"]} and set(nodes) <= set(bw["mem_nodes"])
    assert all(math.isfinite(c["median_gb_s"]) and c["median_gb_s"] > 0 for c in cells.values())


def test_the_bandwidth_table_names_its_method() -> None:
    proc = numa_llama("topology", "--bandwidth", "--bandwidth-mib", "8", "--bandwidth-repeats", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("read bandwidth, GB/s")))
    assert "memory on node" in lines[head + 1]
    row = lines[head + 2].split()
    assert float(row[1]) > 0 and "(" in row[2]
    assert any(line.startswith("method: one thread per usable CPU") for line in lines)


@pytest.mark.parametrize("flag", ["--bandwidth-mib", "--bandwidth-repeats"])
def test_bad_bandwidth_arguments_are_one_line(flag: str) -> None:
    proc = numa_llama("topology", "--bandwidth", flag, "0")
    assert proc.returncode == 2
    assert proc.stderr == "numa-llama: --bandwidth-mib and --bandwidth-repeats must be >= 1\n"


def test_a_node_that_does_not_exist_is_the_kernels_error_named() -> None:
    with pytest.raises(NumaError, match=r"reading node 1000's memory \(mbind: Invalid argument\)"):
        roofline.stream_read([os.sched_getaffinity(0).pop()], 1000, 1 << 20, 1)


@pytest.mark.model
def test_bytes_per_token_of_gemma_3_270m(model_path) -> None:
    """The model card's shape: 18 layers, 1 KV head, keys and values of 256: 18432 f16 bytes per position.

    gemma-3 ties its output matrix to the token embedding: the 262144 x 640 embedding is read by every decoded
    token, and a count that leaves it out (as a model with its own output.weight would) is 40% short."""
    tb = roofline.token_bytes(model_path)
    assert tb.kv_per_position == 18 * 1 * (256 + 256) * 2
    assert tb.tied_output
    from numa_llama.decode import gguf_weights

    ws = {w.name: w for w in gguf_weights(model_path)}
    emb = ws["token_embd.weight"]
    assert (emb.n_rows, emb.row_bytes * emb.n_rows) == (262144, tb.weights - sum(
        w.row_bytes * w.n_rows * w.n_matrices for n, w in ws.items() if n != "token_embd.weight"
    ))  # fmt: skip
    assert 0.9 * model_path.stat().st_size < tb.weights < model_path.stat().st_size
    assert tb.at(100) - tb.at(0) == 100 * tb.kv_per_position


def test_a_rate_above_the_roofline_is_an_error_not_a_result() -> None:
    limit = roofline.roofline_tokens_per_s(20.0, 200e6)
    assert limit == pytest.approx(100.0)
    assert roofline.percent_of_roofline(75.0, limit) == pytest.approx(75.0)
    with pytest.raises(roofline.RooflineError, match="101.0% of the 100.00 t/s roofline: a measurement error"):
        roofline.percent_of_roofline(101.0, limit)
    with pytest.raises(roofline.RooflineError, match="positive"):
        roofline.roofline_tokens_per_s(0.0, 200e6)


def _gguf(path, **kv) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_per_layer_head_count_is_refused_not_guessed(tmp_path) -> None:
    ok = {"llama.block_count": 2, "llama.attention.head_count": 4, "llama.embedding_length": 32}
    _gguf(tmp_path / "ok.gguf", **ok, **{"llama.attention.head_count_kv": 2})
    tb = roofline.token_bytes(tmp_path / "ok.gguf")
    assert (tb.weights, tb.kv_per_position, tb.tied_output) == (8 * 32 * 4, 2 * 2 * (8 + 8) * 2, False)
    _gguf(tmp_path / "array.gguf", **ok, **{"llama.attention.head_count_kv": [2, 0]})
    with pytest.raises(roofline.RooflineError, match=r"llama.attention.head_count_kv is per layer"):
        roofline.token_bytes(tmp_path / "array.gguf")
    _gguf(tmp_path / "none.gguf", **{"llama.block_count": 2})
    with pytest.raises(roofline.RooflineError, match=r"has no llama.attention.head_count"):
        roofline.token_bytes(tmp_path / "none.gguf")
