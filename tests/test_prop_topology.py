"""Properties of the sysfs topology parser, over generated ``/sys/devices/system`` trees.

A simple model (a dict of nodes with CPU sets) is drawn, written out the way
the kernel lays it out (list format with ranges, meminfo lines, distance
rows), parsed, and compared. Malformed trees must be refused with an error
that names the file.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from numa_llama.sysfs import TopologyError, format_list, parse_list, read_topology


def kernel_list(values: set[int] | list[int]) -> str:
    """The kernel's list format, as the test writes it (independent of sysfs.format_list)."""
    vals = sorted(values)
    runs: list[list[int]] = []
    for v in vals:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


@dataclass(frozen=True)
class Model:
    node_cpus: dict[int, frozenset[int]]  # node id -> CPUs listed in its cpulist (online or not)
    offline: frozenset[int]
    mem_kb: dict[int, tuple[int, int]]  # total, free
    distance: dict[int, dict[int, int]]
    allowed_cpus: frozenset[int]
    allowed_nodes: frozenset[int]


@st.composite
def models(draw: st.DrawFn) -> Model:
    ids = sorted(draw(st.sets(st.integers(0, 31), min_size=1, max_size=8)))  # holes in the numbering
    n_cpus = draw(st.integers(0, 64))
    # interleaved CPU numbers: each CPU goes to any node; nodes can end up memory-only (no CPUs)
    owner = draw(st.lists(st.sampled_from(ids), min_size=n_cpus, max_size=n_cpus))
    node_cpus = {i: frozenset(c for c, o in enumerate(owner) if o == i) for i in ids}
    offline = frozenset(draw(st.sets(st.integers(0, max(0, n_cpus - 1)), max_size=8))) if n_cpus else frozenset()
    mem = {i: (t := draw(st.integers(0, 1 << 30)), draw(st.integers(0, t))) for i in ids}
    dist = {i: {j: 10 if i == j else draw(st.integers(11, 255)) for j in ids} for i in ids}
    allowed_cpus = frozenset(draw(st.sets(st.integers(0, max(0, n_cpus - 1))))) if n_cpus else frozenset()
    allowed_nodes = frozenset(draw(st.sets(st.sampled_from(ids), min_size=1)))
    return Model(node_cpus, offline, mem, dist, allowed_cpus, allowed_nodes)


def write_tree(root: Path, m: Model) -> None:
    node = root / "node"
    node.mkdir(parents=True)
    ids = sorted(m.node_cpus)
    (node / "online").write_text(kernel_list(ids) + "\n")
    (node / "possible").write_text(f"0-{max(ids)}\n")
    for i in ids:
        d = node / f"node{i}"
        d.mkdir()
        (d / "cpulist").write_text(kernel_list(m.node_cpus[i]) + "\n")
        total, free = m.mem_kb[i]
        (d / "meminfo").write_text(
            f"Node {i} MemTotal:       {total} kB\nNode {i} MemFree:        {free} kB\n"
            f"Node {i} Active(anon):   12 kB\nNode {i} HugePages_Total:     0\n"
        )
        (d / "distance").write_text(" ".join(str(m.distance[i][j]) for j in ids) + "\n")
    all_cpus = set().union(*m.node_cpus.values())
    (root / "cpu").mkdir()
    (root / "cpu" / "online").write_text(kernel_list(all_cpus - m.offline) + "\n")


def parse(root: Path, m: Model):
    return read_topology(
        root,
        allowed_cpus=tuple(sorted(m.allowed_cpus)),
        allowed_nodes=tuple(sorted(m.allowed_nodes)),
        proc=root / "proc",
        thp_file=root / "thp",
    )


@given(models())
def test_parser_agrees_with_the_model(m: Model) -> None:
    """Nodes, online CPUs, memory, distances and what the process may use come out as they went in.

    Why it must hold: the layout gives threads to nodes by their usable CPUs; a CPU read on the wrong node,
    an offline CPU counted, or a node missed puts threads where their rows are not.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root, m)
        topo = parse(root, m)
    assert topo.node_ids == tuple(sorted(m.node_cpus))
    for n in topo.nodes:
        online = m.node_cpus[n.id] - m.offline
        assert set(n.cpus) == online
        assert set(n.usable_cpus) == online & m.allowed_cpus
        assert (n.memory_total, n.memory_free) == tuple(1024 * x for x in m.mem_kb[n.id])
        assert n.distances == m.distance[n.id]
        assert n.memory_allowed == (n.id in m.allowed_nodes)
    assert [n.id for n in topo.compute_nodes()] == [
        i for i in sorted(m.node_cpus) if (m.node_cpus[i] - m.offline) & m.allowed_cpus
    ]


@given(st.sets(st.integers(0, 5000), max_size=200))
def test_list_format_round_trips(values: set[int]) -> None:
    """The kernel's list format reads back exactly what was written (ranges and singles)."""
    assert parse_list(kernel_list(values)) == sorted(values)
    assert format_list(values) == kernel_list(values)


