"""build/compile.py: only CPU variants whose instructions execute here are built and loaded."""

from __future__ import annotations

from pathlib import Path

import compile as native

import numa_llama

ROOT = Path(__file__).resolve().parent.parent


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
