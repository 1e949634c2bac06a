"""Probe and compile the patched llama.cpp through the bindings' own CMake project (``package.py`` drives it,
and decides what is shipped).

One CMake build of ``vendor/llama-cpp-python`` (whose ``vendor/llama.cpp`` is
the patched tree) with ``GGML_CPU_NUMA=ON``, shared libraries and ggml's
run-time CPU-variant selection (``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``).

Building all ~14 x86 variants costs ~2.5 min each on 2 cores, and the loader
would pick a variant by what cpuid *advertises*, which is not always what runs:
on our build machines cpuid and XCR0 advertise AMX but AMX instructions raise
SIGILL. So before building, every variant's instruction set is *executed* in a
child process (``cpu_probe.c``); a variant whose probe dies is never built, and
the build says so. Of the variants that run, the best one is built, plus
``sse42``, the variant that runs fast under QEMU TCG in the multi-node guest,
and ``haswell``, the first with CPU_REPACK, for the guests' repack scenario.
``NUMA_LLAMA_CPU_VARIANTS=a,b`` chooses others (still probed), and
``CMAKE_ARGS`` is honoured as llama-cpp-python honours it. The probe is a
first filter only: ``package.py`` then runs each built variant's own kernels.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROBE_SRC = HERE / "cpu_probe.c"

# ggml's x86 feature names -> the compiler flags ggml-cpu/CMakeLists.txt uses.
FEATURE_FLAGS = {
    "SSE42": ["-msse4.2"],
    "AVX": ["-mavx"],
    "F16C": ["-mf16c"],
    "FMA": ["-mfma"],
    "AVX2": ["-mavx2"],
    "BMI2": ["-mbmi2"],
    "AVX_VNNI": ["-mavxvnni"],
    "AVX512": ["-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw"],
    "AVX512_VBMI": ["-mavx512vbmi"],
    "AVX512_VNNI": ["-mavx512vnni"],
    "AVX512_BF16": ["-mavx512bf16"],
    "AMX_TILE": ["-mamx-tile"],
    "AMX_INT8": ["-mamx-int8"],
    "AMX_BF16": ["-mamx-bf16"],
}
GUEST_VARIANT = "sse42"
# the first x86 variant with CPU_REPACK (AVX2), which QEMU TCG also runs: the guests' repack scenario
# (numa-llama bench --scenarios repack) loads it; built beside the best where it runs here
REPACK_VARIANT = "haswell"
BASE_TARGETS = ["llama", "ggml", "ggml-base", "mtmd", "ggml-rpc"]
OPTIONAL_TARGETS = {"mtmd", "ggml-rpc"}  # CMAKE_ARGS may turn them off (LLAVA_BUILD, GGML_RPC)


class BuildError(RuntimeError):
    pass


@dataclass
class Variant:
    name: str
    features: list[str]
    runs: bool | None = None
    why: str = ""


LAUNCHERS = ("ccache", "sccache", "distcc", "icecc")  # words of CC/CXX that run the compiler, not compile


def _compiler(env: str, names: tuple[str, ...]) -> str | None:
    """The compiler that ``$env`` (or the first of ``names`` on PATH) runs, or None if it cannot be found.

    ``CC="ccache gcc"`` names gcc, behind a launcher: both must exist. A value that does not parse as shell words
    (an unclosed quote) names no compiler.
    """
    given = os.environ.get(env)
    if not given:
        return next((found for n in names if (found := shutil.which(n))), None)
    try:
        words = shlex.split(given)
    except ValueError:
        return None
    found = None
    for word in words:
        found = shutil.which(word)
        if found is None or Path(word).name not in LAUNCHERS:
            return found
    return None  # only a launcher, no compiler after it


def missing_tools() -> str:
    """One line naming what the build needs and this machine lacks (Debian packages given), or ``""``."""
    import sysconfig

    missing: list[tuple[str, str]] = []
    for tool, pkg in (("git", "git"), ("cmake", "cmake")):
        if shutil.which(tool) is None:
            missing.append((tool, pkg))
    if shutil.which("ninja") is None and shutil.which("make") is None:
        missing.append(("ninja (or make)", "ninja-build"))
    if _compiler("CC", ("cc", "gcc", "clang")) is None:
        missing.append(("a C compiler (cc)", "gcc"))
    if _compiler("CXX", ("c++", "g++", "clang++")) is None:
        missing.append(("a C++ compiler (c++)", "g++"))
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        missing.append((f"the Python headers ({include}/Python.h)", "python3-dev"))
    if not missing:
        return ""
    pkgs = " ".join(dict.fromkeys(p for _, p in missing))
    return f"missing {', '.join(t for t, _ in missing)}; on Debian: apt-get install {pkgs}"


def ccache_env(root: Path = ROOT) -> None:
    """Let ccache hit whatever directory this tree was unpacked to (a checkout, a clone, pip's unpacked sdist).

    ccache keys hold absolute paths unless they are under ``CCACHE_BASEDIR``: paths under it are hashed relative
    to the compiler's working directory, which is the same place inside every copy of this tree. A base directory
    the caller set is kept when this tree is inside it.
    """
    base = os.environ.get("CCACHE_BASEDIR")
    if not base or not root.resolve().is_relative_to(Path(base).resolve()):
        os.environ["CCACHE_BASEDIR"] = str(root.resolve())
    os.environ.setdefault("CCACHE_NOHASHDIR", "1")  # -g records the working directory: not part of the key


def x86_variants(llama_cpp: Path) -> list[Variant]:
    """The x86 variants ggml's CMake defines under GGML_CPU_ALL_VARIANTS, in its order."""
    text = (llama_cpp / "ggml" / "src" / "CMakeLists.txt").read_text()
    x86 = text.split('GGML_SYSTEM_ARCH STREQUAL "x86"', 2)[-1].split("elseif", 1)[0]
    found = re.findall(r"ggml_add_cpu_backend_variant\((\S+)((?:[ \t]+\w+)*)\)", x86)
    if not found:
        raise BuildError("could not find ggml's x86 CPU variants in ggml/src/CMakeLists.txt")
    return [Variant(name, feats.split()) for name, feats in found]


def probe(variant: Variant, cc: str = "cc", workdir: Path | None = None) -> Variant:
    """Compile cpu_probe.c for the variant's features and run it in a child process."""
    flags: list[str] = []
    for feat in variant.features:
        if feat not in FEATURE_FLAGS:
            variant.runs, variant.why = False, f"unknown feature {feat}"
            return variant
        flags += FEATURE_FLAGS[feat]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        exe = Path(tmp) / f"probe-{variant.name}"
        cmd = [cc, "-O1", *flags, str(PROBE_SRC), "-o", str(exe)]
        comp = subprocess.run(cmd, capture_output=True, text=True)
        if comp.returncode != 0:
            variant.runs, variant.why = False, "the compiler cannot build it: " + comp.stderr.strip()[-200:]
            return variant
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    if run.returncode == 0:
        variant.runs, variant.why = True, "ran"
    elif run.returncode < 0:
        variant.runs, variant.why = False, f"killed by {signal.Signals(-run.returncode).name}"
    else:
        variant.runs, variant.why = False, (run.stdout + run.stderr).strip() or f"exit {run.returncode}"
    return variant


def choose_variants(variants: list[Variant], wanted: list[str] | None, log=print) -> list[str]:
    """Probe, then return the variants to build (best that runs + sse42 + haswell, or ``wanted``)."""
    for v in variants:
        probe(v)
    runnable = [v for v in variants if v.runs]
    for v in variants:
        if not v.runs:
            log(f"-- cpu probe: variant {v.name:<15} OFF: {v.why}")
    if wanted:
        names = {v.name for v in variants}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise BuildError(
                f"NUMA_LLAMA_CPU_VARIANTS names unknown variant(s) {unknown}; ggml defines {sorted(names)}"
            )
        chosen = [w for w in wanted if any(v.name == w and v.runs for v in variants)]
        dropped = [w for w in wanted if w not in chosen]
        if dropped:
            log(f"-- cpu probe: not building {dropped}: their instructions do not execute here")
    else:
        if not runnable:
            raise BuildError("no ggml CPU variant executes on this machine (not even x64)")
        # ggml's loader scores a variant by the features it needs; the most
        # demanding variant that runs here is the one it should pick here.
        best = max(runnable, key=lambda v: (len(v.features), variants.index(v)))
        chosen = [best.name] + [
            extra
            for extra in (GUEST_VARIANT, REPACK_VARIANT)
            if extra != best.name and any(v.name == extra and v.runs for v in variants)
        ]
    if not chosen:
        raise BuildError("none of the requested CPU variants executes on this machine")
    log(f"-- cpu probe: building CPU variant(s) {', '.join(chosen)}")
    return chosen


X86_FEATURES = ["NATIVE", *FEATURE_FLAGS]


def variant_args(variant: Variant) -> list[str]:
    """What ``ggml_add_cpu_backend_variant(name FEATS)`` sets, as cache entries."""
    return [f"-DGGML_{f}={'ON' if f in variant.features else 'OFF'}" for f in X86_FEATURES]


def cmake_args(variant: Variant, extra: str | None = None) -> list[str]:
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_CPU_NUMA=ON",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_CCACHE=ON",
        "-DGGML_RPC=ON",  # Llama(rpc_servers=...): ggml-rpc's client, and numa-llama rpc-server's worker
        *variant_args(variant),
    ]
    # Like llama-cpp-python: CMAKE_ARGS comes last, so it overrides ours.
    return args + shlex.split(extra if extra is not None else os.environ.get("CMAKE_ARGS", ""))