CORRUPTIONS = [
    "cpulist-garbage",
    "cpulist-backwards",
    "cpu-on-two-nodes",
    "distance-short",
    "node-dir-missing",
    "meminfo-no-total",
    "online-empty",
    "cpulist-missing",
]


@given(models(), st.sampled_from(CORRUPTIONS))
def test_malformed_trees_are_refused_with_the_file_named(m: Model, corruption: str) -> None:
    """A tree the parser cannot trust raises TopologyError naming the file; it never guesses a topology."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root, m)
        ids = sorted(m.node_cpus)
        victim = root / "node" / f"node{ids[-1]}"
        if corruption == "cpulist-garbage":
            (victim / "cpulist").write_text("0-3,x\n")
            culprit = "cpulist"
        elif corruption == "cpulist-backwards":
            (victim / "cpulist").write_text("7-2\n")
            culprit = "cpulist"
        elif corruption == "cpu-on-two-nodes":
            if len(ids) < 2:
                ids.insert(0, ids[0] + 100)  # a second node, sharing CPU 0 with the first
                extra = root / "node" / f"node{ids[0]}"
                extra.mkdir()
                (extra / "meminfo").write_text(
                    (victim / "meminfo").read_text().replace(f"Node {ids[-1]} ", f"Node {ids[0]} ")
                )
                (root / "node" / "online").write_text(kernel_list(ids) + "\n")
                for i in ids:
                    (root / "node" / f"node{i}" / "distance").write_text(" ".join("10" for _ in ids) + "\n")
                (extra / "cpulist").write_text("0\n")
            for i in ids:
                (root / "node" / f"node{i}" / "cpulist").write_text("0\n")
            (root / "cpu" / "online").write_text("0\n")
            culprit = "cpulist"
        elif corruption == "distance-short":
            (victim / "distance").write_text("10 " * (len(ids) - 1) + "\n" if len(ids) > 1 else "10 20\n")
            culprit = "distance"
        elif corruption == "node-dir-missing":
            for f in victim.iterdir():
                f.unlink()
            victim.rmdir()
            culprit = f"node{ids[-1]}"
        elif corruption == "meminfo-no-total":
            (victim / "meminfo").write_text(f"Node {ids[-1]} MemFree: 4 kB\n")
            culprit = "meminfo"
        elif corruption == "online-empty":
            (root / "node" / "online").write_text("\n")
            culprit = "node"
        else:
            (victim / "cpulist").unlink()
            culprit = "cpulist"
        with pytest.raises(TopologyError) as err:
            parse(root, m)
    assert culprit in str(err.value), err.value
    assert tmp in str(err.value)


def test_this_machine_parses() -> None:
    """The real sysfs of the machine the tests run on: every online node, each CPU on one node."""
    topo = read_topology()
    assert topo.nodes and len({c for n in topo.nodes for c in n.cpus}) == sum(len(n.cpus) for n in topo.nodes)
    assert set(topo.allowed_nodes) <= set(topo.node_ids)
    assert topo.compute_nodes()


def test_a_kernel_without_numa_is_one_node(tmp_path: Path) -> None:
    """No node/ directory (CONFIG_NUMA off): one node 0 holding every online CPU and /proc/meminfo's memory."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "online").write_text("0-3\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:  2048 kB\nMemFree:   1024 kB\n")
    topo = read_topology(
        tmp_path, allowed_cpus=(1, 2), allowed_nodes=(0,), proc=tmp_path / "proc", thp_file=tmp_path / "thp"
    )
    (node,) = topo.nodes
    assert (node.id, node.cpus, node.usable_cpus) == (0, (0, 1, 2, 3), (1, 2))
    assert (node.memory_total, node.memory_free, node.distances) == (2048 * 1024, 1024 * 1024, {0: 10})
