"""The NUMA nodes the kernel shows (sysfs), for summaries; no libnuma."""

from __future__ import annotations

from pathlib import Path

SYSFS_NODES = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def online_nodes(root: Path = SYSFS_NODES) -> dict[int, list[int]]:
    """Node id -> its CPUs, for every node directory under ``root``."""
    nodes: dict[int, list[int]] = {}
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpulist = d / "cpulist"
        nodes[int(d.name[4:])] = parse_cpulist(cpulist.read_text()) if cpulist.exists() else []
    return nodes
