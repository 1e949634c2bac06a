"""Which ggml CPU variant this machine may load: only one whose own kernels have run here.

A ``GGML_BACKEND_DL`` build ships one ``libggml-cpu-<variant>.so`` per instruction set, and ggml's loader picks
the one whose *advertised* features score best. Machines of one kind differ: one grants AMX to every probe and
still faults in ggml's AMX kernels. So each variant is run first, in a child process, by
``numa-llama-cpu-check`` (``build/cpu_check.c``, shipped beside the libraries): every matmul path the variant can
take, with more threads than CPUs, against a float64 reference. The build does it for every variant it packages
(and compares each with ``sse42``); the patched ``llama_cpp`` does it at its first import on a machine, through
:func:`choose_cpu_variant`, and keeps the verdict in the user's cache directory, keyed by this boot
(``/proc/sys/kernel/random/boot_id``) and the library's sha256: a migrated VM or a restored snapshot is another
boot and verifies again.

``NUMA_LLAMA_CPU_VARIANT`` overrides the choice at run time: a name (``sse42``) loads that variant without
verifying it; ``-name`` (comma-separated, ``-sapphirerapids,-icelake``) excludes variants from the choice.

This module imports nothing of numa_llama's: the build (``build/compile.py``) loads it by path, before anything
is installed, and ``llama_cpp`` imports it before its library has registered a backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

CHECKER = "numa-llama-cpu-check"
ENV = "NUMA_LLAMA_CPU_VARIANT"
TOLERANCE = 5e-4  # test-backend-ops' normalized mean squared error for MUL_MAT
RUNTIME_SECONDS = 0.5  # how long the first import runs each variant it verifies (the build runs 1 s)
TIMEOUT_S = 60.0  # a check that takes longer hangs: a verdict too
CACHE_VERSION = 1

Log = Callable[[str], None]


class VariantError(ImportError):
    """No CPU variant of this build can be loaded here, or NUMA_LLAMA_CPU_VARIANT names none."""


@dataclass
class Verdict:
    variant: str
    ok: bool
    how: str  # "34 cases, 12 rounds in 1.02 s, 4 threads" or "SIGILL in tinygemm_kernel_amx<...> (case AMX-...)"
    cases: int = 0
    seconds: float = 0.0
    threads: int = 0
    signal: str | None = None
    symbol: str | None = None
    case: str | None = None


def variant_of(lib: Path) -> str:
    """``libggml-cpu-haswell.so`` -> ``haswell``."""
    m = re.fullmatch(r"libggml-cpu-(.+)\.so", lib.name)
    if not m:
        raise ValueError(f"{lib.name} is not a ggml CPU variant library (libggml-cpu-<variant>.so)")
    return m.group(1)


def variant_libraries(lib_dir: Path) -> list[Path]:
    return sorted(p for p in lib_dir.glob("libggml-cpu-*.so") if p.is_file())


def symbol_at(lib: Path, offset: int) -> str | None:
    """The function of ``lib`` that holds ``offset``, from its symbol table (static functions included)."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    proc = subprocess.run([nm, "-C", "--defined-only", lib], capture_output=True, text=True)
    best: tuple[int, str] | None = None
    for line in proc.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or parts[1] not in "tTwW" or not parts[0]:
            continue
        addr = int(parts[0], 16)
        if addr <= offset and (best is None or addr > best[0]):
            best = (addr, parts[2])
    return best[1] if best else None


