"""numa_llama.build_info() and the error when a stock llama_cpp is what Python loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert info.patches["llama.cpp"][1].startswith("0002-ggml-cpu-add-GGML_CPU_NUMA")


def test_build_info_reports_the_running_library() -> None:
    info = numa_llama.build_info()
    assert info.cpu_numa_hooks  # from the loaded CPU backend, not from our record
    assert "AVX" in info.cpu_features or "SSE3" in info.cpu_features  # its features, as llama.cpp prints them
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


def run_beside_stock(code: str, stock_bindings: Path) -> subprocess.CompletedProcess:
    """code where Python loads the stock bindings (over our libraries): ``-S`` leaves numa_llama.pth, and so
    the finder that puts the patched llama_cpp first (numa_llama/_finder.py), unread, and the stock bindings
    come first on sys.path, numa_llama's site-packages after them."""
    lib = Path(numa_llama.build_info().library_dir)
    sites = [p for p in sys.path if p.endswith("site-packages")]  # numa_llama's, and those of what it imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stock_bindings), *sites]), "LLAMA_CPP_LIB_PATH": str(lib)}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=stock_bindings
    )


def test_stock_llama_cpp_is_refused(stock_bindings: Path) -> None:
    """Stock bindings first: the API says how to fix it, in one line."""
    proc = run_beside_stock("import numa_llama; numa_llama.locality", stock_bindings)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("numa_llama._build.StockLlamaCppError: numa_llama needs the llama_cpp built by numa-llama")
    assert "stock llama-cpp-python" in last and "Fix:" in last


# python -m numa_llama ARGS, in the child's own sys.path (where the stock bindings come first)
CLI = "import runpy, sys; sys.argv = ['numa-llama', *{args!r}]; runpy.run_module('numa_llama', run_name='__main__')"


def test_cli_help_and_version_work_beside_a_stock_llama_cpp(stock_bindings: Path) -> None:
    """--help and --version need no llama_cpp; a subcommand says what is wrong in one line and exits 3."""
    for args, out in ((["--help"], "usage: numa-llama"), (["--version"], f"numa-llama {numa_llama.__version__}")):
        proc = run_beside_stock(CLI.format(args=args), stock_bindings)
        assert proc.returncode == 0 and proc.stdout.startswith(out), (args, proc.stdout, proc.stderr[-1000:])
        assert "Traceback" not in proc.stderr
    for sub in (["info"], ["topology"], ["run", "-n", "1"], ["rpc-server", "--numa", "migrate"]):
        proc = run_beside_stock(CLI.format(args=sub), stock_bindings)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 3 and len(lines) == 1, (sub, proc.returncode, proc.stderr[-2000:])
        assert lines[0].startswith("numa-llama: numa_llama needs the llama_cpp built by numa-llama"), lines


def test_patched_llama_cpp_is_accepted() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    proc = run_python("import numa_llama; print('ok')", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_patched_bindings_come_first_over_a_stock_llama_cpp_on_sys_path(stock_bindings: Path) -> None:
    """numa_llama.pth's finder answers ``import llama_cpp`` before sys.path is searched (numa_llama/_finder.py)."""
    code = (
        "import json, llama_cpp, llama_cpp.llama_cpp as lib; "
        "print(json.dumps([llama_cpp.__file__, hasattr(lib, 'GGML_NUMA_STRATEGY_MIGRATE')]))"
    )
    proc = run_python(code, env={"PYTHONPATH": str(stock_bindings)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, patched = json.loads(proc.stdout.strip().splitlines()[-1])
    assert patched and "_numa_llama_bindings" in where and not where.startswith(str(stock_bindings))
