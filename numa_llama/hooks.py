"""The patch series' C API (the ``ggml_backend_cpu_numa_*`` hooks), through the compiled ``numa_llama._native``.

The hooks are reached the way the series hands them out, by the CPU
backend's ``ggml_backend_reg_get_proc_address``, in the library that
``llama_cpp`` loaded: ``_native`` opens it with ``RTLD_NOLOAD``, so it is
that copy, with the state llama.cpp placed the weights in, or an error.
Their structs are checked against the patched ``ggml-cpu.h`` when the module
is compiled. The kernel's word on the pages is in :mod:`numa_llama.kernel`.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

from numa_llama import kernel
from numa_llama.kernel import ffi, lib, page_nodes, page_spans  # noqa: F401  (re-exported: callers ask both)

MAX_SLABS = 64  # GGML_CPU_NUMA_MAX_SLABS
_STAT_FIELDS = (
    "tensors pages pages_in_place pages_moved pages_failed pages_boundary failed_eacces failed_ebusy "
    "failed_enomem failed_cpuset failed_other virtual_nodes not_placed place_ns tensors_not_local huge_pages_split "
    "products_local"
).split()


# ggml_backend_cpu_numa_stats::not_placed: why migrate placed nothing, keyed by the header's own values
# (GGML_BACKEND_CPU_NUMA_NOT_PLACED_*, which the compiler supplies to the cffi module)
NOT_PLACED = {
    lib.GGML_BACKEND_CPU_NUMA_NOT_PLACED_NO: "",
    lib.GGML_BACKEND_CPU_NUMA_NOT_PLACED_VIRTUAL: "virtual nodes own no memory (GGML_CPU_NUMA_VIRTUAL)",
    lib.GGML_BACKEND_CPU_NUMA_NOT_PLACED_POLICY: (
        "the process already has a memory policy of its own (numactl --interleave, --membind, --preferred)"
    ),
    lib.GGML_BACKEND_CPU_NUMA_NOT_PLACED_ONE_NODE: (
        "only one node has CPUs this process may use (a cpuset, or numactl -N)"
    ),
}


def not_local_counts(weights: Sequence[tuple[str, str]]) -> dict[str, int]:
    """How many of the (weight, buffer type) pairs that ``not_local`` gives are in each buffer type, by name."""
    out: dict[str, int] = {}
    for _, buft in sorted(weights, key=lambda w: w[1]):
        out[buft] = out.get(buft, 0) + 1
    return out


class HookUnavailable(RuntimeError):
    """The loaded CPU backend does not hand out this hook (a build without GGML_CPU_NUMA, or an older series)."""


@dataclass(frozen=True)
class Slab:
    node: int
    row_begin: int
    row_end: int


@dataclass(frozen=True)
class Split:
    slabs: tuple[Slab, ...]
    threads: tuple[int, ...] = ()  # from plan(): threads given to each node, in the order of node_ids


@dataclass(frozen=True)
class Placement:
    """A weight the series placed, and the plan it placed it by."""

    name: str
    data: int
    nbytes: int
    row_bytes: int
    matrix_bytes: int
    n_rows: int
    n_matrices: int
    page_bytes: int
    slabs: tuple[Slab, ...]

    def slab_pages(self) -> Iterator[tuple[int, list[int]]]:
        """(intended node, base-page addresses wholly inside that node's slab), per matrix and slab."""
        unit = self.page_bytes
        base_page = kernel.page_size()
        for e in range(self.n_matrices):
            base = self.data + e * self.matrix_bytes
            for s in self.slabs:
                lo = -(-(base + s.row_begin * self.row_bytes) // unit) * unit
                hi = (base + s.row_end * self.row_bytes) // unit * unit
                if hi > lo:
                    yield s.node, list(range(lo, hi, base_page))


@cache
def bind() -> str:
    """Bind ``_native`` to the library ``llama_cpp`` loaded (once); returns its path."""
    import llama_cpp.llama_cpp as bindings  # noqa: PLC0415

    path = bindings._lib._name
    err = ffi.new("char[]", 512)
    if lib.nl_bind(path.encode(), err, 512) != 0:
        raise HookUnavailable(ffi.string(err).decode())
    return path


def _call(rv: int, name: str) -> int:
    if rv == -errno.ENOSYS:
        raise HookUnavailable(f"the loaded CPU backend has no hook {name!r} (not a GGML_CPU_NUMA build?)")
    return rv


def has_hook(name: str) -> bool:
    bind()
    return bool(lib.nl_has_hook(name.encode()))


def _split(s) -> tuple[Slab, ...]:
    return tuple(Slab(s.node[k], s.row_begin[k], s.row_begin[k + 1]) for k in range(s.n_slabs))


def layout(n_threads: int) -> list[int]:
    """The node id of each compute thread under ``--numa migrate`` (after NUMA init)."""
    bind()
    out = ffi.new("int[]", n_threads)
    _call(lib.nl_numa_layout(n_threads, out), "ggml_backend_cpu_numa_layout")
    return list(out)


def split_of(type_id: int, ne0: int, ne1: int, data: int) -> tuple[Slab, ...]:
    """The plan this process places a weight by (``ggml_backend_cpu_numa_split``: this machine's nodes and weights)."""
    bind()
    s = ffi.new("struct ggml_backend_cpu_numa_split *")
    _call(lib.nl_numa_split_of(type_id, ne0, ne1, data, s), "ggml_backend_cpu_numa_split")
    return _split(s)


def plan(
    n_threads: int,
    node_ids: Sequence[int],
    weights: Sequence[float],
    n_rows: int,
    row_bytes: int,
    data: int,
    page_bytes: int,
) -> Split:
    """The series' split plan for a topology given explicitly (``ggml_backend_cpu_numa_plan``: the library's code).

    ``n_threads`` are shared among the nodes by ``weights`` (largest remainder),
    and the ``n_rows`` rows of ``row_bytes`` at address ``data``, moving in
    pages of ``page_bytes``, are split among the nodes by the same weights: the
    slabs do not depend on ``n_threads``, so a weight is placed once.
    """
    if len(node_ids) != len(weights):
        raise ValueError(f"{len(node_ids)} node ids but {len(weights)} weights")
    if not 0 < len(node_ids) <= 4096 or n_threads < 0 or n_rows < 0 or row_bytes <= 0 or page_bytes <= 0:
        raise ValueError(
            f"plan: nodes={len(node_ids)} threads={n_threads} rows={n_rows} row_bytes={row_bytes} "
            f"page_bytes={page_bytes}: out of range"
        )
    bind()
    threads = ffi.new("int[]", len(node_ids))
    s = ffi.new("struct ggml_backend_cpu_numa_split *")
    _call(
        lib.nl_numa_plan(
            n_threads, len(node_ids), list(node_ids), list(weights), n_rows, row_bytes, data, page_bytes, threads, s
        ),
        "ggml_backend_cpu_numa_plan",
    )
    return Split(_split(s), tuple(threads))


def unit_nodes(placements: Sequence[Placement], unit_addr: int, unit: int, page: int) -> tuple[bool, list[int]]:
    """The node placement gives each base page of the huge-page unit at ``unit_addr``.

    ``ggml_backend_cpu_numa_unit_nodes``, by the rows of ``placements``: each
    page goes to the node whose rows hold
    most of its bytes, -1 where none do. The flag: the unit's pages belong to
    two nodes or more, so placement lays it out again in base pages instead of
    moving it whole. A pure function of its inputs: no memory is touched.
    """
    if unit <= 0 or page <= 0 or unit % page or unit_addr % unit:
        raise ValueError(f"unit_nodes: unit {unit} at {unit_addr:#x}, page {page}: not whole aligned pages")
    bind()
    cp = ffi.new("struct ggml_backend_cpu_numa_placement[]", max(1, len(placements)))
    for c, p in zip(cp, placements, strict=False):
        c.data = ffi.cast("void *", p.data)
        c.nbytes = p.nbytes
        c.row_bytes = p.row_bytes
        c.matrix_bytes = p.matrix_bytes
        c.n_rows = p.n_rows
        c.n_matrices = p.n_matrices
        c.page_bytes = p.page_bytes
        if len(p.slabs) > MAX_SLABS:
            raise ValueError(f"unit_nodes: {p.name} has {len(p.slabs)} slabs (at most {MAX_SLABS})")
        c.split.n_slabs = len(p.slabs)
        for k, s in enumerate(p.slabs):
            c.split.node[k] = s.node
            c.split.row_begin[k] = s.row_begin
            c.split.row_begin[k + 1] = s.row_end
    out = ffi.new("int[]", unit // page)
    mixed = _call(
        lib.nl_numa_unit_nodes(cp, len(placements), unit_addr, unit, page, out), "ggml_backend_cpu_numa_unit_nodes"
    )
    return mixed == 1, list(out)


def not_local() -> list[tuple[str, str]]:
    """(name, buffer type) of each weight that no node-local kernel multiplies (AMX, KleidiAI): never placed."""
    bind()
    out: list[tuple[str, str]] = []
    name, buft = ffi.new("const char **"), ffi.new("const char **")
    while _call(lib.nl_numa_not_local(len(out), name, buft), "ggml_backend_cpu_numa_not_local") == 1:
        out.append((ffi.string(name[0]).decode(), ffi.string(buft[0]).decode()))
    return out


def stats() -> dict[str, int]:
    """Page counts of every placement so far (in_place + moved + failed + boundary == pages)."""
    bind()
    st = ffi.new("struct ggml_backend_cpu_numa_stats *")
    _call(lib.nl_numa_stats(st), "ggml_backend_cpu_numa_stats")
    return {name: getattr(st, name) for name in _STAT_FIELDS}


@dataclass(frozen=True)
class BarrierWait:
    """Time one compute thread (by index) spent in the node-aware barrier, over every graph so far."""

    thread: int
    waits: int
    wait_ns: int


def barrier_stats(n_threads: int, reset: bool = False) -> list[BarrierWait]:
    """Per thread index: barriers passed and nanoseconds waited in the node-aware barrier.

    All zero where the stock barrier runs (one node, or another strategy).
    """
    bind()
    out = ffi.new("struct ggml_backend_cpu_numa_barrier_stats[]", n_threads)
    _call(lib.nl_numa_barrier_stats(n_threads, out, reset), "ggml_backend_cpu_numa_barrier_stats")
    return [BarrierWait(i, out[i].waits, out[i].wait_ns) for i in range(n_threads)]


def placements() -> list[Placement]:
    bind()
    out: list[Placement] = []
    p = ffi.new("struct ggml_backend_cpu_numa_placement *")
    while _call(lib.nl_numa_placement(len(out), p), "ggml_backend_cpu_numa_placement") == 1:
        out.append(
            Placement(
                ffi.string(p.name).decode(),
                int(ffi.cast("uintptr_t", p.data)),
                p.nbytes,
                p.row_bytes,
                p.matrix_bytes,
                p.n_rows,
                p.n_matrices,
                p.page_bytes,
                _split(p.split),
            )
        )
    return out


def slab_locality() -> dict[int, float]:
    """Per node: the fraction of the bytes of its slabs (all placed weights) that the kernel reports on it.

    Where the kernels follow the split plan (each node's threads multiply only
    its slab's rows), this is the fraction of matmul weight bytes that node's
    threads read from their own node. Pages are asked of the kernel, not taken
    from the series' counts.
    """
    base_page = kernel.page_size()
    local: dict[int, int] = {}
    total: dict[int, int] = {}
    for p in placements():
        for e in range(p.n_matrices):
            base = p.data + e * p.matrix_bytes
            for s in p.slabs:
                spans = list(page_spans(base + s.row_begin * p.row_bytes, base + s.row_end * p.row_bytes, base_page))
                for (_, nbytes), node in zip(spans, page_nodes([a for a, _ in spans]), strict=True):
                    total[s.node] = total.get(s.node, 0) + nbytes
                    if node == s.node:
                        local[s.node] = local.get(s.node, 0) + nbytes
    return {node: local.get(node, 0) / total[node] for node in sorted(total)}


def type_name(type_id: int) -> str:
    bind()
    return ffi.string(lib.nl_type_name(type_id)).decode()


def row_bytes(type_id: int, ne0: int) -> int:
    bind()
    return int(lib.nl_row_bytes(type_id, ne0))


def type_block(type_id: int) -> int:
    bind()
    return int(lib.nl_type_block(type_id))


class Weight:
    """A weight tensor in a CPU buffer marked WEIGHTS, multiplied by the CPU backend (the harness in ``_native``).

    Under ``--numa migrate`` on several nodes, the first product with a thread
    count places it, as a model's weights are placed; ``free()`` returns the
    memory, which the next weight may reuse.
    """

    def __init__(
        self, name: str, type_id: int, ne0: int, ne1: int, ne2: int = 1, buffer_type: str | None = None
    ) -> None:
        """``buffer_type``: a host buffer of that name with the CPU buffer's functions, standing in for an extra
        buffer (AMX, KleidiAI) whose kernels do not follow the split plan; None: the CPU buffer, as a model's."""
        bind()
        err = ffi.new("char[]", 256)
        buft = ffi.NULL if buffer_type is None else buffer_type.encode()
        self._w = lib.nl_weight_new(name.encode(), type_id, ne0, ne1, ne2, buft, err, 256)
        if self._w == ffi.NULL:
            raise MemoryError(ffi.string(err).decode())
        self.name, self.type_id, self.shape = name, type_id, (ne0, ne1, ne2)

    def _live(self):
        if self._w is None:
            raise ValueError(f"weight {self.name} was freed")
        return self._w

    @property
    def data(self) -> int:
        return int(lib.nl_weight_data(self._live()))

    @property
    def nbytes(self) -> int:
        return int(lib.nl_weight_nbytes(self._live()))

    @property
    def row_bytes(self) -> int:
        return int(lib.nl_weight_row_bytes(self._live()))

    @property
    def matrix_bytes(self) -> int:
        return int(lib.nl_weight_matrix_bytes(self._live()))

    def set(self, data: bytes) -> None:
        if lib.nl_weight_set(self._live(), data, len(data)) != 0:
            raise ValueError(f"{self.name}: {len(data)} bytes given, the tensor has {self.nbytes}")

    def mul(self, x: bytes, n_cols: int, n_threads: int) -> bytes:
        """w @ x, x being n_cols f32 columns per matrix (bytes in, f32 bytes out)."""
        ne0, ne1, ne2 = self.shape
        if len(x) != 4 * ne0 * n_cols * ne2:
            raise ValueError(f"{self.name}: x has {len(x)} bytes, {4 * ne0 * n_cols * ne2} expected")
        out = ffi.new("float[]", ne1 * n_cols * ne2)
        err = ffi.new("char[]", 256)
        if lib.nl_weight_mul(self._live(), n_threads, n_cols, ffi.from_buffer("float[]", x), out, err, 256) != 0:
            raise RuntimeError(f"{self.name}: {ffi.string(err).decode()}")
        return bytes(ffi.buffer(out))

    def free(self) -> None:
        if self._w is not None:
            lib.nl_weight_free(self._w)
            self._w = None

    def __del__(self) -> None:
        self.free()
