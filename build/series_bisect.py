"""Build and test every prefix of the llama.cpp series on its own (bisectability).

For k = 1..N, one git worktree (``_build/bisect/llama.cpp``) is moved to the
commit of patch k in ``vendor/llama.cpp`` (as ``build/sync.py apply`` made it),
ggml and llama.cpp's ggml-level tests are built there with
``build/ggml_tests.py`` (AVX2 flavour: the repack, tiled and llamafile kernels
are compiled in), and the tests that exist at that commit run on this host:

- ``test-barrier 2 2``;
- ``test-cpu-numa 2`` where the commit has it;
- ``test-backend-ops -b CPU --numa migrate`` on the matmul cases of a few types;
- and, built again with ``GGML_CPU_NUMA=OFF``: ``test-barrier``, the same
  ``test-backend-ops`` (the strategy then warns and runs stock), and
  ``ggml_barrier`` and the chunk counter compiled to exactly the instructions
  of the first prefix's OFF build (whose ``ggml-cpu.c`` is upstream's).

Where a prefix has the virtual topology (``GGML_CPU_NUMA_VIRTUAL``),
``test-cpu-numa`` runs again over 3 virtual nodes, so that its node-local paths
run on this one-node host too.

One worktree and one build directory serve every prefix, so ccache and ninja
rebuild only what each patch changed.

A green run of the whole series writes a record to the user's cache directory,
keyed by everything the run checks: the patches and their series file, this
script and the build scripts it uses, and the compiler's version. The next run
with the same key says so and skips (the tests are in the patches, so a changed
test changes the key); ``--force`` runs anyway. Usage:
``python build/series_bisect.py [--from K] [--to K] [--force] [-v]``; exit status 1
names the first prefix that fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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


VIRTUAL_NODES = "3"  # test-cpu-numa over 3 virtual nodes, 4 threads: an uneven layout (2, 1, 1)
KEYED = [HERE / "series_bisect.py", HERE / "ggml_tests.py", HERE / "compile.py", HERE / "bench_build.py"]


def record_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "numa-llama" / "bisect-green.json"


def record_key() -> str:
    """What a green run vouches for: the series (tests included), the scripts that build and run it, the compiler."""
    h = hashlib.sha256()
    patches = ROOT / "patches" / "llama.cpp"
    for f in [patches / "series", *sorted(patches.glob("*.patch")), *KEYED]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for cc in (os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")):
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True)
            h.update(out.stdout.encode() if out.returncode == 0 else f"{cc} failed".encode())
        except OSError:
            h.update(f"no {cc}".encode())
    return h.hexdigest()


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
        if "GGML_CPU_NUMA_VIRTUAL" in (tree / "ggml" / "src" / "ggml-cpu" / "numa.cpp").read_text():
            out = run_test(
                ["env", f"GGML_CPU_NUMA_VIRTUAL={VIRTUAL_NODES}", str(bins / "test-cpu-numa"), "4"],
                f"test-cpu-numa under GGML_CPU_NUMA_VIRTUAL={VIRTUAL_NODES}",
            )
            if "virtual nodes (GGML_CPU_NUMA_VIRTUAL)" not in out:
                raise native.BuildError("test-cpu-numa did not run over virtual nodes:\n" + out[-1500:])
            done.append(f"test-cpu-numa on {VIRTUAL_NODES} virtual nodes")
            local = re.search(r"(\d+) product\(s\) computed node by node", out)
            if local:  # from the patch that computes products node by node
                done.append(f"{local.group(1)} products computed node by node")
    # --numa and -t come with the patch that adds the strategy: before it, the same cases without them
    backend_ops = BACKEND_OPS
    if '"--numa"' not in (tree / "tests" / "test-backend-ops.cpp").read_text():
        backend_ops = [BACKEND_OPS[0], BACKEND_OPS[1], *BACKEND_OPS[6:]]
    out = run_test([str(bins / "test-backend-ops"), *backend_ops], "test-backend-ops --numa migrate")
    if " tests passed" not in out or "FAIL" in out:
        raise native.BuildError("test-backend-ops printed no passing summary:\n" + out[-1500:])
    done.append("test-backend-ops")

    # the same prefix with GGML_CPU_NUMA=OFF: it builds, passes, and its ggml_barrier and chunk counter compile to
    # exactly the stock instructions (those of the first prefix's OFF build, whose ggml-cpu.c is upstream's)
    off_tests = [t for t in tests if t != "test-cpu-numa"]
    off = ggml_tests.build_tests(tree, FLAVOR_OFF, off_tests, build_root=build_root / "bisect", log=log)
    run_test([str(off / "test-barrier"), "2", "2"], "test-barrier (GGML_CPU_NUMA=OFF)")
    out = run_test([str(off / "test-backend-ops"), *backend_ops], "test-backend-ops --numa migrate (GGML_CPU_NUMA=OFF)")
    if " tests passed" not in out or "FAIL" in out:
        raise native.BuildError("test-backend-ops (GGML_CPU_NUMA=OFF) printed no passing summary:\n" + out[-1500:])
    code = stock_functions(off.parent)
    reference = build_root / "bisect" / "stock-functions.txt"
    if step.k == 1:
        reference.write_text(code)
    elif not reference.exists():
        raise native.BuildError(f"{reference} is missing: run the bisect from prefix 1")
    elif code != reference.read_text():
        raise native.BuildError(f"with GGML_CPU_NUMA=OFF, {', '.join(STOCK_FUNCTIONS)} differ from the stock code")
    done.append("OFF: builds, test-barrier, test-backend-ops, stock barrier and chunk code")
    step.detail = ", ".join(done)


FLAVOR_OFF = "guest-avx2-off"
STOCK_FUNCTIONS = ["ggml_barrier", "ggml_threadpool_chunk_set", "ggml_threadpool_chunk_add"]


def stock_functions(build_dir: Path) -> str:
    """The instructions of STOCK_FUNCTIONS in the OFF build's ggml-cpu.c object, without addresses."""
    obj = next(build_dir.glob("**/ggml-cpu.dir/**/ggml-cpu.c.o"), None)
    if obj is None:
        raise native.BuildError(f"no ggml-cpu.c.o under {build_dir}")
    out = []
    for fn in STOCK_FUNCTIONS:
        proc = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", "--no-addresses", f"--disassemble={fn}", str(obj)],
            capture_output=True,
            text=True,
        )
        body = [line.split("#")[0].strip() for line in proc.stdout.splitlines() if line.startswith(("\t", " "))]
        if proc.returncode != 0 or not body:
            raise native.BuildError(f"objdump found no {fn} in {obj}: {proc.stderr.strip()[:300]}")
        # jump targets are offsets in the section: keep the mnemonics and operands that do not name addresses
        out += [f"{fn}:"] + [re.sub(r"\b[0-9a-f]+ <[^>]*>", "<target>", line) for line in body]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="first", type=int, default=1, help="first prefix (1-based)")
    ap.add_argument("--to", dest="last", type=int, default=0, help="last prefix (default: all)")
    ap.add_argument("--build-root", type=Path, default=ROOT / "_build")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream the builds")
    ap.add_argument("--force", action="store_true", help="run even where a green run of the same key is on record")
    args = ap.parse_args(argv)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else (lambda line: None)
    try:
        commits = series_commits()
    except native.BuildError as e:
        print(f"bisect: {e}", file=sys.stderr)
        return 2
    last = args.last or len(commits)
    whole = args.first == 1 and last == len(commits)
    key = record_key()
    record = record_path()
    if whole and not args.force and record.exists():
        try:
            seen = json.loads(record.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen.get("key") == key:
            print(
                f"bisect: skipped: nothing it checks has changed since the green run of {seen.get('when')} "
                f"on this machine ({seen.get('prefixes')} prefixes, key {key[:16]}, {record}); --force runs it"
            )
            return 0
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
    if whole:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(
                json.dumps({"key": key, "prefixes": len(steps), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n"
            )
        except OSError as e:
            print(f"bisect: the green run could not be recorded ({e}): the next run checks everything again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
