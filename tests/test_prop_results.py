"""Unchanged results: placement moves pages, never values. Runs on the host (``tox -e numa`` no longer runs it in
the guests: there test-cpu-numa compares placed weights' products with the stock split, byte for byte).

Over the strategies, thread counts, mmap on and off, batch sizes and
stretches of prose, the logits of the real model are bitwise those of numa
off at the same thread count and batch size (a batch size can change which
kernel runs, so each is compared with its own). One process per strategy
holds the model (``logits_worker.py``); numa off with mmap is the reference.

On a one-node host every strategy runs the same code as off, so a comparison
there could not fail for a NUMA reason. There the strategy drawn is migrate
over 2, 3 or 4 virtual nodes (``GGML_CPU_NUMA_VIRTUAL``): the node-local
paths run, and the worker's report of the virtual node count and the layout
proves they did. On a host with several nodes the stock strategies are drawn
too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import numa_nodes
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.model

WORKER = Path(__file__).with_name("logits_worker.py")
NODES = numa_nodes()
MAX_THREADS = min(16, 4 * NODES) if NODES >= 2 else 8  # up to 4 per node; at most 8 on a 2-core host


class Worker:
    def __init__(self, model: Path, numa: str, mmap: bool, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(model), numa, "1" if mmap else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=WORKER.parent,
            env={**os.environ, **(env or {})},
        )
        hello = self._read()
        self.tokens, self.load_s = hello["tokens"], hello["load_s"]

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"logits worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, threads: int, batch: int, start: int, n: int) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"threads": threads, "batch": batch, "start": start, "n": n}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        assert "error" not in out, out
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def workers(model_path: Path):
    pool: dict[tuple[str, bool], Worker] = {}

    def get(numa: str, mmap: bool) -> Worker:
        """numa: "off", a strategy, or "virtual-N" (migrate over N virtual nodes)."""
        if (numa, mmap) not in pool:
            if numa.startswith("virtual-"):
                env = {"GGML_CPU_NUMA_VIRTUAL": numa.split("-")[1]}
                pool[(numa, mmap)] = Worker(model_path, "migrate", mmap, env=env)
            else:
                pool[(numa, mmap)] = Worker(model_path, numa, mmap)
        return pool[(numa, mmap)]

    yield get
    for w in pool.values():
        w.close()


# each strategy is a process that holds the model: a tenth of the profile's examples
EXAMPLES = max(8, settings().max_examples // 10)
VIRTUAL = ["virtual-2", "virtual-3", "virtual-4"]
STRATEGIES = ["migrate", "distribute", "isolate", "numactl"] + VIRTUAL if NODES >= 2 else VIRTUAL
MAX_TOKENS = 40
PPL_TOKENS = 32


@settings(max_examples=EXAMPLES)
@given(
    numa=st.sampled_from(STRATEGIES),
    threads=st.integers(1, MAX_THREADS),
    mmap=st.booleans(),
    batch=st.sampled_from([1, 5, 16, 64]),
    start=st.integers(0, 400),
    n=st.integers(4, MAX_TOKENS),
)
@example(numa=STRATEGIES[0], threads=2, mmap=True, batch=64, start=0, n=16)
@example(numa=STRATEGIES[-1], threads=MAX_THREADS, mmap=False, batch=5, start=100, n=16)
def test_logits_are_bitwise_those_of_numa_off(
    workers, numa: str, threads: int, mmap: bool, batch: int, start: int, n: int
) -> None:
    """Why it must hold: the series changes where rows live and which thread multiplies them, never the sums
    a row's dot product adds up, so any logit that moves is a bug (a row computed twice, or from the wrong
    page)."""
    worker = workers(numa, mmap)
    got = worker.ask(threads, batch, start, n)
    want = workers("off", True).ask(threads, batch, start, n)
    if numa.startswith("virtual-"):  # the node-local paths ran: the virtual nodes, and a thread on each
        nodes = int(numa.split("-")[1])
        assert got["virtual_nodes"] == nodes, got
        assert len(set(got["layout"])) == min(nodes, threads) and len(got["layout"]) == threads, got["layout"]
    assert got["sha256"] == want["sha256"], (numa, threads, mmap, batch, start, n)
    print(
        f"logits {numa} threads={threads} mmap={mmap} batch={batch} tokens {start}..{start + n}: "
        f"sha256 {got['sha256'][:16]} as off ({got['eval_s']:.1f} s + {want['eval_s']:.1f} s; "
        f"model load {worker.load_s:.1f} s)"
    )


@pytest.mark.parametrize("threads", [3, 4], ids=lambda t: f"{t}-threads")
def test_perplexity_is_identical_to_every_digit(workers, threads: int) -> None:
    """Perplexity of a fixed stretch of prose, off vs migrate: the same float, every digit printed."""
    off = workers("off", True).ask(threads, 64, 0, PPL_TOKENS)
    strategy = "migrate" if NODES >= 2 else "virtual-3"
    migrate = workers(strategy, True).ask(threads, 64, 0, PPL_TOKENS)
    print(
        f"perplexity, {NODES} node(s) ({strategy}), {threads} threads, {PPL_TOKENS} tokens of pydoc's prose: "
        f"off {off['ppl']}, migrate {migrate['ppl']} ({off['eval_s']:.1f} s + {migrate['eval_s']:.1f} s)"
    )
    assert off["ppl"] == migrate["ppl"]
    assert 1.0 < float(off["ppl"]) < 1e4  # a real model on real prose, not a constant
