"""The machine's NUMA topology, read from sysfs (no libnuma), and what this process may use of it.

``read_topology()`` reads ``/sys/devices/system/node`` (nodes, their CPUs,
memory and distances) and ``/sys/devices/system/cpu/online``, and joins them
with the process's CPU affinity and cpuset memory nodes. A tree it cannot
make sense of raises :class:`TopologyError` naming the file and the problem,
rather than guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SYSFS = Path("/sys/devices/system")


class TopologyError(ValueError):
    """The sysfs tree is malformed or inconsistent."""


def parse_list(text: str, what: str = "list") -> list[int]:
    """The kernel's list format, ``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]``; empty text is an empty list."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise TopologyError(f"{what}: {part!r} is not a number or a range (in {text.strip()!r})")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise TopologyError(f"{what}: range {part!r} runs backwards")
        out.extend(range(lo, hi + 1))
    if len(set(out)) != len(out):
        raise TopologyError(f"{what}: {text.strip()!r} names an entry twice")
    return sorted(out)


def format_list(values) -> str:
    """The kernel's list format: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    vals = sorted(set(values))
    out: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(out)


def parse_cpulist(text: str) -> list[int]:
    return parse_list(text, "cpulist")


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]  # online CPUs of the node
    memory_total: int  # bytes
    memory_free: int  # bytes
    distances: dict[int, int] = field(compare=True)  # node id -> SLIT distance
    usable_cpus: tuple[int, ...] = ()  # of cpus, those this process may run on
    memory_allowed: bool = True  # in this process's cpuset mems


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    allowed_cpus: tuple[int, ...]
    allowed_nodes: tuple[int, ...]
    numa_balancing: str | None = None  # /proc/sys/kernel/numa_balancing
    thp: str | None = None  # /sys/kernel/mm/transparent_hugepage/enabled, the bracketed choice

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    def compute_nodes(self) -> tuple[Node, ...]:
        """The nodes where this process may run threads (migrate gives threads to these, by usable CPUs)."""
        return tuple(n for n in self.nodes if n.usable_cpus)

    def as_dict(self) -> dict:
        return {
            "nodes": [
                {
                    "id": n.id,
                    "cpus": list(n.cpus),
                    "usable_cpus": list(n.usable_cpus),
                    "memory_total": n.memory_total,
                    "memory_free": n.memory_free,
                    "memory_allowed": n.memory_allowed,
                    "distances": {str(k): v for k, v in n.distances.items()},
                }
                for n in self.nodes
            ],
            "allowed_cpus": list(self.allowed_cpus),
            "allowed_nodes": list(self.allowed_nodes),
            "numa_balancing": self.numa_balancing,
            "thp": self.thp,
        }


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise TopologyError(f"{path}: cannot read: {e.strerror}") from None


def _meminfo(path: Path, node: int) -> tuple[int, int]:
    found: dict[str, int] = {}
    for line in _read(path).splitlines():
        m = re.fullmatch(r"Node\s+(\d+)\s+(\S+?):\s+(\d+)(?:\s+kB)?\s*", line)
        if m is None:
            if line.strip():
                raise TopologyError(f"{path}: cannot parse line {line!r}")
            continue
        if int(m[1]) != node:
            raise TopologyError(f"{path}: line for node {m[1]} in node {node}'s meminfo")
        found[m[2]] = int(m[3]) * 1024
    if "MemTotal" not in found or "MemFree" not in found:
        raise TopologyError(f"{path}: no MemTotal/MemFree")
    return found["MemTotal"], found["MemFree"]


def read_topology(
    root: Path = SYSFS,
    allowed_cpus: tuple[int, ...] | None = None,
    allowed_nodes: tuple[int, ...] | None = None,
    proc: Path = Path("/proc"),
    thp_file: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled"),
) -> Topology:
    """Parse ``root/node`` and ``root/cpu/online``; ``allowed_*`` default to this process's (affinity, cpuset)."""
    node_dir = root / "node"
    cpu_online_file = root / "cpu" / "online"
    cpu_online = set(parse_list(_read(cpu_online_file), str(cpu_online_file))) if cpu_online_file.exists() else None
    if allowed_cpus is None or allowed_nodes is None:
        from numa_llama import kernel  # noqa: PLC0415

        allowed_cpus = kernel.allowed_cpus() if allowed_cpus is None else allowed_cpus
        allowed_nodes = kernel.allowed_nodes() if allowed_nodes is None else allowed_nodes
    if not node_dir.is_dir():
        return _without_numa(root, proc, thp_file, cpu_online, allowed_cpus, allowed_nodes)
    if (node_dir / "online").exists():
        ids = parse_list(_read(node_dir / "online"), f"{node_dir / 'online'}")
    else:
        ids = sorted(int(d.name[4:]) for d in node_dir.glob("node[0-9]*"))
    if not ids:
        raise TopologyError(f"{node_dir}: no online NUMA node")
    owner: dict[int, int] = {}
    nodes: list[Node] = []
    for node_id in ids:
        d = node_dir / f"node{node_id}"
        if not d.is_dir():
            raise TopologyError(f"{d}: node {node_id} is online but has no directory")
        cpus = parse_list(_read(d / "cpulist"), str(d / "cpulist"))
        if cpu_online is not None:
            cpus = [c for c in cpus if c in cpu_online]
        for c in cpus:
            if c in owner:
                raise TopologyError(f"{d / 'cpulist'}: CPU {c} is also on node {owner[c]}")
            owner[c] = node_id
        total, free = _meminfo(d / "meminfo", node_id)
        dist_text = _read(d / "distance").split()
        if len(dist_text) != len(ids) or not all(x.isdigit() for x in dist_text):
            raise TopologyError(
                f"{d / 'distance'}: {len(dist_text)} entries for {len(ids)} online nodes ({' '.join(dist_text)!r})"
            )
        distances = dict(zip(ids, (int(x) for x in dist_text), strict=True))
        nodes.append(
            Node(
                node_id,
                tuple(cpus),
                total,
                free,
                distances,
                tuple(c for c in cpus if c in set(allowed_cpus)),
                node_id in set(allowed_nodes),
            )
        )
    return Topology(tuple(nodes), tuple(allowed_cpus), tuple(allowed_nodes), *_settings(proc, thp_file))


