"""A CPU variant is loaded only when its own kernels have run here (numa_llama/_variants.py, build/package.py).

The faulty variant is real: the best variant this build ships, compiled by ggml, with ``ud2`` written over the
entry of ggml_compute_forward_mul_mat (tests/faulty_variant.py). It loads, registers and scores as the original
does; ggml's own loader would pick it, and the first product in the plain CPU buffer raises SIGILL, which is what
an AMX machine did with ggml's AMX kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import package
import pytest
from conftest import run_python
from faulty_variant import make_faulty

import numa_llama
from numa_llama import _variants

FAULT_AT = "ggml_compute_forward_mul_mat"
PROMPT = "The capital of France is"


def _installed_lib() -> Path:
    return Path(numa_llama.build_info().library_dir)


def _best(lib_dir: Path) -> Path:
    got = _variants.scores(_variants.variant_libraries(lib_dir), lib_dir / _variants.CHECKER)
    return max(got, key=lambda p: got[p])


@pytest.fixture
def faulty_dir(tmp_path: Path) -> tuple[Path, str]:
    """A copy of the installed libraries whose best variant faults in its matrix product."""
    lib = tmp_path / "lib"
    shutil.copytree(_installed_lib(), lib, symlinks=True)
    best = _best(lib)
    make_faulty(_installed_lib() / best.name, best, FAULT_AT)
    return lib, _variants.variant_of(best)


def _generate(lib_dir: Path, model: Path, cache: Path, variant: str = ""):
    """Greedy text from a fresh interpreter whose llama_cpp loads its libraries from lib_dir."""
    code = f"""
