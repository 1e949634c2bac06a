"""How close a run comes to what the memory allows: a measured read-bandwidth matrix and the decode roofline.

The matrix is measured the way Intel MLC's ``--bandwidth_matrix`` is: the
threads pinned to node *i* (one per usable CPU) each stream a buffer that is
bound to node *j* (``mbind(MPOL_BIND)`` before the first touch, base pages), all
at once, and the bytes read are divided by the time from the common start to
the last thread's end. Every cell is measured ``repeats`` times, interleaved
over the cells, and reported as the median with its spread (min, max).

Decoding a token reads every matrix a forward pass multiplies by (the tied
output embedding included; ``decode.gguf_weights`` names them), and the KV
cache up to the current position. The roofline is the bandwidth divided by
those bytes: no decode can be faster, so a run measured above 100% of it is a
measurement error, and is reported as one.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from numa_llama import sysfs

DEFAULT_MIB = 256  # per thread: well past any last-level cache share
DEFAULT_REPEATS = 5
DEFAULT_PASSES = 2


class RooflineError(ValueError):
    """A bandwidth or roofline figure that cannot be given, with the reason in one line."""


@dataclass(frozen=True)
class Cell:
    cpu_node: int
    mem_node: int
    threads: int
    bytes_per_pass: int
    samples: tuple[float, ...]  # GB/s (1e9 bytes/s), one per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats were."""
        return (self.high - self.low) / self.median

    def as_dict(self) -> dict:
        return {
            "cpu_node": self.cpu_node,
            "mem_node": self.mem_node,
            "threads": self.threads,
            "bytes_per_pass": self.bytes_per_pass,
            "samples_gb_s": list(self.samples),
            "median_gb_s": self.median,
            "min_gb_s": self.low,
            "max_gb_s": self.high,
            "spread": self.spread,
        }


@dataclass(frozen=True)
class Matrix:
    cpu_nodes: tuple[int, ...]
    mem_nodes: tuple[int, ...]
    cells: dict[tuple[int, int], Cell] = field(compare=False)
    mib_per_thread: int
    repeats: int
    passes: int

    def cell(self, cpu_node: int, mem_node: int) -> Cell:
        return self.cells[(cpu_node, mem_node)]

    def local(self) -> float:
        """The all-local bandwidth: every node's threads reading their own node (the sum of the diagonal's medians)."""
        return sum(self.cell(n, n).median for n in self.cpu_nodes if n in self.mem_nodes)

    METHOD = (
        "one thread per usable CPU of the row's node, each streaming its own buffer (base pages, MPOL_BIND to the "
        "column's node, faulted in first), all started together; GB/s = bytes read / (last thread's end - start)"
    )

    def as_dict(self) -> dict:
        return {
            "method": self.METHOD,
            "mib_per_thread": self.mib_per_thread,
            "repeats": self.repeats,
            "passes": self.passes,
            "cpu_nodes": list(self.cpu_nodes),
            "mem_nodes": list(self.mem_nodes),
            "cells": [c.as_dict() for c in self.cells.values()],
        }

    def table(self) -> str:
        head = f"{'CPUs of node':>12}  " + "".join(f"{'memory on node ' + str(m):>26}" for m in self.mem_nodes)
        rows = [head]
        for i in self.cpu_nodes:
            cells = []
            for j in self.mem_nodes:
                c = self.cell(i, j)
                cells.append(f"{f'{c.median:.2f} ({c.low:.2f}-{c.high:.2f})':>26}")
            rows.append(f"{i:>12}  " + "".join(cells))
        return "\n".join(rows)


def stream_read(cpus: Sequence[int], mem_node: int, bytes_per_thread: int, passes: int) -> float:
    """One measurement: GB/s read by threads pinned to ``cpus``, from buffers bound to ``mem_node`` (-1: unbound)."""
    from numa_llama.kernel import NumaError, ffi, lib  # noqa: PLC0415

    c_cpus = ffi.new("int[]", list(cpus))
    seconds = ffi.new("double *")
    err = ffi.new("char[]", 256)
    rv = lib.nl_stream_read(c_cpus, len(cpus), mem_node, bytes_per_thread, passes, seconds, err, 256)
    if rv < 0:
        raise NumaError(-rv, f"reading node {mem_node}'s memory ({ffi.string(err).decode()})")
    if not seconds[0] > 0:
        raise RooflineError(f"the clock did not advance over {bytes_per_thread * len(cpus)} bytes: no figure")
    return len(cpus) * bytes_per_thread * passes / seconds[0] / 1e9


