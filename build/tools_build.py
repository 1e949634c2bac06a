"""Build llama.cpp's own programs from the patched tree: ``llama-server``, ``llama-cli`` and ``llama-bench``.

One build directory (``_build/tools``), the series' tree (``vendor/llama.cpp``) with ``GGML_CPU_NUMA=ON`` and
``GGML_RPC=ON`` (``llama-server --rpc``), static,
one CPU variant (the best that executes here, probed as for the wheel; ``GGML_NATIVE=OFF``), as
``build/bench_build.py`` builds llama-bench. Nothing is downloaded at build time: llama-server's web UI would
come prebuilt from a Hugging Face bucket, so ``LLAMA_USE_PREBUILT_UI`` and ``LLAMA_BUILD_UI`` (npm) are off and the
server is built without an embedded UI (its API is whole). ``LLAMA_OPENSSL`` is off too: the tools serve and read
local files; they fetch nothing.

Usage: ``python build/tools_build.py [--build-root DIR] [--variant NAME] [-q]``; prints ``<name> <path>`` per
program.
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

import bench_build  # noqa: E402
import compile as native  # noqa: E402

PROGRAMS = ("llama-server", "llama-cli", "llama-bench")


def tools_args(variant: native.Variant) -> list[str]:
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_BACKEND_DL=OFF",
        "-DGGML_CCACHE=ON",
        "-DGGML_CPU_NUMA=ON",
        "-DGGML_RPC=ON",  # llama-server --rpc HOST:PORT,... (ggml-rpc's client)
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # the prebuilt web UI is a download from a hub: never at build time
        "-DLLAMA_BUILD_UI=OFF",  # and building it needs npm and the npm registry
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_CURL=OFF",
        *native.variant_args(variant),
    ]


def build_tools(build_root: Path | None = None, log=print, variant: str | None = None) -> dict[str, Path]:
    """Build (or bring up to date) the programs; return their paths by name."""
    tree = bench_build.PATCHED_TREE
    if not (tree / "CMakeLists.txt").exists():
        raise native.BuildError(f"{tree} is not a llama.cpp tree: run python build/sync.py apply")
    chosen = bench_build.pick_variant(tree, variant, log)
    build_dir = (build_root or ROOT / "_build") / ("tools" + (f"-{variant}" if variant else ""))
    native._configure(tree, build_dir, tools_args(chosen), log)
    jobs = int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", 0)) or os.cpu_count() or 1
    native._stream(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *PROGRAMS], log)
    out = {name: build_dir / "bin" / name for name in PROGRAMS}
    missing = [str(p) for p in out.values() if not p.exists()]
    if missing:
        raise native.BuildError(f"built the tools but found no {', '.join(missing)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-root", type=Path, default=None, help="where the build directory goes (_build)")
    ap.add_argument("--variant", default=None, help="a ggml CPU variant (e.g. haswell); default: the best that runs")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = ap.parse_args(argv)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        for name, path in build_tools(args.build_root, log=log, variant=args.variant).items():
            print(name, path, flush=True)
    except (native.BuildError, subprocess.SubprocessError, OSError) as e:
        print(f"tools_build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
