"""What a build ships: the CPU variants ``compile.py`` builds, each verified by its own kernels here.

``compile.py`` probes and compiles (one CMake build per CPU variant). Executing one instruction per extension
does not prove that a variant's kernels run: a machine can grant AMX to the probe and still fault in ggml's AMX
kernels. So every built variant is then *verified*: ``numa-llama-cpu-check`` (``cpu_check.c``, built here and
shipped beside the libraries) loads the variant library in a child process and runs every matmul path it can
take, with more threads than CPUs for a second, against a float64 reference; its results are also compared with
``sse42``'s. A variant that dies, hangs or disagrees is not packaged, and the build log names the signal, the
function and the case; when that was the best variant, the next best that passes is built and shipped instead.

``NUMA_LLAMA_CPU_VARIANTS=all`` builds every x86 variant ggml's portable builds ship (a portable wheel). The
variants that cannot run here are packaged unverified, and the loader verifies them where they run
(``numa_llama/_variants.py``, which also keeps the verdicts of this build for this boot).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import compile as native
from compile import GUEST_VARIANT, BuildError, Variant, _base_targets, _configure, _outputs, _stream, cmake_args

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECK_SRC = HERE / "cpu_check.c"
CHECKER = "numa-llama-cpu-check"
BUILD_SECONDS = 1.0  # how long the build runs each variant's kernels


@dataclass
class BuildResult:
    libs: list[Path]
    variants: list[str]
    cmake_args: list[str]
    seconds: float
    verdicts: dict = field(default_factory=dict)  # variant -> _variants.Verdict, for those run here
    verify_seconds: float = 0.0


def _variants_module():
    """numa_llama/_variants.py, loaded by path: it imports nothing of numa_llama, which is not installed yet."""
    spec = importlib.util.spec_from_file_location("numa_llama_variants", ROOT / "numa_llama" / "_variants.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def choose(variants: list[Variant], wanted: list[str] | None, log=print) -> list[str]:
    """compile.choose_variants, plus ``all``: every variant, those that run here first, best first."""
    if wanted == ["all"]:
        for v in variants:
            native.probe(v)
        log(f"-- cpu probe: NUMA_LLAMA_CPU_VARIANTS=all: building every variant ggml defines ({len(variants)})")
        for v in variants:
            if not v.runs:
                log(f"-- cpu probe: variant {v.name:<15} cannot run here ({v.why}): packaged unverified")
        order = sorted(variants, key=lambda v: (not v.runs, -len(v.features), -variants.index(v)))
        return [v.name for v in order]
    return native.choose_variants(variants, wanted, log=log)


def fallbacks(variants: list[Variant], chosen: list[str]) -> list[str]:
    """The variants that run here and were not chosen, best first: what replaces a best one that fails."""
    runnable = [v for v in variants if v.runs and v.name not in chosen]
    return [v.name for v in sorted(runnable, key=lambda v: (-len(v.features), -variants.index(v)))]


def install_libs(libs: list[Path], dest: Path) -> None:
    """compile.install_libs, and the CPU-variant check beside the libraries."""
    native.install_libs([p for p in libs if p.name != CHECKER], dest)
    for p in libs:
        if p.name == CHECKER:
            (dest / CHECKER).unlink(missing_ok=True)
            shutil.copy2(p, dest / CHECKER)


def build(source: Path, build_root: Path, jobs: int | None = None, log=print) -> BuildResult:
    """Build the libraries to ship: one CMake build of the bindings' project for
    the best CPU variant, plus one ``ggml-cpu``-only build per further variant;
    then verify each variant's kernels here and ship only those that pass.

    This is what ``GGML_CPU_ALL_VARIANTS`` does, one variant per build
    directory, so that only the probed variants are compiled: under
    ``GGML_CPU_ALL_VARIANTS`` the ``ggml`` target depends on every variant.
    """
    t0 = time.monotonic()
    wanted_env = os.environ.get("NUMA_LLAMA_CPU_VARIANTS", "")
    wanted = [w.strip() for w in wanted_env.split(",") if w.strip()] or None
    all_variants = native.x86_variants(source / "vendor" / "llama.cpp")
    names = choose(all_variants, wanted, log=log)
    by_name = {v.name: v for v in all_variants}
    jobs = jobs or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", 0)) or os.cpu_count() or 1
    if shutil.which("ccache"):
        native.ccache_env()
        log(f"-- numa-llama: ccache found; ggml's GGML_CCACHE uses it (CCACHE_BASEDIR={os.environ['CCACHE_BASEDIR']})")
    else:
        log("-- numa-llama: ccache not found: every build compiles from scratch (apt-get install ccache)")
    base_libs: list[Path] = []
    variant_libs: dict[str, Path] = {}
    main_args: list[str] = []

    def build_variant(name: str, i: int, n: int) -> None:
        nonlocal main_args
        args = cmake_args(by_name[name])
        build_dir = build_root if i == 0 else build_root.parent / f"{build_root.name}-cpu-{name}"
        log(f"-- numa-llama: CPU variant {name} ({i + 1}/{n}) in {build_dir}")
        _configure(source, build_dir, args, log)
        targets = (_base_targets(build_dir) if i == 0 else []) + ["ggml-cpu"]
        _stream(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", *targets], log)
        bin_dir = build_dir / "bin"
        if i == 0:
            main_args = args
            base_libs.extend(_outputs(build_dir, [t for t in targets if t != "ggml-cpu"]))
        cpu = bin_dir / "libggml-cpu.so"
        if not cpu.exists():
            raise BuildError(f"built ggml-cpu but found no {cpu} (did CMAKE_ARGS change the CPU backend?)")
        # The name the loader scans for (libggml-cpu-*.so) and ranks by score.
        renamed = bin_dir / f"libggml-cpu-{name}.so"
        shutil.copy2(cpu, renamed)
        variant_libs[name] = renamed

    for i, name in enumerate(names):
        build_variant(name, i, len(names))
    checker = build_checker(source, build_root, log)

    t_verify = time.monotonic()
    stage = build_root.parent / "lib-verify"
    install_libs([*base_libs, *variant_libs.values(), checker], stage)
    runs_here = [n for n in names if by_name[n].runs]
    verdicts = verify_variants(stage, runs_here, log)
    if not wanted and names[0] in verdicts and not verdicts[names[0]].ok:
        # the best variant fails here: build the next best that runs, until one passes
        for extra in fallbacks(all_variants, names):
            log(f"-- cpu verify: building {extra} in place of {names[0]}")
            build_variant(extra, len(names), len(names) + 1)
            install_libs([*base_libs, *variant_libs.values(), checker], stage)
            verdicts.update(verify_variants(stage, [extra], log, reference=verdicts.get(GUEST_VARIANT)))
            names.insert(0, extra)
            if verdicts[extra].ok:
                break
    shipped = [n for n in names if n not in verdicts or verdicts[n].ok]
    dropped = [n for n in names if n not in shipped]
    if not shipped:
        raise BuildError(
            "no CPU variant passes its own kernels on this machine: "
            + "; ".join(f"{n}: {verdicts[n].how}" for n in dropped)
        )
    if dropped:
        log(f"-- cpu verify: not packaging {', '.join(dropped)}; packaging {', '.join(shipped)}")
    unverified = [n for n in shipped if n not in verdicts]
    if unverified:
        log(f"-- cpu verify: packaged unverified (they cannot run here; verified where they run): {unverified}")
    libs = [*base_libs, *(variant_libs[n] for n in shipped), checker]
    return BuildResult(
        libs, shipped, main_args, time.monotonic() - t0, verdicts=verdicts, verify_seconds=time.monotonic() - t_verify
    )


def build_checker(source: Path, build_root: Path, log=print) -> Path:
    """numa-llama-cpu-check, against the ggml-base just built (it finds it beside itself: rpath $ORIGIN)."""
    cc = os.environ.get("CC", "cc")
    out = build_root / "bin" / "numa-llama-cpu-check"
    include = source / "vendor" / "llama.cpp" / "ggml" / "include"
    cmd = [cc, "-O2", "-std=gnu11", "-Wall", f"-I{include}", str(CHECK_SRC), "-o", str(out)]
    cmd += [f"-L{build_root / 'bin'}", "-lggml-base", "-ldl", "-lm", "-Wl,-rpath,$ORIGIN"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError("cannot compile the CPU-variant check (build/cpu_check.c):\n" + proc.stderr[-2000:])
    return out


def verify_variants(lib_dir: Path, names: list[str], log=print, reference=None, seconds: float = BUILD_SECONDS):
    """Run each variant's kernels in lib_dir (``numa-llama-cpu-check``); compare each with sse42's results.

    Returns ``{name: Verdict}``; each verdict is also kept in this boot's verdict cache, so the first import
    on this machine need not verify again.
    """
    variants = _variants_module()
    checker = lib_dir / variants.CHECKER
    out_root = lib_dir.parent / "cpu-verify-out"
    verdicts = {}
    # the reference first: sse42, the variant every x86-64-v2 machine (and the TCG guest) runs
    order = sorted(names, key=lambda n: n != GUEST_VARIANT)
    for name in order:
        lib = lib_dir / f"libggml-cpu-{name}.so"
        out = out_root / name
        shutil.rmtree(out, ignore_errors=True)
        verdict = variants.check(lib, checker, seconds, out_dir=out)
        ref = verdicts.get(GUEST_VARIANT) if name != GUEST_VARIANT else None
        if ref is None and reference is not None and name != GUEST_VARIANT:
            ref = reference
        if verdict.ok and ref is not None and ref.ok:
            worst = variants.compare(out_root / GUEST_VARIANT, out)
            if worst is not None and not worst[1] <= variants.TOLERANCE:
                verdict.ok = False
                verdict.case = worst[0]
                verdict.how = f"disagrees with {GUEST_VARIANT} in case {worst[0]} (nmse {worst[1]:.3g})"
            elif worst is not None:
                verdict.how += f"; agrees with {GUEST_VARIANT} (worst nmse {worst[1]:.2g}, case {worst[0]})"
        verdicts[name] = verdict
        log(f"-- cpu verify: variant {name:<15} {'OK' if verdict.ok else 'FAILED'}: {verdict.how}")
    problem = variants.record({variants.sha256(lib_dir / f"libggml-cpu-{n}.so"): v for n, v in verdicts.items()})
    if problem:
        log(f"-- cpu verify: cannot keep the verdicts in {variants.cache_path()}: {problem}")
    return verdicts


def smoke_test(lib_dir: Path, python: str = sys.executable) -> str:
    """Load the built libraries in a child process, as the patched llama_cpp does; return the system-info line.

    The CPU variant is the one ``numa_llama/_variants.py`` chooses (verified here), not ggml's best by score.
    """
    code = (
        "import ctypes, importlib.util, sys\n"
        f"d = {str(lib_dir)!r}\n"
        f"spec = importlib.util.spec_from_file_location('v', {str(ROOT / 'numa_llama' / '_variants.py')!r})\n"
        "v = importlib.util.module_from_spec(spec); sys.modules['v'] = v; spec.loader.exec_module(v)\n"
        "from pathlib import Path\n"
        "cpu = v.choose_cpu_variant(Path(d))\n"
        "g = ctypes.CDLL(d + '/libggml.so')\n"
        "g.ggml_backend_load.restype = ctypes.c_void_p\n"
        "assert g.ggml_backend_load(str(cpu).encode()), cpu\n"
        "l = ctypes.CDLL(d + '/libllama.so')\n"
        "l.llama_backend_init()\n"
        "l.llama_print_system_info.restype = ctypes.c_char_p\n"
        "print(cpu.name + ': ' + l.llama_print_system_info().decode())\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        sig = f" ({signal.Signals(-proc.returncode).name})" if proc.returncode < 0 else ""
        raise BuildError(
            f"the built library dies when loaded on this machine: exit {proc.returncode}{sig}\n" + proc.stderr[-2000:]
        )
    return proc.stdout.strip()