def _stream(cmd: list[str], log) -> None:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        log(line)
    if proc.wait() != 0:
        raise BuildError(f"{cmd[0]} {cmd[1]} failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))


def _configure(source: Path, build_dir: Path, args: list[str], log) -> None:
    """Run CMake's configure step unless this directory already has exactly these arguments."""
    # The tools' paths are part of the key: a build directory remembers them,
    # and one that names a tool which has gone (pip's temporary build
    # environments) must be configured again.
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None:
        raise BuildError("cmake not found on PATH (apt-get install cmake, or pip install cmake)")
    # and so is the source: a build directory shared by two trees (NUMA_LLAMA_BUILD_DIR) must not build the other
    key = {"args": args, "cmake": cmake, "ninja": ninja, "source": str(source.resolve())}
    stamp = build_dir / "numa-llama-args.json"
    cache = build_dir / "CMakeCache.txt"
    if cache.exists():
        try:
            if json.loads(stamp.read_text()) == key:
                return
        except (OSError, ValueError):
            pass
        text = cache.read_text()
        generator = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", text, re.M)
        home = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", text, re.M)
        if (generator and generator.group(1) == "Ninja") != bool(ninja):
            log(f"-- numa-llama: {build_dir} was made with another generator: starting it afresh")
            shutil.rmtree(build_dir)
        elif home and Path(home.group(1)).resolve() != source.resolve():
            log(f"-- numa-llama: {build_dir} was made for {home.group(1)}: starting it afresh for {source}")
            shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    _stream([cmake, "-S", str(source), "-B", str(build_dir), *gen, *args], log)
    stamp.write_text(json.dumps(key) + "\n")


def _base_targets(build_dir: Path) -> list[str]:
    """llama, ggml, ggml-base and, unless CMAKE_ARGS turned them off, mtmd and ggml-rpc."""
    have = _targets(build_dir)
    missing = [t for t in BASE_TARGETS if t not in have and t not in OPTIONAL_TARGETS]
    if missing:
        raise BuildError(f"the configured project in {build_dir} has no target(s) {missing}")
    return [t for t in BASE_TARGETS if t in have]


def _targets(build_dir: Path) -> set[str]:
    proc = subprocess.run(["cmake", "--build", str(build_dir), "--target", "help"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"cannot list the targets of {build_dir}: {proc.stderr.strip()[-500:]}")
    names = set()
    for line in proc.stdout.splitlines():
        # Ninja: "name: phony"; Makefiles: "... name"
        m = re.match(r"^(?:\.\.\. )?([\w.+-]+)(?::|$)", line.strip())
        if m:
            names.add(m.group(1))
    return names


def _outputs(build_dir: Path, targets: list[str]) -> list[Path]:
    libs = []
    for t in targets:
        # most land in bin/; the bindings' add_subdirectory(tools/mtmd) keeps its own
        found = sorted(build_dir.glob(f"bin/lib{t}.so*")) or sorted(
            p for p in build_dir.rglob(f"lib{t}.so*") if "CMakeFiles" not in p.parts
        )
        if not found:
            raise BuildError(f"built target {t} but found no lib{t}.so under {build_dir}")
        libs += found
    return libs


def install_libs(libs: list[Path], dest: Path) -> None:
    """Copy the libraries (and their soname links) where llama_cpp loads them from."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("lib*.so*"):
        old.unlink()
    for lib in libs:
        target = dest / lib.name
        if lib.is_symlink():
            target.symlink_to(os.readlink(lib))
        else:
            shutil.copy2(lib, target)