def measure(
    topo: sysfs.Topology | None = None,
    mib_per_thread: int = DEFAULT_MIB,
    repeats: int = DEFAULT_REPEATS,
    passes: int = DEFAULT_PASSES,
) -> Matrix:
    """The node x node read-bandwidth matrix of this machine (one cell on one node)."""
    if mib_per_thread < 1 or repeats < 1 or passes < 1:
        raise RooflineError("--bandwidth-mib, --bandwidth-repeats and the passes must be >= 1")
    topo = topo or sysfs.read_topology()
    cpu_nodes = tuple(n.id for n in topo.compute_nodes())
    mem_nodes = tuple(n.id for n in topo.nodes if n.memory_allowed and n.memory_total > 0)
    if not cpu_nodes or not mem_nodes:
        raise RooflineError("no node where this process may both run and allocate: no bandwidth to measure")
    usable = {n.id: n.usable_cpus for n in topo.nodes}
    size = mib_per_thread << 20
    need = max(len(usable[i]) for i in cpu_nodes) * size
    for n in topo.nodes:
        if n.id in mem_nodes and n.memory_free and need > n.memory_free // 2:
            raise RooflineError(
                f"{need >> 20} MiB per node would take more than half of node {n.id}'s free memory "
                f"({n.memory_free >> 20} MiB): give a smaller --bandwidth-mib"
            )
    samples: dict[tuple[int, int], list[float]] = {(i, j): [] for i in cpu_nodes for j in mem_nodes}
    # one node: bind nothing, so that a machine without mbind (a container's seccomp) still gets its one figure
    bind = len(topo.nodes) > 1
    for _ in range(repeats):
        for (i, j), got in samples.items():
            got.append(stream_read(usable[i], j if bind else -1, size, passes))
    cells = {k: Cell(k[0], k[1], len(usable[k[0]]), len(usable[k[0]]) * size, tuple(v)) for k, v in samples.items()}
    for c in cells.values():
        if not all(math.isfinite(s) and s > 0 for s in c.samples):
            raise RooflineError(f"node {c.cpu_node} reading node {c.mem_node}: a sample is not a positive figure")
    return Matrix(cpu_nodes, mem_nodes, cells, mib_per_thread, repeats, passes)


@dataclass(frozen=True)
class TokenBytes:
    """What decoding one token reads: the matmul weights, and the KV cache at the given position."""

    weights: int
    kv_per_position: int  # bytes of K and V that one cached position adds, over all layers
    tied_output: bool  # the output matrix is the token embedding

    def at(self, position: float) -> float:
        return self.weights + self.kv_per_position * position

    def as_dict(self) -> dict:
        return {"weights": self.weights, "kv_per_position": self.kv_per_position, "tied_output": self.tied_output}


def token_bytes(model_path: str | os.PathLike[str], kv_type_bytes: int = 2) -> TokenBytes:
    """Bytes read per decoded token, from the GGUF header alone (``kv_type_bytes``: 2 for the default f16 cache)."""
    from numa_llama.decode import gguf_tensor_infos, gguf_weights  # noqa: PLC0415

    meta: dict[str, int | float | bool | str | None] = {}
    gguf_tensor_infos(model_path, meta)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise RooflineError(f"{model_path}: no general.architecture in the GGUF")

    def count(key: str, default: int | None = None) -> int:
        v = meta.get(f"{arch}.{key}", default)
        if f"{arch}.{key}" in meta and v is None:
            raise RooflineError(f"{model_path}: {arch}.{key} is per layer (an array): not counted here")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise RooflineError(f"{model_path}: the GGUF has no {arch}.{key}, which the KV cache's size needs")
        return v

    n_head = count("attention.head_count")
    head_dim = count("embedding_length") // n_head
    kv = (
        count("block_count")
        * count("attention.head_count_kv", n_head)
        * (count("attention.key_length", head_dim) + count("attention.value_length", head_dim))
        * kv_type_bytes
    )
    weights = gguf_weights(model_path)
    return TokenBytes(
        sum(w.row_bytes * w.n_rows * w.n_matrices for w in weights),
        kv,
        any(w.name == "token_embd.weight" for w in weights),
    )


