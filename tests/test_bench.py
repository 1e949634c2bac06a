"""``numa-llama bench``: the patched llama-bench per strategy, interleaved; clear errors on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import bench_build
import pytest
from conftest import ROOT

from numa_llama import bench
from numa_llama.sysfs import read_topology


def numa_llama(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "numa_llama", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def patched_bench() -> Path:
    """The patched tree's llama-bench, built here (minutes once, seconds with the build directory kept)."""
    return bench_build.build_bench("patched", log=lambda _: None)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    proc = numa_llama("bench", str(tmp_path / "nope.gguf"), "--llama-bench", sys.executable)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"numa-llama: model file not found: {tmp_path / 'nope.gguf'}"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--strategies", "off,interleave"], "unknown strategy ['interleave']"),
        (["--strategies", ","], "unknown strategy"),
        (["--rounds", "0"], "--rounds, --reps and --threads must be >= 1"),
        (["--reps", "0"], "--rounds, --reps and --threads must be >= 1"),
        (["-p", "0", "-n", "0"], "not both 0"),
        (["-t", "0"], "--rounds, --reps and --threads must be >= 1"),
    ],
)
def test_bad_arguments_are_clear_errors(args: list[str], says: str) -> None:
    proc = numa_llama("bench", *args)
    assert proc.returncode == 2
    assert says in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.model
def test_a_missing_llama_bench_is_named(tmp_path: Path) -> None:
    proc = numa_llama("bench", "--llama-bench", str(tmp_path / "llama-bench"), "--rounds", "1")
    assert proc.returncode == 1
    assert f"no llama-bench at {tmp_path / 'llama-bench'}" in proc.stderr


@pytest.mark.model
def test_a_tiny_bench_runs_in_every_ci_run(patched_bench: Path) -> None:
    """pp16/tg4, one round: the bench code runs end to end in CI (the other real runs are in tox -e bench).

    Migrate runs over 2 virtual nodes (on one real node it would run the same code as off), so the node-local
    paths are what is timed. One round of a 2-core machine is noisy, so the ratio is held only to a sanity
    range: a ratio outside 0.5-2 is a broken measurement, not a slow build."""
    proc = numa_llama(
        "bench", "--llama-bench", str(patched_bench), "--strategies", "off,migrate", "-t", "2",
        "--rounds", "1", "-r", "1", "-p", "16", "-n", "4", "--json",
        env={"GGML_CPU_NUMA_VIRTUAL": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["baseline"] == "patched-off" and out["tests"] == ["pp16", "tg4"]
    assert set(out["samples"]) == set(out["median_tokens_per_s"]) == {"patched-off", "patched-migrate"}
    for per_test in out["samples"].values():
        assert set(per_test) == {"pp16", "tg4"}
        assert all(len(v) == 1 and v[0] > 0 and math.isfinite(v[0]) for v in per_test.values()), per_test
    ratios = out["ratio_to_baseline"]["patched-migrate"]
    assert set(ratios) == {"pp16", "tg4"}
    assert all(math.isfinite(r) and 0.5 <= r <= 2.0 for r in ratios.values()), ratios


@pytest.mark.model
@pytest.mark.bench
def test_interleaved_runs_give_medians_and_ratios(patched_bench: Path, tmp_path: Path) -> None:
    """A real (short) comparison: every configuration in every round, in JSON and as a table."""
    md = tmp_path / "bench.md"
    proc = numa_llama(
        "bench",
        "--llama-bench",
        str(patched_bench),
        "--strategies",
        "off,migrate",
        "-t",
        "2",
        "--rounds",
        "2",
        "-r",
        "1",
        "-p",
        "32",
        "-n",
        "8",
        "--json",
        "--markdown",
        str(md),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["baseline"] == "patched-off" and out["tests"] == ["pp32", "tg8"]
    for label in ("patched-off", "patched-migrate"):
        for test in ("pp32", "tg8"):
            samples = out["samples"][label][test]
            assert len(samples) == 2 and all(s > 0 for s in samples)
            assert out["median_tokens_per_s"][label][test] > 0
    ratios = out["ratio_to_baseline"]["patched-migrate"]
    assert set(ratios) == {"pp32", "tg8"} and all(r > 0 for r in ratios.values())
    table = md.read_text().splitlines()
    assert table[0] == "| configuration | pp32 t/s | tg8 t/s | pp32 ÷ patched-off | tg8 ÷ patched-off |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["patched-off", "patched-migrate"]


@pytest.mark.model
@pytest.mark.bench
def test_sweep_threads_runs_every_count_and_names_the_best(patched_bench: Path, tmp_path: Path) -> None:
    """--sweep-threads on this machine's node: every configuration at each count of sweep_counts, as JSON, as a
    table, and the best count per configuration and test."""
    counts = bench.sweep_counts([len(n.usable_cpus) for n in read_topology().nodes])
    args = [
        "bench",
        "--llama-bench",
        str(patched_bench),
        "--strategies",
        "off,migrate",
        "--sweep-threads",
        "--rounds",
        "1",
        "-r",
        "1",
        "-p",
        "16",
        "-n",
        "4",
    ]
    proc = numa_llama(*args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["threads"] for r in out["sweep"]] == counts
    for label in ("patched-off", "patched-migrate"):
        for test in ("pp16", "tg4"):
            best = out["best"][label][test]
            medians = {r["threads"]: r["median_tokens_per_s"][label][test] for r in out["sweep"]}
            assert best["threads"] in counts and best["tokens_per_s"] == max(medians.values()) > 0
    md = tmp_path / "sweep.md"
    proc = numa_llama(*args, "--markdown", str(md))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = md.read_text().splitlines()
    assert table[0] == "| threads | configuration | pp16 t/s | tg4 t/s |"
    assert [row.split("|")[1].strip() for row in table[2:]] == [str(n) for n in counts for _ in range(2)]
    assert proc.stdout.count("best for ") == 2


def test_ratio_is_the_median_of_within_round_ratios() -> None:
    """A noisy round slows both sides: the within-round ratio cancels it, a ratio of medians would not."""
    res = bench.Result(
        "m.gguf",
        2,
        3,
        "stock",
        ["tg128"],
        {"stock": {"tg128": [100.0, 50.0, 100.0]}, "patched": {"tg128": [99.0, 49.0, 101.0]}},
    )
    assert res.ratios("patched", "tg128") == [0.99, 0.98, 1.01]
    assert res.ratio("patched", "tg128") == 0.99
    assert res.median("stock", "tg128") == 100.0


def test_sweep_counts_are_equal_per_node_then_every_cpu() -> None:
    assert bench.sweep_counts([2]) == [1, 2]
    assert bench.sweep_counts([8, 8]) == [2, 4, 8, 16]
    assert bench.sweep_counts([4, 0, 3]) == [2, 4, 7]  # a memory-only node gets no threads
    with pytest.raises(bench.BenchError, match="no node has a usable CPU"):
        bench.sweep_counts([0, 0])


def test_one_node_baseline_runs_under_numactl_with_that_nodes_cpus() -> None:
    cfg = bench.one_node_baseline(Path("/x/llama-bench"), 1, 12)
    argv = cfg.argv(Path("m.gguf"), 48, 512, 128, 3)
    assert argv[:5] == ["numactl", "-m", "1", "-N", "1"] and argv[5] == "/x/llama-bench"
    assert argv[argv.index("-t") + 1] == "12" and "--numa" not in argv
