"""Build llama.cpp's ggml-level tests against a standalone ggml build of a tree.

``test-barrier`` and ``test-backend-ops`` need only ggml, so they are compiled
against the tree's ggml libraries alone (ggml-base + ggml-cpu, ~2.5 min on 2
cores with an empty ccache), not against the whole of llama.cpp. Flavours:

``guest``
    the ``sse42`` CPU variant with OpenMP, like the shipped ``sse42`` library:
    the one that runs at a usable speed in the QEMU multi-node guest;
``guest-avx2``
    the ``haswell`` variant (AVX2): the repack, tiled and llamafile kernels
    exist only from AVX/AVX2 on; QEMU's TCG runs it, ~30x slower than sse42;
``best``
    the most demanding variant whose probe executes here (what the wheel
    built here ships first): the kernel properties run through it natively;
``tsan``
    the same with ThreadSanitizer (``GGML_SANITIZE_THREAD``) and without
    OpenMP, whose runtime is not instrumented: the thread pool and both
    barriers are ggml's own code, and every line of it is checked.

Usage: ``python build/ggml_tests.py [--tree DIR] [--flavor guest|tsan]
[--test NAME ...]``; prints the directory that holds the test binaries.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import compile as native  # noqa: E402

# flavour -> (ggml CPU variant, extra CMake arguments)
FLAVORS = {
    "guest": (native.GUEST_VARIANT, ["-DCMAKE_BUILD_TYPE=Release"]),
    "guest-avx2": ("haswell", ["-DCMAKE_BUILD_TYPE=Release"]),
    # the same without the series' option: the build that must stay the stock one (series_bisect.py)
    "guest-avx2-off": ("haswell", ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_CPU_NUMA=OFF"]),
    "best": ("", ["-DCMAKE_BUILD_TYPE=Release"]),  # "": the best variant that runs here (compile.choose_variants)
    "tsan": (
        native.GUEST_VARIANT,
        ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DGGML_SANITIZE_THREAD=ON", "-DGGML_OPENMP=OFF"],
    ),
    # the llamafile sgemm teams and the repack/tiled paths need AVX2: sse42 has none of them
    "tsan-avx2": (
        "haswell",
        ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DGGML_SANITIZE_THREAD=ON", "-DGGML_OPENMP=OFF"],
    ),
}
TESTS = ["test-barrier", "test-cpu-numa", "test-backend-ops"]


def ggml_args(tree: Path, flavor: str) -> list[str]:
    if flavor not in FLAVORS:
        raise native.BuildError(f"unknown flavour {flavor!r}; choose from {sorted(FLAVORS)}")
    name, extra = FLAVORS[flavor]
    if not name:
        name = native.choose_variants(native.x86_variants(tree), None, log=lambda _: None)[0]
    variant = next((v for v in native.x86_variants(tree) if v.name == name), None)
    if variant is None:
        raise native.BuildError(f"{tree} defines no {name} CPU variant")
    return [
        "-DGGML_CPU_NUMA=ON",
        "-DBUILD_SHARED_LIBS=ON",
        "-DGGML_BACKEND_DL=OFF",
        "-DGGML_CCACHE=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_CURL=OFF",
        *native.variant_args(variant),
        *extra,
    ]


def build_tests(tree: Path, flavor: str, tests: list[str], build_root: Path | None = None, log=print) -> Path:
    """Build ggml from ``tree`` and the named tests against it; return the directory of both."""
    tree = tree.resolve()
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        raise native.BuildError(f"unknown test(s) {unknown}; this builds {TESTS}")
    build_dir = (build_root or ROOT / "_build") / f"ggml-{flavor}"
    # configured from the top of the tree (ggml/ on its own expects ggml's own repository layout); only the
    # ggml target is built
    native._configure(tree, build_dir, ggml_args(tree, flavor), log)
    jobs = int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", 0)) or os.cpu_count() or 1
    native._stream(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "ggml"], log)
    bin_dir = build_dir / "bin"
    cxx = [c for c in ("ccache",) if shutil.which(c)] + [os.environ.get("CXX", "c++")]
    flags = ["-O2", "-std=c++17", "-Wall", "-pthread"]
    if flavor.startswith("tsan"):
        flags += ["-g", "-fsanitize=thread"]
    for test in tests:
        exe = bin_dir / test
        src = tree / "tests" / f"{test}.cpp"
        cmd = [
            *cxx,
            *flags,
            "-I",
            str(tree / "ggml" / "include"),
            str(src),
            "-o",
            str(exe),
            "-L",
            str(bin_dir),
            "-lggml",
            "-lggml-cpu",
            "-lggml-base",
            f"-Wl,-rpath,{bin_dir}",
        ]
        newest_input = max(src.stat().st_mtime, (bin_dir / "libggml-cpu.so").stat().st_mtime)
        if not exe.exists() or exe.stat().st_mtime < newest_input:
            native._stream(cmd, log)
    return bin_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=ROOT / "vendor" / "llama.cpp", help="the llama.cpp tree")
    ap.add_argument("--flavor", choices=sorted(FLAVORS), default="guest")
    ap.add_argument("--test", action="append", choices=TESTS, help="a test to build (default: test-barrier)")
    ap.add_argument("--build-root", type=Path, default=None, help="where the build directories go (_build)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = ap.parse_args(argv)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        out = build_tests(args.tree, args.flavor, args.test or ["test-barrier"], args.build_root, log=log)
    except (native.BuildError, subprocess.SubprocessError, OSError) as e:
        print(f"ggml_tests: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