def _settings(proc: Path, thp_file: Path) -> tuple[str | None, str | None]:
    balancing = proc / "sys" / "kernel" / "numa_balancing"
    thp = None
    if thp_file.exists():
        m = re.search(r"\[(\w+)\]", _read(thp_file))
        thp = m[1] if m else None
    return (_read(balancing).strip() if balancing.exists() else None), thp


def _without_numa(
    root: Path,
    proc: Path,
    thp_file: Path,
    cpu_online: set[int] | None,
    allowed_cpus: tuple[int, ...],
    allowed_nodes: tuple[int, ...],
) -> Topology:
    """A kernel built without CONFIG_NUMA has no node directory: one node 0 with every online CPU and all memory."""
    if cpu_online is None:
        raise TopologyError(f"{root}: neither node/ nor cpu/online: cannot tell the CPUs")
    total = free = 0
    meminfo = proc / "meminfo"
    if meminfo.exists():
        fields = dict(re.findall(r"(?m)^(\w+):\s+(\d+)", _read(meminfo)))
        total, free = int(fields.get("MemTotal", 0)) * 1024, int(fields.get("MemFree", 0)) * 1024
    cpus = tuple(sorted(cpu_online))
    node = Node(
        0,
        cpus,
        total,
        free,
        {0: 10},
        tuple(c for c in cpus if c in set(allowed_cpus)),
        not allowed_nodes or 0 in allowed_nodes,
    )
    return Topology((node,), tuple(allowed_cpus), tuple(allowed_nodes) or (0,), *_settings(proc, thp_file))


def online_nodes(root: Path = SYSFS) -> dict[int, list[int]]:
    """Node id -> its online CPUs (all of them, not only the usable ones)."""
    return {n.id: list(n.cpus) for n in read_topology(root).nodes}
