"""``pip install numa-llama`` from its sdist: what ``python -m build --sdist`` makes installs as the checkout does.

The sdist carries build/ (the tools, the probe, the checker, the pin) and both patch series; the pinned upstream
sdist is fetched at build time by pip, checked against the pin (build/upstream.py), here from the cache the
checkout's own build filled. Metadata (pip's dry run) must neither fetch, patch nor compile. The install is a
fresh venv's pip install of the tarball, dependencies from the package index as a user's would come; its
compile hits the checkout's ccache (build/compile.py:ccache_env), so it takes about a minute, not five.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path

import pytest
from conftest import ROOT
from upstream import Pin, cache_dir

import numa_llama

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    cmd = [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (tar,) = out.glob("numa_llama-*.tar.gz")
    return tar


def _tracked(*dirs: str) -> set[str]:
    proc = subprocess.run(["git", "ls-files", *dirs], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_sdist_carries_what_the_build_needs(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        top, *_ = tar.getnames()[0].split("/")
        names = {n.removeprefix(top + "/") for n in tar.getnames() if tar.getmember(n).isfile()}
    # every tracked file of the build tools, both series and the package: the pin, probe and checker with them
    needed = _tracked("build", "patches", "numa_llama") | {"setup.py", "setup.cfg", "pyproject.toml", "README.md"}
    assert {"build/pin.toml", "build/cpu_probe.c", "build/cpu_check.c", "patches/llama.cpp/series"} <= needed
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    for series in ("llama.cpp", "llama-cpp-python"):
        lines = (ROOT / "patches" / series / "series").read_text().splitlines()
        listed = {f"patches/{series}/{ln.strip()}" for ln in lines if ln.strip() and not ln.startswith("#")}
        assert listed and listed <= names
    # nothing fetched, built or generated
    stray = [n for n in names if n.startswith("vendor/") or n.endswith((".so", ".pyc", ".o"))]
    stray += [n for n in names if n.startswith("_build/") and not n.startswith("_build/numa_llama.egg-info/")]
    stray += [n for n in names if n == "numa_llama/_build_info.json"]
    assert not stray, stray


def test_metadata_neither_fetches_patches_nor_compiles(sdist: Path, tmp_path: Path) -> None:
    """pip's dry run prepares metadata only: no vendor/, no CMake tree, nothing fetched."""
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (src,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    env = {**os.environ, "NUMA_LLAMA_CACHE": str(cache)}
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q"]
    cmd += ["--disable-pip-version-check", "--report", str(report), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (item,) = json.loads(report.read_text())["install"]
    assert (item["metadata"]["name"], item["metadata"]["version"]) == ("numa-llama", "0.1.0")
    assert not (src / "vendor").exists(), "metadata fetched or unpacked the upstream"
    assert not (src / "_build" / "cmake").exists(), "metadata configured or compiled llama.cpp"
    assert list(cache.iterdir()) == [], "metadata downloaded something"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def test_install_from_sdist_in_a_fresh_venv(sdist: Path, tmp_path: Path, model_path: Path) -> None:
    where = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(where)
    py, bindir = where / "bin" / "python", where / "bin"
    # the upstream sdist comes from the cache the checkout's build filled (fetched and hash-checked there); a
    # user's first install fetches it with pip, --require-hashes (test_upstream.py)
    assert (cache_dir() / Pin.load().sdist).exists()
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "NUMA_LLAMA_BUILD_DIR"}  # the sdist's own tree, built
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-v", str(sdist)]
    proc = _run(cmd, timeout=1800, env=env)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    said = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if "numa-llama:" in ln or "cpu verify" in ln]
    print(f"pip install of {sdist.name} in a fresh venv: {seconds:.1f} s", *said, sep="\n  ")
    assert any("cpu verify: variant" in ln and " OK" in ln for ln in said), said
    # the same working install as the checkout's: the patched bindings import, the same series, and text
    where_from = _run([str(py), "-c", "import llama_cpp; print(llama_cpp.__file__)"], timeout=300, cwd=tmp_path)
    assert where_from.returncode == 0, where_from.stderr[-3000:]
    bindings = Path(where_from.stdout.strip().splitlines()[-1])
    assert bindings.is_relative_to(where) and "_numa_llama_bindings" in bindings.parts, bindings
    info = _run([str(bindir / "numa-llama"), "info", "--json"], timeout=300, cwd=tmp_path)
    assert info.returncode == 0, info.stderr[-3000:]
    fresh_info, ours = json.loads(info.stdout), numa_llama.build_info().as_dict()
    for key in ("llama_cpp_python", "sdist_sha256", "llama_cpp_commit", "patches", "cpu_variants_built"):
        assert fresh_info[key] == ours[key], key
    assert fresh_info["cpu_numa_hooks"] is True
    version = _run([str(bindir / "numa-llama"), "--version"], timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == "numa-llama 0.1.0", version
    run = [str(bindir / "numa-llama"), "run", str(model_path), "The capital of France is", "-n", "8", "--json"]
    fresh = _run(run, timeout=600, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    checkout = _run([sys.executable, "-m", "numa_llama", *run[1:]], timeout=600, cwd=tmp_path)
    assert checkout.returncode == 0, checkout.stderr[-3000:]
    a, b = (json.loads(p.stdout) for p in (fresh, checkout))
    assert a["text"] and a["text"] == b["text"], (a, b)
