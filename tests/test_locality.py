"""The decode-locality model's pure parts: who multiplies which rows, and how bytes fall on pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from numa_llama import decode, hooks

SLABS = [hooks.Slab(0, 0, 320), hooks.Slab(1, 320, 640)]


def test_migrate_threads_share_their_nodes_slab() -> None:
    rows = decode.thread_rows("migrate", 640, 4, [0, 0, 1, 1], SLABS)
    assert rows == [(0, 160), (160, 320), (320, 480), (480, 640)]
    assert decode.node_ranks([0, 0, 1, 1, 1]) == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]


def test_distribute_threads_take_equal_chunks_in_order() -> None:
    assert decode.thread_rows("distribute", 10, 4, [0, 1, 0, 1], None) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_unmodelled_strategy_and_missing_plan_are_refused() -> None:
    with pytest.raises(ValueError, match="isolate"):
        decode.thread_rows("isolate", 10, 2, [0, 0], None)
    with pytest.raises(ValueError, match="placed"):
        decode.thread_rows("migrate", 10, 2, [0, 1], None)


def test_page_spans_cover_the_range_once() -> None:
    spans = list(hooks.page_spans(100, 9000, 4096))
    assert spans == [(0, 3996), (4096, 4096), (8192, 808)]
    assert sum(n for _, n in spans) == 9000 - 100


@pytest.mark.model
def test_mapped_weights_come_from_the_gguf_and_the_mapping(model_path: Path) -> None:
    path = str(model_path.resolve())
    maps = f"7f0000000000-7f0010000000 r--p 00000000 08:01 1234 {path}\n"
    weights = decode.mapped_weights(model_path, maps)
    assert len(weights) == 127  # gemma-3-270m multiplies by 127 weights (token_embd is its tied output)
    assert all(w.address >= 0x7F0000000000 and w.n_rows > 0 and w.row_bytes > 0 for w in weights)
    with pytest.raises(LookupError, match="use_mmap"):
        decode.mapped_weights(model_path, "")


def test_resident_locality_counts_only_the_pages_the_kernel_answered_for() -> None:
    """Half a weight's pages touched, half never: the untouched ones are not resident (the kernel gives no node),
    so overall locality is one half and the resident locality is whole. A count that took unanswered pages as
    answered (or as local) would give 1.0 and 1.0, or 0.5 and 0.5."""
    import mmap

    from numa_llama import kernel

    page = kernel.page_size()
    node = kernel.getcpu()[1]
    with mmap.mmap(-1, 8 * page) as m:
        ref = kernel.ffi.from_buffer(m)
        base = int(kernel.ffi.cast("uintptr_t", ref))
        for off in range(0, 4 * page, page):
            m[off] = 1  # the first four pages faulted in; the last four never touched
        w = decode.Weight("half.weight", base, 8, page, 1)
        loc = decode.weights_locality("distribute", (node,), [(w, None)])
        del ref
    assert loc.read_bytes == (8 * page,) and loc.answered_bytes == (4 * page,)
    assert loc.overall == 0.5
    assert loc.resident == 1.0