import json, numa_llama
from llama_cpp import Llama
llm = Llama({str(model)!r}, n_ctx=128, n_threads=2, verbose=False)
text = llm.create_completion({PROMPT!r}, max_tokens=6, temperature=0.0)["choices"][0]["text"]
print(json.dumps({{"loaded": numa_llama.build_info().cpu_backend_loaded, "text": text}}))
"""
    env = {"LLAMA_CPP_LIB_PATH": str(lib_dir), "XDG_CACHE_HOME": str(cache), _variants.ENV: variant}
    return run_python(code, env=env, timeout=300)


def test_checker_names_the_signal_the_function_and_the_case(faulty_dir: tuple[Path, str]) -> None:
    lib, name = faulty_dir
    v = _variants.check(lib / f"libggml-cpu-{name}.so", lib / _variants.CHECKER, seconds=0.2)
    assert not v.ok
    assert v.signal == "SIGILL" and v.symbol == FAULT_AT, v
    assert v.case and v.case.startswith("CPU-mul_mat-"), v  # the plain CPU buffer: repack products do not get there
    assert v.how == f"SIGILL in {FAULT_AT} (case {v.case})"


def test_checker_catches_a_wrong_product(tmp_path: Path) -> None:
    """A kernel that returns without writing its result (``ret`` at the entry of the q4_K dot product)."""
    lib = tmp_path / "lib"
    shutil.copytree(_installed_lib(), lib, symlinks=True)
    sse42 = lib / "libggml-cpu-sse42.so"
    shutil.copy2(sse42, tmp_path / "orig.so")
    from faulty_variant import file_offset, symbol_address

    off = file_offset(sse42, symbol_address(sse42, "ggml_vec_dot_q4_K_q8_K"))
    with sse42.open("r+b") as f:
        f.seek(off)
        f.write(b"\xc3")  # ret
    v = _variants.check(sse42, lib / _variants.CHECKER, seconds=0.1)
    assert not v.ok and v.signal is None
    assert v.case is not None and "q4_K" in v.case and v.how.startswith("wrong result in case"), v


def test_the_build_drops_a_faulting_variant_and_names_it(faulty_dir: tuple[Path, str], tmp_path: Path) -> None:
    """What build/package.py runs on every variant it built, before packaging: the faulty one fails, named."""
    lib, name = faulty_dir
    if name == "sse42":
        pytest.fail("this machine's best variant is sse42, the reference: build the test with another variant")
    lines: list[str] = []
    os.environ["XDG_CACHE_HOME"], old = str(tmp_path / "cache"), os.environ.get("XDG_CACHE_HOME")
    try:
        verdicts = package.verify_variants(lib, ["sse42", name], log=lines.append, seconds=0.3)
    finally:
        os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.__setitem__("XDG_CACHE_HOME", old)
    assert verdicts["sse42"].ok and not verdicts[name].ok
    failed = [ln for ln in lines if name in ln and "FAILED" in ln]
    assert failed and f"SIGILL in {FAULT_AT}" in failed[0], lines
    # and the verdict is kept for this boot, so the loader does not run it again
    cache = json.loads((tmp_path / "cache" / "numa-llama" / "cpu-variants.json").read_text())
    assert cache["boot_id"] == _variants.boot_id()
    assert cache["verdicts"][_variants.sha256(lib / f"libggml-cpu-{name}.so")]["ok"] is False


def test_the_loader_skips_a_faulting_variant_and_text_still_comes(
    faulty_dir: tuple[Path, str], tmp_path: Path, model_path: Path
) -> None:
    lib, name = faulty_dir
    # the control: loaded without verification, as ggml's loader would pick it, the variant dies in a product
    forced = _generate(lib, model_path, tmp_path / "c0", variant=name)
    assert forced.returncode == -signal.SIGILL, (forced.returncode, forced.stderr[-2000:])

    first = _generate(lib, model_path, tmp_path / "c1")
    assert first.returncode == 0, first.stderr[-3000:]
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out["loaded"] != f"libggml-cpu-{name}.so" and out["loaded"].startswith("libggml-cpu-")
    said = [ln for ln in first.stderr.splitlines() if ln.startswith("numa-llama:") and name in ln]
    assert any(f"SIGILL in {FAULT_AT}" in ln and "not loaded" in ln for ln in said), first.stderr[-2000:]

    # the same text as the variant it fell back to, loaded from the untouched install
    fallback = _variants.variant_of(Path(out["loaded"]))
    ref = _generate(_installed_lib(), model_path, tmp_path / "c2", variant=fallback)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert json.loads(ref.stdout.strip().splitlines()[-1])["text"] == out["text"]
    assert out["text"].strip()

    # a second process reads the verdicts of the first: nothing is verified again, the faulty one still skipped
    second = _generate(lib, model_path, tmp_path / "c1")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "verified on this machine" not in second.stderr
    assert f"SIGILL in {FAULT_AT}" in second.stderr


def test_a_cache_of_another_boot_or_unreadable_is_verified_again(tmp_path: Path) -> None:
    lib = _installed_lib()
    path = tmp_path / "numa-llama" / "cpu-variants.json"
    path.parent.mkdir(parents=True)
    for stale in ("{not json", json.dumps({"version": 1, "boot_id": "another-boot", "verdicts": {}})):
        path.write_text(stale)
        logs: list[str] = []
        os.environ["XDG_CACHE_HOME"], old = str(tmp_path), os.environ.get("XDG_CACHE_HOME")
        try:
            chosen = _variants.choose_cpu_variant(lib, log=logs.append, seconds=0.1)
        finally:
            os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.__setitem__("XDG_CACHE_HOME", old)
        assert chosen == _best(lib)
        assert any("verified on this machine" in ln for ln in logs), logs
        assert json.loads(path.read_text())["boot_id"] == _variants.boot_id()


def test_an_unwritable_cache_falls_back_to_this_boots_temporary_directory(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"XDG_CACHE_HOME": str(blocked), "TMPDIR": str(tmp), _variants.ENV: ""}
    for run in (1, 2):
        proc = run_python("from llama_cpp import llama_cpp; print('ok')", env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
        verified = "verified on this machine" in proc.stderr
        assert verified == (run == 1), proc.stderr  # the second process reads what the first kept
    kept = json.loads((tmp / f"numa-llama-{os.getuid()}" / "cpu-variants.json").read_text())
    assert kept["boot_id"] == _variants.boot_id() and kept["verdicts"]


def test_no_writable_cache_verifies_per_process_and_says_so_once(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    env = {"XDG_CACHE_HOME": str(blocked), "TMPDIR": str(blocked), _variants.ENV: ""}
    proc = run_python("from llama_cpp import llama_cpp; print('ok')", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "cannot keep CPU-variant verdicts" in ln]
    assert len(said) == 1 and "verifying again in every process" in said[0], proc.stderr


@pytest.mark.parametrize(
    ("value", "expect"),
    [("no-such-variant", "unknown: no-such-variant"), ("sse42,-sse42", "expected one variant to force")],
)
def test_a_bad_override_is_one_clear_line(value: str, expect: str) -> None:
    proc = run_python("import llama_cpp", env={_variants.ENV: value})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("numa_llama._variants.VariantError: NUMA_LLAMA_CPU_VARIANT=") and expect in last, last


def test_excluding_the_best_loads_the_next(tmp_path: Path) -> None:
    lib = _installed_lib()
    best = _variants.variant_of(_best(lib))
    names = sorted(_variants.variant_of(p) for p in _variants.variant_libraries(lib))
    if len(names) < 2:
        pytest.fail(f"this build ships one CPU variant ({names}): nothing to fall back to")
    code = "import json, numa_llama, llama_cpp; print(json.dumps(numa_llama.build_info().cpu_backend_loaded))"
    proc = run_python(code, env={_variants.ENV: f"-{best}", "XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded != f"libggml-cpu-{best}.so" and loaded in {f"libggml-cpu-{n}.so" for n in names}
    assert f"{best} (excluded by NUMA_LLAMA_CPU_VARIANT)" in proc.stderr


def test_every_shipped_variant_was_verified_by_the_build() -> None:
    rec = json.loads((Path(numa_llama.__file__).parent / "_build_info.json").read_text())
    verified = rec["cpu_variants_verified"]
    for name in rec["cpu_variants"]:
        assert verified[name]["ok"], (name, verified[name])
        assert "cases" in verified[name]["how"] and "threads" in verified[name]["how"]
