"""numa-llama beside the real, stock llama-cpp-python 0.3.36: both install orders, then uninstalling either.

Each case ends with the patched llama_cpp importing, or (numa-llama uninstalled) with the stock one as pip
installed it: every file its RECORD lists present, with its recorded hash. Never a stock llama_cpp while
numa-llama is installed, never a half-deleted one (numa_llama/_finder.py says how).

The stock wheel is built once per machine from the pinned sdist (the one vendor/ comes from, hash-checked when
it was fetched) and kept by the sdist's hash and its CMAKE_ARGS; every install here is offline (--no-index).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT
from upstream import Pin, cache_dir, sha256_of

PROBE = """
import json, llama_cpp, llama_cpp.llama_cpp as lib
try:
    import numa_llama
    numa = numa_llama.__file__
except ImportError:
    numa = None
print(json.dumps({"file": llama_cpp.__file__, "patched": hasattr(lib, "GGML_NUMA_STRATEGY_MIGRATE"), "numa": numa}))
"""


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def stock_wheel() -> Path:
    """llama-cpp-python 0.3.36 built by pip from its own sdist (minutes, once per machine)."""
    pin = Pin.load()
    sdist = cache_dir() / pin.sdist
    if not sdist.exists() or sha256_of(sdist) != pin.sha256:
        pytest.fail(f"{sdist} missing or not the pinned one: run python build/sync.py fetch")
    # Its own build option, as a user would pass it: no libmtmd (multimodal), which llama_cpp loads only for a
    # multimodal chat handler. That is 51 of the 137 compile steps of our own build of the same tree; none of the
    # coexistence cases needs it: they are about which llama_cpp imports and which files stay.
    cmake_args = "-DLLAVA_BUILD=OFF"
    key = hashlib.sha256(f"{pin.sha256} {cmake_args}".encode()).hexdigest()[:16]
    house = cache_dir() / "wheels" / key
    found = sorted(house.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    house.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "LLAMA_CPP_LIB_PATH")}
    env["CMAKE_ARGS"] = cmake_args
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(house), str(sdist)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted(house.glob("llama_cpp_python-*.whl"))[-1]


@pytest.fixture(scope="module")
def numa_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel: the one tox built, or one built now (the persistent _build/ makes it seconds)."""
    given = [Path(p) for p in os.environ.get("TOX_PACKAGE", "").split(os.pathsep) if p.endswith(".whl")]
    if given and given[0].exists():
        return given[0]
    out = tmp_path_factory.mktemp("numa-wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("numa_llama-*.whl"))


@pytest.fixture(scope="module")
def deps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What both distributions import (numpy, jinja2, ...), once, shared by every venv below through a .pth."""
    d = tmp_path_factory.mktemp("deps")
    reqs = ["numpy", "typing-extensions", "diskcache", "jinja2", "cffi", "gguf"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(d), *reqs],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An application (as a wheel) whose requirements name llama-cpp-python, as most llama.cpp apps' do."""
    d = tmp_path_factory.mktemp("app")
    (d / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "chat-app"\nversion = "1.0"\ndependencies = ["llama-cpp-python==0.3.36"]\n'
        "[tool.setuptools]\npy-modules = []\n"
    )
    out = tmp_path_factory.mktemp("app-wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("chat_app-*.whl"))


def _venv(where: Path, deps: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(where)
    site = next(where.glob("lib/python*/site-packages"))
    (site / "shared-deps.pth").write_text(f"{deps}\n")
    return where / "bin" / "python"


def _probe(python: Path) -> dict:
    proc = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=python.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _whole(python: Path, dist: str) -> int:
    """Every file of the installed ``dist``'s RECORD is there with its recorded hash; returns how many."""
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    info = next(site.glob(f"{dist.replace('-', '_')}-*.dist-info"))
    n = 0
    with (info / "RECORD").open() as f:
        for path, digest, _size in csv.reader(f):
            if not digest:
                continue
            algo, _, want = digest.partition("=")
            data = (site / path).read_bytes()  # FileNotFoundError: half-deleted
            got = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
            assert got == want, f"{dist}: {path} is not the file it installed"
            n += 1
    return n


def _installed(python: Path) -> set[str]:
    proc = _pip(python, "list", "--format=json")
    assert proc.returncode == 0, proc.stderr
    return {p["name"].lower().replace("_", "-") for p in json.loads(proc.stdout)}


@pytest.mark.parametrize("order", ["numa-llama-first", "stock-first"])
@pytest.mark.parametrize("remove", ["llama-cpp-python", "numa-llama"])
def test_both_install_orders_then_uninstall_either(
    order: str, remove: str, tmp_path: Path, stock_wheel: Path, numa_wheel: Path, deps: Path, app: Path
) -> None:
    python = _venv(tmp_path / "venv", deps)
    offline = ["install", "--no-index", "--find-links", str(stock_wheel.parent)]
    if order == "numa-llama-first":
        steps = [[*offline, "--no-deps", str(numa_wheel)], [*offline, str(app)]]
    else:
        steps = [[*offline, "--no-deps", str(stock_wheel)], [*offline, "--no-deps", str(numa_wheel)]]
    for step in steps:
        proc = _pip(python, *step)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {"numa-llama", "llama-cpp-python"} <= _installed(python)  # the app's install pulled the stock one in

    both = _probe(python)
    assert both["patched"] and "_numa_llama_bindings" in both["file"], both
    assert _whole(python, "numa-llama") > 0 and _whole(python, "llama-cpp-python") > 0

    proc = _pip(python, "uninstall", "-y", remove)
    assert proc.returncode == 0, proc.stderr
    after = _probe(python)
    if remove == "llama-cpp-python":
        assert after["patched"] and "_numa_llama_bindings" in after["file"], after
        assert _whole(python, "numa-llama") > 0
    else:
        # numa-llama is gone, finder and all: what imports is the stock package, whole, as pip installed it
        assert not after["patched"] and after["numa"] is None, after
        assert _whole(python, "llama-cpp-python") > 0