def check(
    lib: Path,
    checker: Path,
    seconds: float,
    threads: int | None = None,
    out_dir: Path | None = None,
    timeout: float = TIMEOUT_S,
) -> Verdict:
    """Run ``lib``'s kernels in a child process; the verdict says how it ended."""
    name = variant_of(lib)
    cmd = [str(checker), "--seconds", str(seconds)]
    if threads:
        cmd += ["--threads", str(threads)]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd += ["--out", str(out_dir)]
    try:
        proc = subprocess.run([*cmd, str(lib)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        done = [ln.split()[1] for ln in out.splitlines() if ln.startswith("case ")]
        return Verdict(name, False, f"hung: no result after {timeout:.0f} s (last case done: {done[-1:] or 'none'})")
    except OSError as e:
        return Verdict(name, False, f"cannot run {checker}: {e}")
    lines = proc.stdout.splitlines()
    cases = sum(1 for ln in lines if ln.startswith("case "))
    if proc.returncode == 0:
        ok = [ln.split() for ln in lines if ln.startswith("ok ")]
        if ok:
            n, rounds, secs, thr = int(ok[-1][1]), int(ok[-1][2]), float(ok[-1][3]), int(ok[-1][4])
            how = f"{n} cases, {rounds} rounds in {secs:.2f} s, {thr} threads"
            return Verdict(name, True, how, cases=n, seconds=secs, threads=thr)
        return Verdict(name, False, "the check exited 0 without a result")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        fault = re.search(r"^fault (\S+) (.+)\+0x([0-9a-f]+) (\S+) case (.*)$", proc.stderr, re.M)
        symbol = case = None
        if fault:
            where, offset, dyn, case = Path(fault.group(2)), int(fault.group(3), 16), fault.group(4), fault.group(5)
            symbol = (symbol_at(where, offset) if where.is_file() else None) or (dyn if dyn != "?" else None)
            symbol = symbol or f"{where.name}+{offset:#x}"
        how = f"{sig} in {symbol or 'an unknown function'} (case {case or 'unknown'})"
        return Verdict(name, False, how, cases=cases, signal=sig, symbol=symbol, case=case)
    fail = [ln for ln in lines if ln.startswith("fail ")]
    if fail:
        parts = fail[-1].split(" ", 2)
        return Verdict(name, False, f"wrong result in case {parts[1]}: {parts[2]}", cases=cases, case=parts[1])
    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return Verdict(name, False, f"exit {proc.returncode}: {tail}", cases=cases)


def scores(libs: Iterable[Path], checker: Path) -> dict[Path, int]:
    """ggml's own score of each library for this CPU (0: it cannot run here), as ggml's loader ranks them."""
    libs = list(libs)
    proc = subprocess.run([str(checker), "--score", *map(str, libs)], capture_output=True, text=True, timeout=TIMEOUT_S)
    got = {Path(p): int(s) for s, p in re.findall(r"^score (-?\d+) (.+)$", proc.stdout, re.M)}
    if proc.returncode != 0 or set(got) != set(libs):
        raise VariantError(f"cannot score the CPU variants with {checker} (exit {proc.returncode}): {proc.stderr}")
    return got


def compare(ref_dir: Path, out_dir: Path) -> tuple[str, float] | None:
    """The worst case of ``out_dir`` against ``ref_dir`` (same case names) by NMSE; None if none is shared."""
    worst: tuple[str, float] | None = None
    for ref in sorted(ref_dir.glob("*.f32")):
        other = out_dir / ref.name
        if not other.exists():
            continue
        a, b = array("f"), array("f")
        a.frombytes(ref.read_bytes())
        b.frombytes(other.read_bytes())
        if len(a) != len(b):
            return ref.stem, float("inf")
        sig = sum(x * x for x in a)
        err = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
        e = err / sig if sig > 0 else err
        if e != e:  # NaN
            e = float("inf")
        if worst is None or e > worst[1]:
            worst = (ref.stem, e)
    return worst


# -- the verdict cache ---------------------------------------------------------------------------------------


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numa-llama" / "cpu-variants.json"


def boot_cache_path() -> Path | None:
    """Where verdicts go when the user's cache directory cannot be written (a read-only home, the multi-node
    guest): a directory of this user's own under the temporary directory, which lasts as long as a verdict
    does (this boot). None when it exists and is not this user's alone."""
    d = Path(os.environ.get("TMPDIR") or "/tmp") / f"numa-llama-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None  # someone else's, or writable by others: its verdicts could be anyone's
    return d / "cpu-variants.json"


def _load_cache(path: Path, boot: str) -> dict[str, dict]:
    """This boot's verdicts by library hash; anything unreadable, of another boot or version, is no cache."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and data.get("boot_id") == boot:
            verdicts = data.get("verdicts")
            if isinstance(verdicts, dict):
                return {k: v for k, v in verdicts.items() if isinstance(v, dict) and "ok" in v and "variant" in v}
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def _cached_verdict(entry: dict | None, name: str) -> Verdict | None:
    """A cached verdict for this library, or None when there is none or it does not read as one."""
    if entry is None or not isinstance(entry.get("ok"), bool) or entry.get("variant") != name:
        return None
    try:
        return Verdict(**{k: entry[k] for k in Verdict.__dataclass_fields__ if k in entry})
    except TypeError:
        return None


def record(verdicts: dict[str, Verdict], path: Path | None = None) -> str | None:
    """Add verdicts (by library sha256) to this boot's cache; returns why it could not, or None."""
    path = path or cache_path()
    boot = boot_id()
    cached = _load_cache(path, boot)
    cached.update({k: asdict(v) for k, v in verdicts.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".cpu-variants.") as f:
            json.dump({"version": CACHE_VERSION, "boot_id": boot, "verdicts": cached}, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        return str(e)
    return None


# -- the run-time choice -------------------------------------------------------------------------------------


def _override(names: list[str]) -> tuple[str | None, set[str]]:
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None, set()
    words = [w.strip() for w in text.split(",") if w.strip()]
    forced = [w for w in words if not w.startswith("-")]
    excluded = {w[1:] for w in words if w.startswith("-")}
    unknown = sorted((set(forced) | excluded) - set(names))
    if unknown or len(forced) > 1 or (forced and excluded):
        raise VariantError(
            f"{ENV}={text!r}: expected one variant to force (e.g. sse42) or -name,... to exclude, among this "
            f"build's {', '.join(names)}" + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return (forced[0] if forced else None), excluded


def choose_cpu_variant(lib_dir: Path, log: Log | None = None, seconds: float = RUNTIME_SECONDS) -> Path | None:
    """The CPU variant library to load from ``lib_dir``: the best by ggml's score whose kernels run here.

    None when ``lib_dir`` holds no CPU variant library (a build that links its CPU backend in). Raises
    :class:`VariantError` when no variant can be loaded, with the reason of each.
    """
    say: Log = log or (lambda msg: print(f"numa-llama: {msg}", file=sys.stderr, flush=True))
    libs = variant_libraries(lib_dir)
    if not libs:
        return None
    by_name = {variant_of(lib): lib for lib in libs}
    forced, excluded = _override(sorted(by_name))
    if forced:
        say(f"{ENV}={forced}: loading CPU variant {forced} without verifying it")
        return by_name[forced]
    checker = lib_dir / CHECKER
    if not checker.is_file():
        raise VariantError(
            f"{checker} is missing, so no CPU variant in {lib_dir} can be verified: reinstall numa-llama, or set "
            f"{ENV}=<variant> to load one unverified"
        )
    ranked = sorted(((s, lib) for lib, s in scores(libs, checker).items() if s > 0), key=lambda t: -t[0])
    path = cache_path()
    fallback = boot_cache_path()
    boot = boot_id()
    cached = _load_cache(fallback, boot) if fallback else {}
    cached.update(_load_cache(path, boot))
    skipped: list[str] = []
    cache_problem: str | None = None
    for _, lib in ranked:
        name = variant_of(lib)
        if name in excluded:
            skipped.append(f"{name} (excluded by {ENV})")
            continue
        key = sha256(lib)
        verdict = _cached_verdict(cached.get(key), name)
        if verdict is None:
            t0 = time.monotonic()
            verdict = check(lib, checker, seconds)
            if verdict.ok:
                say(f"CPU variant {name} verified on this machine in {time.monotonic() - t0:.1f} s ({verdict.how})")
            problem = record({key: verdict}, path)
            if problem and fallback is not None and record({key: verdict}, fallback) is None:
                if cache_problem is None:
                    say(f"cannot keep CPU-variant verdicts in {path} ({problem}): keeping them in {fallback}")
                cache_problem = problem
            elif problem and cache_problem is None:
                cache_problem = problem
                say(f"cannot keep CPU-variant verdicts in {path} ({problem}): verifying again in every process")
        if verdict.ok:
            if skipped:
                say(f"loading CPU variant {name}; not loading {'; '.join(skipped)}")
            return lib
        skipped.append(f"{name}: {verdict.how}")
        say(f"CPU variant {name} fails its own kernels on this machine, so it is not loaded: {verdict.how}")
    raise VariantError(
        f"no CPU variant in {lib_dir} runs its kernels correctly on this machine"
        + (f": {'; '.join(skipped)}" if skipped else " (ggml scores none of them above 0 for this CPU)")
    )
