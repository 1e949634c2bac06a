"""Stock against patched ``llama-bench``, interleaved, with per-pair ratios.

Every *round* runs each configuration once (one ``llama-bench`` process: its
own warm-up, then ``-r`` measured repetitions per test) in a rotating order, so a slow
minute on a noisy machine slows every configuration of that round alike. A
configuration's figure is the median over rounds; a ratio is the median over
rounds of the ratio *within* the round (patched ÷ stock), which is what a noisy
machine still gives reliably.

``llama-bench`` binaries come from ``build/bench_build.py`` of a source
checkout: the patched tree, and the stock tree at the same pinned commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


class BenchError(RuntimeError):
    """A llama-bench binary is missing or a run failed; the message says which and why."""


@dataclass(frozen=True)
class Config:
    """One column of the comparison: a binary and its ``--numa`` strategy (None: not passed)."""

    label: str
    exe: Path
    numa: str | None = None
    prefix: tuple[str, ...] = ()  # a command to run it under (numactl -m 0 -N 0 for the one-node baseline)
    threads: int | None = None  # its own thread count (the one-node baseline: that node's CPUs)

    def argv(self, model: Path, threads: int, pp: int, tg: int, reps: int = 1) -> list[str]:
        args = [
            *self.prefix,
            str(self.exe),
            "-m",
            str(model),
            "-t",
            str(self.threads or threads),
            "-p",
            str(pp),
            "-n",
            str(tg),
            "-r",
            str(reps),
            "-o",
            "json",
        ]
        if self.numa is not None:
            args += ["--numa", self.numa]
        return args


def one_node_baseline(exe: Path, node: int, cpus: int) -> Config:
    """PR #14232's recipe: the same binary confined to one node, memory and CPUs (``numactl -m N -N N``)."""
    return Config(
        f"one-node (numactl -m {node} -N {node}, {cpus} threads)",
        exe,
        None,
        ("numactl", "-m", str(node), "-N", str(node)),
        cpus,
    )


def sweep_counts(per_node_cpus: Sequence[int]) -> list[int]:
    """Thread counts to sweep: the same number on every node with CPUs, 1, 2, 4, ... up to the smallest node's
    CPUs, then every CPU (the distributed-llama notes found fewer threads than CPUs often faster)."""
    nodes = [c for c in per_node_cpus if c > 0]
    if not nodes:
        raise BenchError("no node has a usable CPU")
    counts = []
    k = 1
    while k <= min(nodes):
        counts.append(k * len(nodes))
        k *= 2
    counts.append(sum(nodes))
    return sorted(set(counts))


@dataclass
class Result:
    """Tokens/s of every configuration and test, every round; medians; ratios to the baseline."""

    model: str
    threads: int
    rounds: int
    baseline: str
    tests: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> test -> t/s per round
    info: dict[str, dict[str, object]] = field(default_factory=dict)  # label -> llama-bench's model and build fields

    def median(self, label: str, test: str) -> float:
        return statistics.median(self.samples[label][test])

    def ratios(self, label: str, test: str) -> list[float]:
        return [a / b for a, b in zip(self.samples[label][test], self.samples[self.baseline][test], strict=True)]

    def ratio(self, label: str, test: str) -> float:
        """Median over rounds of the within-round ratio label ÷ baseline."""
        return statistics.median(self.ratios(label, test))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["median_tokens_per_s"] = {lab: {t: self.median(lab, t) for t in self.tests} for lab in self.samples}
        d["ratio_to_baseline"] = {
            lab: {t: self.ratio(lab, t) for t in self.tests} for lab in self.samples if lab != self.baseline
        }
        return d

    def markdown(self) -> str:
        """llama-bench's own table (``model | size | params | backend | threads | test | t/s``), one row per
        configuration and test, t/s as mean ± sd of the rounds; then compare-llama-bench.py's form for each
        configuration against the baseline (its speedup: the median of the within-round ratios)."""
        head = "| model | size | params | backend | threads | build | test | t/s |"
        rows = [head, "| --- | ---: | ---: | --- | ---: | --- | --- | ---: |"]
        for lab in self.samples:
            info = self.info.get(lab, {})
            for t in self.tests:
                xs = self.samples[lab][t]
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                rows.append(
                    f"| {info.get('model_type', Path(self.model).name)} | {_mib(info.get('model_size'))} "
                    f"| {_params(info.get('model_n_params'))} | {info.get('backends', '?')} "
                    f"| {info.get('n_threads', self.threads)} | {lab} | {t} | {statistics.mean(xs):.2f} ± {sd:.2f} |"
                )
        for lab in self.samples:
            if lab == self.baseline:
                continue
            rows += ["", f"| test | t/s {self.baseline} | t/s {lab} | speedup |", "| --- | ---: | ---: | ---: |"]
            for t in self.tests:
                base, got = self.median(self.baseline, t), self.median(lab, t)
                rows.append(f"| {t} | {base:.2f} | {got:.2f} | {self.ratio(lab, t):.3f} |")
        return "\n".join(rows)


def _mib(n: object) -> str:
    return f"{int(n) / 1024 / 1024:.2f} MiB" if isinstance(n, int | float) else "?"


def _params(n: object) -> str:
    if not isinstance(n, int | float):
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def test_name(record: dict) -> str:
    """llama-bench's own names: pp512, tg128 (pp512+tg128 is not asked for here)."""
    n_prompt, n_gen = int(record["n_prompt"]), int(record["n_gen"])
    if n_prompt and n_gen:
        return f"pp{n_prompt}+tg{n_gen}"
    return f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"


