"""build/bump.py: moving the series to another llama-cpp-python release."""

from __future__ import annotations

import shutil
from pathlib import Path

import bump
import sync
from upstream import PIN_FILE, Pin, cache_dir


def test_the_sdist_names_its_llama_cpp_commit() -> None:
    pin = Pin.load()
    sdist = cache_dir() / pin.sdist
    assert sdist.exists(), "bootstrap fetches the pinned sdist into the cache"
    assert bump.llama_cpp_commit(sdist)[0] == pin.llama_cpp_commit


def test_write_pin_changes_only_the_pinned_values(tmp_path: Path) -> None:
    copy = tmp_path / "pin.toml"
    shutil.copy(PIN_FILE, copy)
    new = Pin("9.9.9", "llama_cpp_python-9.9.9.tar.gz", "ab" * 32, "123456789", "2030-01-01")
    bump.write_pin(new, copy)
    assert Pin.load(copy) == new
    assert [line for line in copy.read_text().splitlines() if line.startswith("#")] == [
        line for line in PIN_FILE.read_text().splitlines() if line.startswith("#")
    ]


def test_bump_to_the_pinned_release_moves_every_patch_unchanged(tmp_path: Path, capsys) -> None:
    """The whole path (fetch, unpack, git am -3, export, check, compare) on the one release that must not move."""
    pin = Pin.load()
    assert bump.main(["--to", pin.version, "--scratch", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"llama.cpp {pin.llama_cpp_commit}" in out
    n = len(sync.all_series()[0].listed())
    assert f"llama.cpp: all {n} patch(es) apply" in out and out.count("none changed") == 2
    assert Pin.load() == pin  # without --apply nothing here changes