def roofline_tokens_per_s(gb_s: float, bytes_per_token: float) -> float:
    if not (gb_s > 0 and bytes_per_token > 0):
        raise RooflineError("the roofline needs a positive bandwidth and a positive byte count")
    return gb_s * 1e9 / bytes_per_token


def percent_of_roofline(measured_tokens_per_s: float, roofline: float) -> float:
    """The measured rate as a percentage of the roofline; above 100% is a measurement error, raised as one."""
    pct = 100.0 * measured_tokens_per_s / roofline
    if pct > 100.0:
        raise RooflineError(
            f"{measured_tokens_per_s:.2f} t/s is {pct:.1f}% of the {roofline:.2f} t/s roofline: a measurement "
            "error (the bandwidth was under-measured, or bytes were counted that a token does not read)"
        )
    return pct


def traffic(
    per_thread: Sequence[float],
    thread_node: Sequence[int],
    read_bytes: Sequence[int] | None,
    page_share: dict[int, float],
) -> dict[tuple[int, int], float]:
    """Where a token's bytes come from, by the kernel's placement: ``{(i, j): f}``, the fraction of the bytes that
    node *i*'s threads read from node *j*'s memory (the fractions sum to 1).

    Thread *t* on node *i* reads ``read_bytes[t]`` (equal shares if not given), of which ``per_thread[t]`` are on
    node *i*; its remote bytes are counted on the other nodes in proportion to their share of the weight pages
    (``page_share``, node -> fraction), or evenly over them where no other node holds a page."""
    if not per_thread or len(per_thread) != len(thread_node):
        raise RooflineError("the placement has no threads, or not one node per thread")
    weights = [float(b) for b in read_bytes] if read_bytes else [1.0] * len(per_thread)
    if len(weights) != len(per_thread) or not sum(weights) > 0:
        raise RooflineError("the placement's per-thread byte counts do not match its threads")
    nodes = sorted(set(thread_node) | set(page_share))
    total = sum(weights)
    out: dict[tuple[int, int], float] = {}
    for local, i, w in zip(per_thread, thread_node, weights, strict=True):
        if not 0.0 <= local <= 1.0:
            raise RooflineError(f"a thread on node {i} has a local fraction of {local}")
        share = w / total
        if local > 0:
            out[(i, i)] = out.get((i, i), 0.0) + local * share
        others = [j for j in nodes if j != i]
        if local < 1.0 and not others:
            raise RooflineError(f"a thread on node {i} reads remote bytes, but the placement names no other node")
        held = sum(page_share.get(j, 0.0) for j in others)
        for j in others:
            part = page_share.get(j, 0.0) / held if held > 0 else 1.0 / len(others)
            if part and local < 1.0:
                out[(i, j)] = out.get((i, j), 0.0) + (1.0 - local) * share * part
    return out


def placement_roofline(matrix: Matrix, flows: dict[tuple[int, int], float], bytes_per_token: float) -> float:
    """The decode roofline of one placement (tokens/s): no token can take less time than

    - any node's memory serving every byte read from it, at the most that memory gave its own node's threads
      (the matrix's diagonal; a node without CPUs: the most any node read from it);
    - any node's threads reading what they read from one node, at the rate the matrix measured for that pair.

    The bound lets every pair's stream run at once, so it is optimistic (an upper bound), and with every byte
    local, on nodes of equal bandwidth that read equal shares, it is the sum of the diagonal over the bytes per
    token (``Matrix.local``)."""
    if not bytes_per_token > 0:
        raise RooflineError("the roofline needs a positive byte count")
    known = set(matrix.cells)
    missing = [k for k, f in flows.items() if f > 0 and k not in known]
    if missing:
        raise RooflineError(f"the bandwidth matrix has no figure for node {missing[0][0]} reading node {missing[0][1]}")

    def memory_gbs(j: int) -> float:
        if (j, j) in known:
            return matrix.cell(j, j).median
        return max(c.median for (i, m), c in matrix.cells.items() if m == j)

    seconds = 0.0
    for j in {m for (_, m) in flows}:
        served = sum(f for (_, m), f in flows.items() if m == j)
        seconds = max(seconds, served * bytes_per_token / (memory_gbs(j) * 1e9))
    for (i, j), f in flows.items():
        if f > 0:
            seconds = max(seconds, f * bytes_per_token / (matrix.cell(i, j).median * 1e9))
    if not seconds > 0:
        raise RooflineError("the placement reads no bytes")
    return 1.0 / seconds
