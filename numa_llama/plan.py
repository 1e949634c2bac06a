"""How a GGUF model would spread over NUMA nodes under ``--numa migrate``, before loading it.

The tensors come from the file (``gguf`` package, no model load); the split
of each weight comes from the series itself (``hooks.plan``, the
``ggml_backend_cpu_numa_plan`` hook: the library's code, not a copy), for the
topology given: N equal nodes, or this machine's usable nodes.

An mmap'd model's weights sit at ``mapping + file offset`` with a
page-aligned mapping, so the file offset stands in for the address, and
pages are base pages, as the library plans mmap'd weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from numa_llama import hooks, sysfs
from numa_llama.decode import gguf_weights


@dataclass(frozen=True)
class Layout:
    """The nodes that get threads and how many each (the migrate layout for n_threads)."""

    node_ids: tuple[int, ...]
    weights: tuple[float, ...]
    threads: tuple[int, ...]

    @property
    def n_threads(self) -> int:
        return sum(self.threads)


def env_weights(n: int) -> list[float] | None:
    """``GGML_CPU_NUMA_WEIGHTS=w0,w1,...`` as the library reads it (node order; missing or bad entries: None)."""
    env = os.environ.get("GGML_CPU_NUMA_WEIGHTS")
    if not env:
        return None
    out: list[float] = []
    for part in env.split(",")[:n]:
        try:
            out.append(max(0.0, float(part)))
        except ValueError:
            out.append(0.0)  # atof's answer for text that is not a number
    return out


def system_layout(n_threads: int | None = None, topo: sysfs.Topology | None = None) -> Layout:
    """This machine's migrate layout: nodes weighted by their usable CPUs (or GGML_CPU_NUMA_WEIGHTS)."""
    topo = topo or sysfs.read_topology()
    ids = [n.id for n in topo.nodes]
    weights = [float(len(n.usable_cpus)) for n in topo.nodes]
    override = env_weights(len(ids))
    if override is not None:
        weights = [
            (override[i] if i < len(override) else weights[i]) if topo.nodes[i].usable_cpus else 0.0
            for i in range(len(ids))
        ]
    if n_threads is None:
        n_threads = sum(len(n.usable_cpus) for n in topo.nodes)
    return layout(ids, weights, n_threads)


def equal_layout(n_nodes: int, n_threads: int | None = None) -> Layout:
    return layout(list(range(n_nodes)), [1.0] * n_nodes, n_nodes if n_threads is None else n_threads)


def layout(ids: list[int], weights: list[float], n_threads: int) -> Layout:
    if n_threads < 1:
        raise ValueError(f"--threads must be >= 1, not {n_threads}")
    if not ids or sum(weights) <= 0:
        raise ValueError("no node may run threads (no usable CPUs, or every weight 0)")
    split = hooks.plan(n_threads, ids, weights, 1, 1, 0, 4096)  # the thread share only
    return Layout(tuple(ids), tuple(weights), split.threads)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    layer: str  # "blk.N", or the tensor's name outside the blocks
    type_name: str
    nbytes: int
    slabs: tuple[hooks.Slab, ...]
    node_bytes: dict[int, int]  # over all matrices
    remote_bytes: int  # bytes in pages that straddle two slabs and go to the other node

    @property
    def locality(self) -> float:
        return 1.0 - self.remote_bytes / self.nbytes if self.nbytes else 1.0


@dataclass
class ModelPlan:
    model: str
    layout: Layout
    page_bytes: int
    tensors: list[TensorPlan] = field(default_factory=list)

    def node_bytes(self) -> dict[int, int]:
        out = {n: 0 for n, w in zip(self.layout.node_ids, self.layout.weights, strict=True) if w > 0}
        for t in self.tensors:
            for n, b in t.node_bytes.items():
                out[n] = out.get(n, 0) + b
        return out

    def layers(self) -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {}
        for t in self.tensors:
            acc = out.setdefault(t.layer, {})
            for n, b in t.node_bytes.items():
                acc[n] = acc.get(n, 0) + b
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def locality(self) -> float:
        """Expected decode locality once placed: weight bytes not in a slab-straddling page's minority."""
        return 1.0 - sum(t.remote_bytes for t in self.tensors) / self.nbytes if self.nbytes else 1.0

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "layout": {
                "nodes": list(self.layout.node_ids),
                "weights": list(self.layout.weights),
                "threads": list(self.layout.threads),
            },
            "page_bytes": self.page_bytes,
            "weight_bytes": self.nbytes,
            "node_bytes": {str(k): v for k, v in self.node_bytes().items()},
            "expected_locality": self.locality,
            "layers": {k: {str(n): b for n, b in v.items()} for k, v in self.layers().items()},
            "tensors": [
                {
                    "name": t.name,
                    "type": t.type_name,
                    "bytes": t.nbytes,
                    "slabs": [[s.node, s.row_begin, s.row_end] for s in t.slabs],
                    "node_bytes": {str(k): v for k, v in t.node_bytes.items()},
                    "expected_locality": t.locality,
                }
                for t in self.tensors
            ],
        }


def _remote_bytes(base: int, slabs: tuple[hooks.Slab, ...], row_bytes: int, page: int) -> int:
    """Bytes of one matrix in pages that straddle a slab boundary and go to the node owning fewer of them."""
    remote = 0
    for a, b in zip(slabs, slabs[1:], strict=False):
        if a.row_end == a.row_begin or b.row_end == b.row_begin:
            continue
        addr = base + b.row_begin * row_bytes
        left = addr % page
        if left:
            remote += min(left, page - left)
    return remote


def plan_model(path: str | os.PathLike[str], lay: Layout, page_bytes: int = 4096) -> ModelPlan:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no model file at {path}")
    plan = ModelPlan(str(path), lay, page_bytes)
    for w in gguf_weights(path):
        name, rows, n_mat, row_bytes, offset = w.name, w.n_rows, w.n_matrices, w.row_bytes, w.offset
        split = hooks.plan(lay.n_threads, list(lay.node_ids), list(lay.weights), rows, row_bytes, offset, page_bytes)
        node_bytes: dict[int, int] = {}
        for s in split.slabs:
            node_bytes[s.node] = node_bytes.get(s.node, 0) + (s.row_end - s.row_begin) * row_bytes * n_mat
        remote = sum(
            _remote_bytes(offset + e * rows * row_bytes, split.slabs, row_bytes, page_bytes) for e in range(n_mat)
        )
        # a node this thread count leaves without threads keeps its slab; a neighbour's threads read it remotely
        remote += sum(node_bytes.get(n, 0) for n, t in zip(lay.node_ids, split.threads, strict=True) if t == 0)
        m = re.match(r"(blk\.\d+)\.", name)
        plan.tensors.append(
            TensorPlan(
                name,
                m[1] if m else name.removesuffix(".weight"),
                w.type_name,
                rows * row_bytes * n_mat,
                split.slabs,
                node_bytes,
                remote,
            )
        )
    return plan
