"""Decode locality: of the matmul weight bytes each compute thread reads for one token, the fraction on its own node.

Computed from the kernel's answers (``move_pages`` as a query, one per page)
and from which rows each thread multiplies in a one-token (decode) product on
a multi-node system, for two strategies:

``migrate``
    threads sit on nodes in contiguous blocks (the series' layout hook); each
    node's threads share the rows of its slab (the split plan, read back from
    the placements hook), as ``ggml_backend_cpu_numa_share`` shares them;
``distribute`` (stock)
    thread ``i`` is pinned to node ``i % n_nodes``; with NUMA detected, ggml's
    generic ``mul_mat`` gives thread ``i`` the ``i``-th of ``n_threads`` equal
    row chunks (``ceil(rows / n_threads)`` rows each).

Weights are found without the series' help: the model file's mapping in
``/proc/self/maps`` plus each tensor's offset in the GGUF (``gguf`` package),
so this needs the model mmap'd (llama.cpp's default). It describes the
generic kernels, which are the ones that run in the sse42 test guests; repack
and tiled kernels split rows in other units (node-local under migrate too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from numa_llama import hooks

STRATEGIES = ("distribute", "migrate")


@dataclass(frozen=True)
class Weight:
    name: str
    address: int
    n_rows: int
    row_bytes: int
    n_matrices: int


@dataclass(frozen=True)
class Locality:
    strategy: str
    n_threads: int
    thread_node: tuple[int, ...]
    local_bytes: tuple[int, ...]  # per thread
    read_bytes: tuple[int, ...]  # per thread
    answered_bytes: tuple[int, ...] = ()  # per thread: of read_bytes, those on pages the kernel gave a node for

    @property
    def resident(self) -> float | None:
        """The local fraction of only the bytes on pages the kernel answered for (resident); None: not counted."""
        if not self.answered_bytes:
            return None
        return sum(self.local_bytes) / max(1, sum(self.answered_bytes))

    @property
    def per_thread(self) -> tuple[float, ...]:
        return tuple(loc / read if read else 1.0 for loc, read in zip(self.local_bytes, self.read_bytes, strict=True))

    @property
    def overall(self) -> float:
        return sum(self.local_bytes) / max(1, sum(self.read_bytes))


@dataclass(frozen=True)
class GGUFWeight:
    """A matmul weight as the GGUF file describes it (offset: from the start of the file)."""

    name: str
    type_name: str
    ne0: int
    n_rows: int
    n_matrices: int
    row_bytes: int
    offset: int


# GGUF value types: the byte size of each fixed-size one (8: string, 9: array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_ALIGNMENT = 32  # the format's default, unless general.alignment says otherwise


class GGUFFormatError(ValueError):
    """The file is not a GGUF this reader understands (bad magic, a truncated header, an unknown value type)."""


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_tensor_infos(
    model_path: str | os.PathLike[str], scalars: dict[str, int | float | bool | str | None] | None = None
) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape, ggml type, absolute file offset) of every tensor: the header only, key-value data skipped.

    ``scalars``, if given, receives every key whose value is a number, a bool or a string, and None for an array.

    gguf.GGUFReader builds a numpy view of every field, which for a 262k-token vocabulary takes about 11 s; this
    walks the same header in well under one (little-endian GGUF v2/v3, as llama.cpp writes)."""
    import mmap  # noqa: PLC0415
    import struct  # noqa: PLC0415

    with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str) -> tuple:
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(m):
                raise GGUFFormatError(
                    f"{model_path}: GGUF header truncated (it needs {pos + size} bytes; the file has {len(m)})"
                )
            out = struct.unpack_from(fmt, m, pos)
            pos += size
            return out

        def string() -> str:
            nonlocal pos
            (n,) = take("<Q")
            if pos + n > len(m):
                raise GGUFFormatError(f"{model_path}: GGUF string runs past the end at byte {pos}")
            pos += n
            return bytes(m[pos - n : pos]).decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype in _GGUF_SIZES:
                pos += _GGUF_SIZES[vtype]
            elif vtype == 8:
                (n,) = take("<Q")
                pos += n
            elif vtype == 9:
                etype, count = take("<IQ")
                if etype in _GGUF_SIZES:
                    pos += _GGUF_SIZES[etype] * count
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise GGUFFormatError(f"{model_path}: unknown GGUF value type {vtype} at byte {pos}")

        magic, version = take("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise GGUFFormatError(f"{model_path}: not a little-endian GGUF v2/v3 file (magic {magic!r}, v{version})")
        n_tensors, n_kv = take("<QQ")
        alignment = _GGUF_ALIGNMENT
        for _ in range(n_kv):
            key = string()
            (vtype,) = take("<I")
            if key == "general.alignment" and vtype == 4:
                (alignment,) = take("<I")
                if scalars is not None:
                    scalars[key] = alignment
            elif scalars is not None and vtype in _GGUF_SCALARS:
                (scalars[key],) = take(_GGUF_SCALARS[vtype])
            elif scalars is not None and vtype == 8:
                scalars[key] = string()
            else:
                if scalars is not None:
                    scalars[key] = None
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = take("<I")
            shape = take(f"<{n_dims}Q")
            ttype, offset = take("<IQ")
            infos.append((name, tuple(int(x) for x in shape), int(ttype), int(offset)))
        data = -(-pos // alignment) * alignment
        return [(name, shape, ttype, data + offset) for name, shape, ttype, offset in infos]


def check_gguf(model_path: str | os.PathLike[str]) -> int:
    """Raise :class:`GGUFFormatError` unless the file is a whole GGUF: a header this reader walks, and every
    tensor's data inside the file. Returns the number of tensors. Reads the header only (well under a second)."""
    import gguf  # noqa: PLC0415

    size = os.path.getsize(model_path)
    if size == 0:
        raise GGUFFormatError(f"{model_path}: the file is empty, not a GGUF model")
    tensors = gguf_tensor_infos(model_path)
    for name, shape, ttype, offset in tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{model_path}: tensor {name} has unknown ggml type {ttype}") from None
        n = 1
        for x in shape:
            n *= x
        end = offset + n // block * type_size
        if end > size:
            raise GGUFFormatError(
                f"{model_path}: truncated: tensor {name} ends at byte {end}, the file has {size} "
                "(an interrupted download or copy?)"
            )
    return len(tensors)


def gguf_weights(model_path: str | os.PathLike[str]) -> list[GGUFWeight]:
    """The weights a forward pass multiplies by, read from the GGUF without loading the model."""
    import gguf  # noqa: PLC0415

    tensors = gguf_tensor_infos(model_path)
    names = {name for name, *_ in tensors}
    out: list[GGUFWeight] = []
    for name, shape, ttype, offset in tensors:
        # shape: ne0 (row length), ne1 (rows), ne2 (matrices) ...
        if len(shape) < 2 or not name.endswith(".weight"):
            continue
        # the token embedding is read by get_rows, and multiplied only when the output matrix is tied to it
        if name == "token_embd.weight" and "output.weight" in names:
            continue
        qtype = gguf.GGMLQuantizationType(ttype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_mat = 1
        for x in shape[2:]:
            n_mat *= x
        out.append(GGUFWeight(name, qtype.name, shape[0], shape[1], n_mat, shape[0] // block * type_size, offset))
    return out


def mapped_weights(model_path: str | os.PathLike[str], maps_text: str | None = None) -> list[Weight]:
    """The matmul weights of a GGUF model mmap'd by this process, at their addresses in its mapping."""
    path = os.path.realpath(model_path)
    if maps_text is None:
        maps_text = Path("/proc/self/maps").read_text()
    base = None
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].strip() == path:
            lo = int(fields[0].split("-")[0], 16)
            base = lo - int(fields[2], 16)
            break
    if base is None:
        raise LookupError(f"{path} is not mapped in this process (the model must be loaded with use_mmap=True)")
    return [Weight(w.name, base + w.offset, w.n_rows, w.row_bytes, w.n_matrices) for w in gguf_weights(path)]


def _share(begin: int, end: int, rank: int, n: int) -> tuple[int, int]:
    """ggml_backend_cpu_numa_share with align 1: rank's part of [begin, end) among n threads."""
    units = end - begin
    return begin + units * rank // n, (end if rank == n - 1 else begin + units * (rank + 1) // n)


def node_ranks(thread_node: Sequence[int]) -> list[tuple[int, int]]:
    """Per thread: its rank among the threads of its node, and how many those are."""
    return [(thread_node[:i].count(node), thread_node.count(node)) for i, node in enumerate(thread_node)]


def node_rows(slabs: Sequence[hooks.Slab], with_threads: set[int]) -> dict[int, tuple[int, int]]:
    """The rows each node with threads multiplies, as the series' kernels take them.

    The slabs do not depend on the thread count (a weight is placed once). With fewer threads than nodes, a node
    without threads leaves its slab to the nearest node before it that has threads, or, for the slabs before the
    first such node, to that first node.
    """
    owners = [i for i, s in enumerate(slabs) if s.node in with_threads]
    rows: dict[int, tuple[int, int]] = {}
    for j, i in enumerate(owners):
        begin = 0 if j == 0 else slabs[i].row_begin
        end = slabs[owners[j + 1]].row_begin if j + 1 < len(owners) else slabs[-1].row_end
        rows[slabs[i].node] = (begin, end)
    return rows


def thread_rows(
    strategy: str,
    n_rows: int,
    n_threads: int,
    thread_node: Sequence[int],
    slabs: Sequence[hooks.Slab] | None,
    ranks: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """The rows of one matrix that each thread multiplies in a decode step (``ranks``: ``node_ranks``, if known)."""
    if strategy == "distribute":
        chunk = -(-n_rows // n_threads)
        return [(min(i * chunk, n_rows), min((i + 1) * chunk, n_rows)) for i in range(n_threads)]
    if strategy == "migrate":
        if not slabs:
            raise ValueError("migrate: no split plan for this weight (was it placed?)")
        by_node = node_rows(slabs, set(thread_node))
        return [
            _share(*by_node[node], rank, n)
            for node, (rank, n) in zip(thread_node, ranks or node_ranks(thread_node), strict=True)
        ]
    raise ValueError(f"decode locality is modelled for {STRATEGIES}, not {strategy!r}")


def decode_locality(model_path: str | os.PathLike[str], strategy: str, n_threads: int) -> Locality:
    """Per thread: bytes of the rows it multiplies for one token, and how many of them the kernel has on its node."""
    if strategy not in STRATEGIES:
        raise ValueError(f"decode locality is modelled for {STRATEGIES}, not {strategy!r}")
    nodes = sorted(int(d.name[4:]) for d in Path("/sys/devices/system/node").glob("node[0-9]*"))
    if strategy == "migrate":
        thread_node = tuple(hooks.layout(n_threads))
        plans = {p.data: p.slabs for p in hooks.placements()}
    else:
        thread_node = tuple(nodes[i % len(nodes)] for i in range(n_threads))
        plans = {}
    return weights_locality(strategy, thread_node, [(w, plans.get(w.address)) for w in mapped_weights(model_path)])


def weights_locality(
    strategy: str, thread_node: tuple[int, ...], weights: Sequence[tuple[Weight, Sequence[hooks.Slab] | None]]
) -> Locality:
    """decode_locality's count, for weights (with migrate's split plan of each) found by any means."""
    n_threads = len(thread_node)
    page = os.sysconf("SC_PAGESIZE")
    local = [0] * n_threads
    read = [0] * n_threads
    answered = [0] * n_threads
    ranks = node_ranks(thread_node)  # the same for every weight
    for w, slabs in weights:
        rows = thread_rows(strategy, w.n_rows, n_threads, thread_node, slabs, ranks)
        size = w.n_rows * w.row_bytes * w.n_matrices
        first = w.address // page * page
        pages = list(range(first, w.address + size, page))
        where = hooks.page_nodes(pages)
        for e in range(w.n_matrices):
            base = w.address + e * w.n_rows * w.row_bytes
            for i, (r0, r1) in enumerate(rows):
                for addr, nbytes in hooks.page_spans(base + r0 * w.row_bytes, base + r1 * w.row_bytes, page):
                    read[i] += nbytes
                    node = where[(addr - first) // page]
                    if node >= 0:
                        answered[i] += nbytes
                    if node == thread_node[i]:
                        local[i] += nbytes
    return Locality(strategy, n_threads, thread_node, tuple(local), tuple(read), tuple(answered))
