"""numa_llama.build_info() and the error when a stock llama_cpp is what Python loads."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, run_python
from upstream import Pin, cache_dir

import numa_llama


def series_names(name: str) -> list[str]:
    text = (ROOT / "patches" / name / "series").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_build_info_matches_the_pin_and_the_series() -> None:
    info = numa_llama.build_info()
    pin = Pin.load()
    assert (info.llama_cpp_python, info.sdist_sha256, info.llama_cpp_commit) == (
        pin.version,
        pin.sha256,
        pin.llama_cpp_commit,
    )
    assert info.patches == {
        "llama.cpp": series_names("llama.cpp"),
        "llama-cpp-python": series_names("llama-cpp-python"),
    }
    assert info.patches["llama.cpp"][0].startswith("0001-ggml-cpu-add-GGML_CPU_NUMA")


def test_build_info_reports_the_running_library() -> None:
    info = numa_llama.build_info()
    assert info.cpu_features["CPU_NUMA"] == "1"  # from the loaded CPU backend, not from our record
    assert (Path(info.library_dir) / "libllama.so").is_file()
    assert "-DGGML_CPU_NUMA=ON" in info.cmake_args


@pytest.fixture(scope="module")
def stock_bindings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-cpp-python 0.3.36's own, unpatched llama_cpp package, from the pinned sdist."""
    pin = Pin.load()
    sdist = cache_dir() / pin.sdist
    if not sdist.exists():
        pytest.fail(f"{sdist} missing: run python build/sync.py fetch")
    out = tmp_path_factory.mktemp("stock")
    prefix = sdist.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix + "llama_cpp/")]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(out, members=members, filter="data")
    return out


def test_stock_llama_cpp_is_refused(stock_bindings: Path) -> None:
    """Stock bindings first on sys.path (even over our libraries): import numa_llama says how to fix it."""
    lib = Path(numa_llama.build_info().library_dir)
    proc = run_python("import numa_llama", env={"PYTHONPATH": str(stock_bindings), "LLAMA_CPP_LIB_PATH": str(lib)})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("numa_llama._build.StockLlamaCppError: numa_llama needs the llama_cpp built by numa-llama")
    assert "stock llama-cpp-python" in last and "Fix:" in last


def test_patched_llama_cpp_is_accepted() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    proc = run_python("import numa_llama; print('ok')", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
