"""build/compile.py: only CPU variants whose instructions execute here are built and loaded."""

from __future__ import annotations

import os
from pathlib import Path

import compile as native

import numa_llama

ROOT = Path(__file__).resolve().parent.parent
HOST_PATH = os.environ.get("PATH", os.defpath)


def test_variants_come_from_ggml_cmake() -> None:
    variants = {v.name: v.features for v in native.x86_variants(ROOT / "vendor" / "llama.cpp")}
    assert variants["x64"] == []
    assert variants["sse42"] == ["SSE42"]
    assert variants["haswell"] == ["SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"]
    assert "AMX_INT8" in variants["sapphirerapids"]


def test_probe_runs_baseline_and_rejects_unknown() -> None:
    assert native.probe(native.Variant("x64", [])).runs is True
    bad = native.probe(native.Variant("bogus", ["NOT_A_FEATURE"]))
    assert bad.runs is False and "unknown feature" in bad.why


def test_built_variants_all_execute_here() -> None:
    """Every variant the installed build carries passes the execution probe on this machine."""
    info = numa_llama.build_info()
    by_name = {v.name: v for v in native.x86_variants(ROOT / "vendor" / "llama.cpp")}
    assert info.cpu_variants_built
    for name in info.cpu_variants_built:
        assert native.probe(by_name[name]).runs, name


def test_loaded_variant_is_the_best_built() -> None:
    info = numa_llama.build_info()
    assert info.cpu_backend_loaded == f"libggml-cpu-{info.cpu_variants_built[0]}.so"


def test_cmake_args_override_last() -> None:
    args = native.cmake_args(native.Variant("sse42", ["SSE42"]), extra="-DGGML_OPENMP=OFF -DGGML_SSE42=OFF")
    assert "-DGGML_CPU_NUMA=ON" in args and "-DGGML_BACKEND_DL=ON" in args
    assert args[-2:] == ["-DGGML_OPENMP=OFF", "-DGGML_SSE42=OFF"]
    assert args.index("-DGGML_SSE42=ON") < args.index("-DGGML_SSE42=OFF")


def test_each_built_variant_runs_the_model(tmp_path: Path, model_path: Path) -> None:
    """Every shipped CPU variant (sse42 is the one the TCG guest will pick) loads and generates here."""
    import shutil

    from conftest import run_json

    info = numa_llama.build_info()
    texts = {}
    for name in info.cpu_variants_built:
        libdir = tmp_path / name
        shutil.copytree(info.library_dir, libdir, symlinks=True)
        for other in libdir.glob("libggml-cpu-*.so"):
            if other.name != f"libggml-cpu-{name}.so":
                other.unlink()
        out = run_json(
            f"""
import json, numa_llama
from llama_cpp import Llama
llm = Llama({str(model_path)!r}, n_ctx=128, verbose=False)
text = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
print(json.dumps({{"loaded": numa_llama.build_info().cpu_backend_loaded, "text": text}}))
""",
            env={"LLAMA_CPP_LIB_PATH": str(libdir)},
        )
        assert out["loaded"] == f"libggml-cpu-{name}.so"
        texts[name] = out["text"]
    assert all(t.strip() for t in texts.values()), texts


def _path_with(tmp_path: Path, tools: list[str]) -> str:
    """A PATH holding only these tools (links to the real ones)."""
    import shutil

    d = tmp_path / "bin"
    d.mkdir(parents=True, exist_ok=True)
    for t in tools:
        real = shutil.which(t, path=HOST_PATH)
        assert real, t
        (d / t).symlink_to(real)
    return str(d)


def test_missing_tools_are_named_in_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", _path_with(tmp_path, ["git", "cc", "c++", "cmake", "ninja"]))
    assert native.missing_tools() == ""
    monkeypatch.setenv("PATH", _path_with(tmp_path / "few", ["git", "cc"]))
    said = native.missing_tools()
    assert said == (
        "missing cmake, ninja (or make), a C++ compiler (c++); on Debian: apt-get install cmake ninja-build g++"
    )
    monkeypatch.setenv("CXX", "/nonexistent/g++")  # a compiler named by CXX must exist itself
    monkeypatch.setenv("PATH", _path_with(tmp_path / "cxx", ["git", "cc", "c++", "cmake", "ninja"]))
    assert native.missing_tools() == "missing a C++ compiler (c++); on Debian: apt-get install g++"


