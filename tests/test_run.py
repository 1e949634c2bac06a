"""The main job on the real model: the text does not depend on the NUMA strategy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.model


def numa_llama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "numa_llama", *args], capture_output=True, text=True, cwd=ROOT / "tests", timeout=600
    )


def run(numa: str, *extra: str) -> dict:
    proc = numa_llama("run", "--numa", numa, "-n", "24", "--json", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("extra", [(), ("--threads", "2"), ("--no-mmap",)])
def test_text_same_off_and_migrate(extra: tuple[str, ...]) -> None:
    """Greedy decoding must give the same text whatever the NUMA strategy: migrate changes where, not what."""
    off, migrate = run("off", *extra), run("migrate", *extra)
    assert off["strategy"] == 0 and migrate["strategy"] == 5
    assert off["generated_tokens"] == migrate["generated_tokens"] > 0
    assert off["text"] == migrate["text"] and off["text"].strip()


def test_main_job_reports_speed_and_numa() -> None:
    proc = numa_llama("run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    assert "tokens/s generated" in lines["speed"]
    assert "numa=migrate" in lines["numa"]


def test_missing_model_is_a_clear_error(tmp_path) -> None:
    proc = numa_llama("run", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"numa-llama: model file not found: {tmp_path / 'nope.gguf'}"


def test_unknown_numa_is_a_clear_error() -> None:
    proc = numa_llama("run", "--numa", "mirrored")
    assert proc.returncode == 2
    assert "unknown numa strategy 'mirrored'" in proc.stderr and "'migrate'" in proc.stderr
