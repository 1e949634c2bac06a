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
