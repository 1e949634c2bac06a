"""Shared fixtures. The suite tests the installed numa-llama (the real build) and the tools in build/."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("NUMA_VM") and os.environ.get("NUMA_VM_SCRATCH"):  # the guest's checkout is read-only
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(os.environ["NUMA_VM_SCRATCH"], "hypothesis"))

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build"))  # the series/fetch/compile tools are scripts, not a package

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("expensive", max_examples=2000, deadline=None)
# for breaking the series on purpose: no explicit examples, so what fails is found and shrunk by hypothesis
settings.register_profile(
    "sabotage",
    max_examples=1000,
    deadline=None,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
if os.environ.get("NUMA_VM"):  # in a guest the checkout is read-only: no example database
    settings.register_profile("guest", parent=settings.get_profile(settings._current_profile), database=None)
    settings.load_profile("guest")


def numa_nodes() -> int:
    return len(list(Path("/sys/devices/system/node").glob("node[0-9]*")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a one-node host the numa_guest tests are not skipped: `tox -e numa` runs them in guests."""
    if numa_nodes() >= 2:
        return
    guest_only = [item for item in items if item.get_closest_marker("numa_guest")]
    if guest_only:
        config.hook.pytest_deselected(items=guest_only)
        items[:] = [item for item in items if not item.get_closest_marker("numa_guest")]
        config.stash[_DESELECTED] = len(guest_only)


_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    n = config.stash.get(_DESELECTED, 0)
    if n:
        terminalreporter.write_line(
            f"{n} numa_guest test(s) need several NUMA nodes and were left to "
            "`tox -e numa`, which runs them in 2- and 4-node QEMU guests"
        )


@pytest.fixture(scope="session")
def model_path() -> Path:
    from numa_llama.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def synthetic_model() -> Path:
    """The seeded synthetic Llama (numa_llama.synthetic): page-aligned, so placement has an exact answer.

    In a guest the host's filesystem is read-only: `tox -e numa` writes it on the host first."""
    from numa_llama import synthetic

    return synthetic.cached()


@pytest.fixture(scope="session")
def straddling_model() -> Path:
    """The same synthetic Llama with 32-byte tensor alignment: slab boundaries straddle pages."""
    from numa_llama import synthetic

    return synthetic.cached(synthetic.Shape(page_aligned=False))


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: llama.cpp initialises NUMA once per process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT / "tests"
    )


def run_json(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    proc = run_python(code, env, timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the servers' and workers' tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