INFO_FIELDS = ("model_type", "model_size", "model_n_params", "backends", "n_threads", "build_commit", "cpu_info")


def run_records(cfg: Config, model: Path, threads: int, pp: int, tg: int, reps: int = 1) -> dict[str, dict]:
    """One llama-bench process: test name -> its JSON record (avg_ts, stddev_ts, model_type, model_size, ...)."""
    cmd = cfg.argv(model, threads, pp, tg, reps)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise BenchError(f"{cfg.label}: {shlex.join(cmd)} exited {proc.returncode}:\n{tail}")
    try:
        records = json.loads(proc.stdout)
    except ValueError as e:
        raise BenchError(f"{cfg.label}: llama-bench printed no JSON ({e}): {proc.stdout[:300]!r}") from None
    return {test_name(r): r for r in records}


def compare(
    configs: Sequence[Config],
    model: Path,
    threads: int,
    rounds: int = 5,
    pp: int = 512,
    tg: int = 128,
    reps: int = 1,
    progress: Callable[[str], None] | None = None,
    prepare: Callable[[Config], None] | None = None,
) -> Result:
    """Run every configuration ``rounds`` times, interleaved (A B C, B C A, C A B, ...); ``prepare`` runs before
    each run (the page cache a scenario wants)."""
    if not configs:
        raise BenchError("nothing to compare")
    for cfg in configs:
        if not (cfg.exe.is_file() and os.access(cfg.exe, os.X_OK)):
            raise BenchError(f"{cfg.label}: no llama-bench at {cfg.exe} (python build/bench_build.py builds it)")
    if not model.is_file():
        raise BenchError(f"model file not found: {model}")
    tests = [t for t in (f"pp{pp}" if pp else "", f"tg{tg}" if tg else "") if t]
    res = Result(
        str(model), threads, rounds, configs[0].label, tests, {c.label: {t: [] for t in tests} for c in configs}
    )
    for r in range(rounds):
        order = [configs[(r + k) % len(configs)] for k in range(len(configs))]
        for k, cfg in enumerate(order):
            if progress:
                progress(f"round {r + 1}/{rounds}, {k + 1}/{len(order)}: {cfg.label}")
            if prepare:
                prepare(cfg)
            got = run_records(cfg, model, threads, pp, tg, reps)
            missing = [t for t in tests if t not in got]
            if missing:
                raise BenchError(f"{cfg.label}: llama-bench reported {sorted(got)}, not {missing}")
            for t in tests:
                res.samples[cfg.label][t].append(float(got[t]["avg_ts"]))
            first = got[tests[0]]
            res.info.setdefault(cfg.label, {k: first[k] for k in INFO_FIELDS if k in first})
    return res


def source_checkout(start: Path | None = None) -> Path:
    """The numa-llama checkout that holds ``build/bench_build.py`` (cwd, or NUMA_LLAMA_SOURCE)."""
    env = os.environ.get("NUMA_LLAMA_SOURCE")
    here = (start or Path.cwd()).resolve()
    candidates = [Path(env)] if env else [here, *here.parents]
    for c in candidates:
        if (c / "build" / "bench_build.py").is_file():
            return c
    raise BenchError(
        "building llama-bench needs the numa-llama source checkout: run from it, or set NUMA_LLAMA_SOURCE to it"
    )


def run_build_script(cmd: list[str], what: str, log: Callable[[str], None] | None = None) -> str:
    """Run one of the checkout's build scripts, its progress (stderr) to ``log``; return what it printed on stdout.
    A failure raises BenchError with ``what`` and the script's last 20 lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    tail: list[str] = []
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-20:]
        if log:
            log(line.rstrip())
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise BenchError(f"building {what} failed:\n" + "\n".join(tail))
    return out


def build(which: str, checkout: Path, log: Callable[[str], None] | None = None, variant: str | None = None) -> Path:
    """Build (or reuse) llama-bench of ``which`` (patched|patched-off|stock) with the checkout's build script."""
    cmd = [sys.executable, str(checkout / "build" / "bench_build.py"), "--which", which]
    cmd += ["--variant", variant] if variant else []
    return Path(run_build_script(cmd, f"the {which} llama-bench", log).split()[-1])


def instructions(cfg: Config, model: Path, n_gen: int) -> int:
    """Instructions callgrind counts for one llama-bench process generating ``n_gen`` tokens (1 thread)."""
    if shutil.which("valgrind") is None:
        raise BenchError("--callgrind needs valgrind (apt-get install valgrind)")
    # the prefix (env VAR=..., numactl ...) runs valgrind: under valgrind it would be what is counted, since
    # valgrind does not follow the exec into llama-bench
    bare = dataclasses.replace(cfg, prefix=())
    cmd = [
        *cfg.prefix,
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        *bare.argv(model, 1, 0, n_gen, 1),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or m is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise BenchError(f"{cfg.label}: callgrind of {shlex.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return int(m.group(1))


def instructions_per_token(cfg: Config, model: Path, n_gen: int = 8) -> float:
    """Decode instructions per token: the difference of a 2n-token and an n-token run, so that model load,
    warm-up and exit cancel out (every one of them runs the same code for both lengths)."""
    return (instructions(cfg, model, 2 * n_gen) - instructions(cfg, model, n_gen)) / n_gen
