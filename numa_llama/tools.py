"""``numa-llama tools``: llama.cpp's own llama-server, llama-cli and llama-bench, built from the patched tree.

``build/tools_build.py`` (in the source checkout) builds them once with ``GGML_CPU_NUMA=ON`` and without
anything downloaded; this copies them next to the ``numa-llama`` command (the venv's ``bin``) as
``numa-llama-server``, ``numa-llama-cli`` and ``numa-llama-bench``. The prefix keeps them from shadowing a stock
llama.cpp's ``llama-server`` on PATH, and says which build a process is. Each takes ``--numa migrate``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

INSTALLED = {"llama-server": "numa-llama-server", "llama-cli": "numa-llama-cli", "llama-bench": "numa-llama-bench"}


class ToolsError(RuntimeError):
    """The tools could not be built or installed; one line."""


def build(checkout: Path, variant: str | None, log: Any) -> dict[str, Path]:
    from numa_llama import bench  # noqa: PLC0415

    cmd = [sys.executable, str(checkout / "build" / "tools_build.py")] + (["--variant", variant] if variant else [])
    out = bench.run_build_script(cmd, "llama.cpp's tools", log)
    return {name: Path(path) for name, path in (line.split(maxsplit=1) for line in out.splitlines() if line.strip())}


def install(built: dict[str, Path], bin_dir: Path) -> dict[str, Path]:
    """Copy each program to ``bin_dir`` under its numa-llama name (atomically: a running one keeps its file)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, dest_name in INSTALLED.items():
        if name not in built:
            raise ToolsError(f"the build gave no {name}")
        dest = bin_dir / dest_name
        tmp = bin_dir / f".{dest_name}.tmp"
        shutil.copy2(built[name], tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        out[dest_name] = dest
    return out


def run(args: argparse.Namespace) -> int:
    from numa_llama import bench  # noqa: PLC0415

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        checkout = bench.source_checkout()
    except bench.BenchError as e:
        print(f"numa-llama: tools: {e}", file=sys.stderr)
        return 2
    bin_dir = Path(args.bin_dir) if args.bin_dir else Path(sysconfig.get_path("scripts"))
    try:
        installed = install(build(checkout, args.variant, log), bin_dir)
    except (ToolsError, bench.BenchError, OSError) as e:
        print(f"numa-llama: tools: {e}", file=sys.stderr)
        return 1
    for name, path in installed.items():
        print(f"{name} {path}")
    return 0


def add_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tools",
        help="build llama.cpp's llama-server, llama-cli and llama-bench from the patched tree and install them",
        description="Build llama.cpp's llama-server, llama-cli and llama-bench from the patched tree "
        "(GGML_CPU_NUMA=ON, no web UI download) and install them as numa-llama-server, numa-llama-cli and "
        "numa-llama-bench. Needs the numa-llama source checkout (run from it, or set NUMA_LLAMA_SOURCE).",
    )
    t.add_argument("--bin-dir", default=None, help="where to install them (default: this Python's scripts directory)")
    t.add_argument("--variant", default=None, help="a ggml CPU variant (default: the best that runs here)")
    t.add_argument("-q", "--quiet", action="store_true", help="print only the installed paths")