def test_a_compiler_behind_a_launcher_must_exist_itself(tmp_path: Path, monkeypatch) -> None:
    """CC="ccache gcc" names gcc: ccache alone on PATH is not a compiler, and bad quoting names none."""
    monkeypatch.setenv("PATH", _path_with(tmp_path, ["git", "cmake", "ninja", "ccache", "cc", "c++"]))
    monkeypatch.setenv("CXX", "c++")
    monkeypatch.setenv("CC", "ccache cc")
    assert native.missing_tools() == ""
    monkeypatch.setenv("CC", "ccache gcc-nonexistent")
    assert native.missing_tools() == "missing a C compiler (cc); on Debian: apt-get install gcc"
    monkeypatch.setenv("CC", "ccache")
    assert native.missing_tools() == "missing a C compiler (cc); on Debian: apt-get install gcc"
    monkeypatch.setenv("CC", "'cc")
    assert native.missing_tools() == "missing a C compiler (cc); on Debian: apt-get install gcc"


def test_build_without_cmake_stops_with_one_line(tmp_path: Path) -> None:
    """pip's build of the wheel, on a machine without cmake and ninja: one line, before anything is fetched."""
    import subprocess
    import sys

    env = {**os.environ, "PATH": _path_with(tmp_path, ["git", "cc", "c++"]), "NUMA_LLAMA_CACHE": str(tmp_path / "c")}
    env.pop("CC", None), env.pop("CXX", None)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(tmp_path / "w")]
    proc = subprocess.run([*cmd, str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stderr[-2000:]
    said = (proc.stdout + proc.stderr).splitlines()
    ours = [ln.strip() for ln in said if ln.strip().startswith("numa-llama:")]
    assert ours == [
        "numa-llama: cannot build: missing cmake, ninja (or make); on Debian: apt-get install cmake ninja-build"
    ], proc.stderr[-2000:]
    assert not any("Traceback" in ln for ln in said)
    assert not (tmp_path / "c").exists() and not list((tmp_path / "w").glob("*.whl"))


def test_ccache_base_dir_covers_the_tree_wherever_it_is(tmp_path: Path, monkeypatch) -> None:
    """ccache hashes paths under CCACHE_BASEDIR relative to the build: a copy of the tree elsewhere can hit."""
    tree = tmp_path / "unpacked" / "numa_llama-0.1.0"
    tree.mkdir(parents=True)
    monkeypatch.delenv("CCACHE_BASEDIR", raising=False)
    monkeypatch.delenv("CCACHE_NOHASHDIR", raising=False)
    native.ccache_env(tree)
    assert os.environ["CCACHE_BASEDIR"] == str(tree) and os.environ["CCACHE_NOHASHDIR"] == "1"
    monkeypatch.setenv("CCACHE_BASEDIR", str(tmp_path / "elsewhere"))  # a clone's, say: not above this tree
    native.ccache_env(tree)
    assert os.environ["CCACHE_BASEDIR"] == str(tree)
    monkeypatch.setenv("CCACHE_BASEDIR", str(tmp_path))  # the caller's, above the tree: kept
    native.ccache_env(tree)
    assert os.environ["CCACHE_BASEDIR"] == str(tmp_path)


def test_a_build_dir_made_for_another_tree_starts_afresh(tmp_path: Path) -> None:
    """NUMA_LLAMA_BUILD_DIR shared by two trees: the second configures its own, never builds the first's."""
    trees = [tmp_path / "a", tmp_path / "b"]
    for t in trees:
        t.mkdir()
        (t / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(t NONE)\n")
    build = tmp_path / "build"
    for t in trees:
        native._configure(t, build, ["-DX=1"], log=lambda line: None)
        cache = (build / "CMakeCache.txt").read_text()
        assert f"CMAKE_HOME_DIRECTORY:INTERNAL={t}" in cache


def test_editable_install_is_refused_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys
    import venv

    venv.EnvBuilder(with_pip=False).create(tmp_path / "v")  # somewhere to install into, that pip leaves unchanged
    cmd = [sys.executable, "-m", "pip", "--python", str(tmp_path / "v" / "bin" / "python"), "install"]
    cmd += ["--disable-pip-version-check", "--no-deps", "-e"]
    env = {**os.environ, "NUMA_LLAMA_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([*cmd, str(ROOT)], capture_output=True, text=True, timeout=600, env=env)
    said = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip().startswith("numa-llama:")]
    assert proc.returncode != 0
    assert said == ["numa-llama: cannot build: editable installs are not supported (pip install . instead)"], said
    assert not list((tmp_path / "v").glob("lib/python*/site-packages/*numa*")), "something was installed"
