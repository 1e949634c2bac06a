"""``numa-llama forecast``: the 2-socket forecast from measured guest locality and cited peak bandwidths. Host
only: the inputs are files, the model is arithmetic, and every expected figure follows from the cited peaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from numa_llama import forecast

FOUR, THREE = forecast.PLATFORMS["epyc9004-4xgmi"], forecast.PLATFORMS["epyc9004-3xgmi"]


def cell(scenario: str, strategy: str, per_thread=None, thread_node=None, share=None, unanswered=0.0) -> dict:
    loc = None if per_thread is None else sum(per_thread) / len(per_thread)
    return {
        "scenario": scenario,
        "strategy": strategy,
        "locality": loc,
        "per_thread": per_thread,
        "thread_node": thread_node,
        "page_share": share or {},
        "unanswered": unanswered,
    }


def result(*cells: dict, nodes: int = 2) -> dict:
    return {"topology": {"nodes": [{"id": n, "usable_cpus": [n]} for n in range(nodes)]}, "cells": list(cells)}


def test_the_warm_cache_halves_what_stock_can_reach_and_migrate_keeps_it() -> None:
    """Warm on node 0: every byte comes from node 0's memory, which alone sets the pace (half the roofline),
    whatever the link; migrate's all-local threads reach the roofline; isolate uses one socket's memory."""
    rows = forecast.forecast(
        result(
            cell("warm", "distribute", [1.0, 0.0, 1.0, 0.0], [0, 1, 0, 1]),
            cell("warm", "migrate", [1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1]),
            cell("cold", "isolate", [1.0, 1.0], [1, 1]),
            cell("warm", "isolate", [0.0, 0.0], [1, 1]),
        ),
        [FOUR, THREE],
    )
    got = [(r["strategy"], r["forecast"]["epyc9004-4xgmi"], r["forecast"]["epyc9004-3xgmi"]) for r in rows]
    assert got[0] == ("distribute", pytest.approx(0.5), pytest.approx(0.5))
    assert got[1] == ("migrate", pytest.approx(1.0), pytest.approx(1.0))
    assert got[2] == ("isolate", pytest.approx(0.5), pytest.approx(0.5))
    # every byte over the link: 3 links (384 GB/s) are slower than node 0's memory (460.8)
    assert got[3] == ("isolate", pytest.approx(0.5), pytest.approx(384 / (2 * 460.8)))


def test_interleaved_pages_are_limited_by_the_link_only_where_it_is_slower_than_memory() -> None:
    """numactl --interleave: half of every byte crosses the link. With 4 xGMI links (512 GB/s) the memory sets
    the pace and the roofline holds; with 3 (384 GB/s) the link does: 384 / 460.8 of it."""
    (row,) = forecast.forecast(result(cell("cold", "numactl", share={"0": 0.5, "1": 0.5})), [FOUR, THREE])
    assert row["traffic"] == [[0.25, 0.25], [0.25, 0.25]]
    assert row["forecast"]["epyc9004-4xgmi"] == pytest.approx(1.0)
    assert row["forecast"]["epyc9004-3xgmi"] == pytest.approx(384 / 460.8)


def test_a_cell_the_kernel_did_not_answer_for_gets_no_forecast() -> None:
    rows = forecast.forecast(
        result(
            cell("no-mmap", "migrate", [0.7, 0.7], [0, 1], unanswered=0.2),
            cell("no-mmap", "distribute", [1.0, 1.0], [0, 1], unanswered=0.005),
        ),
        [FOUR],
    )
    assert rows[0]["forecast"] == {"epyc9004-4xgmi": None}
    assert rows[1]["forecast"]["epyc9004-4xgmi"] == pytest.approx(1.0)
    text = forecast.table(rows, [FOUR])
    assert text.startswith("FORECAST, not a measurement")
    assert "| no-mmap | migrate | 70.00% | — |" in text
    assert "no-mmap / migrate (20.0%)" in text and "no-mmap / distribute (" not in text


def test_every_platform_cites_the_figures_it_uses() -> None:
    for p in forecast.PLATFORMS.values():
        assert "https://" in p.source
        assert f"{p.node_gbs} GB/s" in p.source, p.key
        assert f"{p.link_gbs:g} GB/s" in p.source, p.key


def numa_llama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "numa_llama", "forecast", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file"),
        ("not json", "not a bench --scenarios --json result"),
        (json.dumps(result(cell("cold", "migrate", [1.0] * 4, [0, 1, 2, 3]), nodes=4)), "has 4 nodes"),
        (json.dumps({"topology": result()["topology"], "cells": [{"scenario": "cold"}]}), "unanswered"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, content: str | None, says: str) -> None:
    f = tmp_path / "result.json"
    if content is not None:
        f.write_text(content)
    proc = numa_llama(str(f))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert says in lines[0] and proc.stdout == ""


def test_an_unknown_platform_is_named(tmp_path: Path) -> None:
    f = tmp_path / "result.json"
    f.write_text(json.dumps(result(cell("cold", "migrate", [1.0, 1.0], [0, 1]))))
    proc = numa_llama(str(f), "--platform", "xeon9")
    assert proc.returncode == 2 and "unknown platform xeon9" in proc.stderr and "epyc9004-4xgmi" in proc.stderr
    ok = numa_llama(str(f), "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["forecast"] is True and out["rows"][0]["forecast"]["epyc9004-4xgmi"] == pytest.approx(1.0)
