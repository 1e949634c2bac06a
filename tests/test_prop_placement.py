"""Placement properties in the multi-node guests (``prop_placement.py``, in a process of its own).

Run twice: with the default layout (threads by usable CPUs) and with unequal
node weights (``GGML_CPU_NUMA_WEIGHTS``), so thread layouts with unequal
shares are placed too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import numa_nodes

pytestmark = pytest.mark.numa_guest

WORKER = Path(__file__).with_name("prop_placement.py")


@pytest.mark.parametrize("weights", [None, "uneven"], ids=["by-cpus", "uneven-weights"])
def test_placement_properties(weights: str | None) -> None:
    """prop_placement.py's properties hold: every slab page on its node, through allocate/free/re-place."""
    env = None
    if weights == "uneven":
        import os

        env = {**os.environ, "GGML_CPU_NUMA_WEIGHTS": ",".join(str(1 + 2 * (k % 2)) for k in range(numa_nodes()))}
    proc = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=1800, cwd=WORKER.parent
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "PlacementMachine: ok" in proc.stdout
