"""Build ``llama-bench`` from the patched tree and from the stock tree, alike.

The two builds differ in one thing only: the patched one is the series'
tree (``vendor/llama.cpp``) configured with ``GGML_CPU_NUMA=ON``; the stock one
is the same pinned commit with no patch (a git worktree of the ``upstream``
commit that ``build/sync.py`` keeps in ``vendor/llama.cpp``), configured with
the same arguments but without ``GGML_CPU_NUMA``. Both are static, one CPU
variant (the best one that *executes* here, probed like the shipped build),
``GGML_NATIVE=OFF``: a ``-march=native`` build dies in its AMX kernels on
machines that advertise AMX and fault on it.

Usage: ``python build/bench_build.py [--which patched|patched-off|stock|both] [--variant NAME]``; prints
``<which> <path of llama-bench>`` per build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import compile as native  # noqa: E402

PATCHED_TREE = ROOT / "vendor" / "llama.cpp"
BASE_REF = "upstream"  # the branch sync.py keeps at the pinned, unmodified tree


def worktree_at(tree: Path, commit: str, log=print) -> Path:
    """A detached git worktree of ``vendor/llama.cpp`` at ``tree``, checked out at ``commit`` with no local changes.

    Made once; later calls move it (``checkout -f``), so one build directory serves every commit it is moved to."""
    if not (tree / ".git").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(PATCHED_TREE), "worktree", "prune"], check=True)
        native._stream(["git", "-C", str(PATCHED_TREE), "worktree", "add", "--detach", "-f", str(tree), commit], log)
    subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", "-f", commit], check=True)
    return tree


def stock_tree(build_root: Path, log=print) -> Path:
    """A worktree of the pinned commit, unpatched."""
    base = subprocess.run(["git", "-C", str(PATCHED_TREE), "rev-parse", BASE_REF], capture_output=True, text=True)
    if base.returncode != 0:
        raise native.BuildError(f"{PATCHED_TREE} has no {BASE_REF!r} branch: run python build/sync.py apply")
    return worktree_at(build_root / "stock" / "llama.cpp", base.stdout.strip(), log)


def pick_variant(tree: Path, name: str | None = None, log=print) -> native.Variant:
    """The named ggml CPU variant (probed: it must execute here), or the best one that does."""
    variants = native.x86_variants(tree)
    chosen = native.choose_variants(variants, [name] if name else None, log=log)
    return next(v for v in variants if v.name == chosen[0])


def bench_args(variant: native.Variant, numa: bool) -> list[str]:
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_BACKEND_DL=OFF",
        "-DGGML_CCACHE=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_CURL=OFF",
        *native.variant_args(variant),
        *(["-DGGML_CPU_NUMA=ON"] if numa else []),
    ]


def build_bench(which: str, build_root: Path | None = None, log=print, variant: str | None = None) -> Path:
    """Build (or bring up to date) ``llama-bench`` for ``which`` in {patched, patched-off, stock}; return its path.

    ``patched-off`` is the series' tree with ``GGML_CPU_NUMA`` left off: the build that must stay the stock one.

    ``variant`` names a ggml CPU variant (``haswell`` for valgrind, which has no AVX-512); default: the best."""
    if which not in ("patched", "patched-off", "stock"):
        raise native.BuildError(f"unknown build {which!r}: patched, patched-off or stock")
    build_root = build_root or ROOT / "_build"
    tree = stock_tree(build_root, log) if which == "stock" else PATCHED_TREE
    if not (tree / "CMakeLists.txt").exists():
        raise native.BuildError(f"{tree} is not a llama.cpp tree: run python build/sync.py apply")
    chosen = pick_variant(tree, variant, log)
    build_dir = build_root / (f"bench-{which}" + (f"-{variant}" if variant else ""))
    native._configure(tree, build_dir, bench_args(chosen, numa=which == "patched"), log)
    jobs = int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", 0)) or os.cpu_count() or 1
    native._stream(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama-bench"], log)
    exe = build_dir / "bin" / "llama-bench"
    if not exe.exists():
        raise native.BuildError(f"built llama-bench but found no {exe}")
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--which", choices=["patched", "patched-off", "stock", "both"], default="both")
    ap.add_argument("--build-root", type=Path, default=None, help="where the build directories go (_build)")
    ap.add_argument("--variant", default=None, help="a ggml CPU variant (e.g. haswell); default: the best that runs")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = ap.parse_args(argv)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        for which in ["patched", "stock"] if args.which == "both" else [args.which]:
            print(which, build_bench(which, args.build_root, log=log, variant=args.variant), flush=True)
    except (native.BuildError, subprocess.SubprocessError, OSError) as e:
        print(f"bench_build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
