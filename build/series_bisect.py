"""Build and test every prefix of the llama.cpp series on its own (bisectability).

For k = 1..N, one git worktree (``_build/bisect/llama.cpp``) is moved to the
commit of patch k in ``vendor/llama.cpp`` (as ``build/sync.py apply`` made it),
ggml and llama.cpp's ggml-level tests are built there with
``build/ggml_tests.py`` (AVX2 flavour: the repack, tiled and llamafile kernels
are compiled in), and the tests that exist at that commit run on this host:

- ``test-barrier 2 2``;
- ``test-cpu-numa 2`` where the commit has it;
- ``test-backend-ops -b CPU --numa migrate`` on the matmul cases of a few types.

One worktree and one build directory serve every prefix, so ccache and ninja
rebuild only what each patch changed. Usage:
``python build/series_bisect.py [--from K] [--to K] [-v]``; exit status 1 names the
first prefix that fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_build  # noqa: E402
import compile as native  # noqa: E402
import ggml_tests  # noqa: E402

VENDOR = bench_build.PATCHED_TREE
BASE_REF = bench_build.BASE_REF
FLAVOR = "guest-avx2"
BACKEND_OPS = [
    "-b",
    "CPU",
    "--numa",
    "migrate",
    "-t",
    "2",
    "-o",
    "MUL_MAT,MUL_MAT_ID",
    "-p",
    r"^type_a=(f16|q4_0|q8_0|q4_K|q6_K),type_b=f32,(m=16,n=(1|9),k=256,bs=\[1,1\],nr=\[1,1\]|"
    r"n_mats=4,n_used=2,b=0,m=512,n=(1|32),k=256)",
]


@dataclass
class Step:
    k: int
    commit: str
    subject: str
    ok: bool = False
    seconds: float = 0.0
    detail: str = ""


def series_commits() -> list[tuple[str, str]]:
    out = subprocess.run(
        ["git", "-C", str(VENDOR), "log", "--reverse", "--format=%H %s", f"{BASE_REF}..HEAD"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise native.BuildError(f"{VENDOR}: {out.stderr.strip()} (run python build/sync.py apply)")
    return [tuple(line.split(" ", 1)) for line in out.stdout.splitlines()]  # type: ignore[misc]


def run_test(cmd: list[str], what: str, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise native.BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout + proc.stderr


def check_prefix(step: Step, build_root: Path, log) -> None:
    tree = bench_build.worktree_at(build_root / "bisect" / "llama.cpp", step.commit, log)
    tests = [t for t in ggml_tests.TESTS if (tree / "tests" / f"{t}.cpp").exists()]
    bins = ggml_tests.build_tests(tree, FLAVOR, tests, build_root=build_root / "bisect", log=log)
    done = []
    run_test([str(bins / "test-barrier"), "2", "2"], "test-barrier")
    done.append("test-barrier")
    if "test-cpu-numa" in tests:
        run_test([str(bins / "test-cpu-numa"), "2"], "test-cpu-numa")
        done.append("test-cpu-numa")
    out = run_test([str(bins / "test-backend-ops"), *BACKEND_OPS], "test-backend-ops --numa migrate")
    if " tests passed" not in out or "FAIL" in out:
        raise native.BuildError("test-backend-ops printed no passing summary:\n" + out[-1500:])
    done.append("test-backend-ops")
    step.detail = ", ".join(done)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="first", type=int, default=1, help="first prefix (1-based)")
    ap.add_argument("--to", dest="last", type=int, default=0, help="last prefix (default: all)")
    ap.add_argument("--build-root", type=Path, default=ROOT / "_build")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream the builds")
    args = ap.parse_args(argv)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else (lambda line: None)
    try:
        commits = series_commits()
    except native.BuildError as e:
        print(f"bisect: {e}", file=sys.stderr)
        return 2
    last = args.last or len(commits)
    steps = [Step(k, c, s) for k, (c, s) in enumerate(commits, 1) if args.first <= k <= last]
    os.environ.setdefault("CCACHE_NOHASHDIR", "1")
    for step in steps:
        t0 = time.monotonic()
        print(f"[{step.k}/{len(commits)}] {step.commit[:10]} {step.subject}", flush=True)
        try:
            check_prefix(step, args.build_root, log)
            step.ok = True
        except (native.BuildError, subprocess.SubprocessError, OSError) as e:
            step.detail = str(e)
        step.seconds = time.monotonic() - t0
        print(f"    {'ok  ' if step.ok else 'FAIL'} {step.seconds:5.0f} s  {step.detail}", flush=True)
        if not step.ok:
            print(f"bisect: the series first fails at patch {step.k}: {step.subject}", file=sys.stderr)
            return 1
    print(f"bisect: {len(steps)} prefix(es) build and pass on their own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
