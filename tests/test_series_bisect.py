"""The bisect check's record of a green run: it skips only what it has already checked, and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import series_bisect


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "numa-llama" / "bisect-green.json"


def test_a_green_record_of_the_same_key_skips_and_says_so(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert series_bisect.record_path() == cache
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"key": series_bisect.record_key(), "prefixes": 11, "when": "then"}))
    assert series_bisect.main([]) == 0
    out = capsys.readouterr().out
    assert "bisect: skipped: nothing it checks has changed since the green run of then on this machine" in out
    assert "[1/" not in out  # no prefix was built


def test_a_record_of_another_key_is_not_a_pass(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stale record runs the check (here stopped at the first prefix, by a failing build)."""
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"key": "0" * 64, "prefixes": 11, "when": "then"}))

    def broken(step: series_bisect.Step, build_root: Path, log) -> None:
        raise series_bisect.native.BuildError("built nothing: the test stands in for the build")

    monkeypatch.setattr(series_bisect, "check_prefix", broken)
    assert series_bisect.main([]) == 1
    assert "skipped" not in capsys.readouterr().out
    assert json.loads(cache.read_text())["key"] == "0" * 64  # a failed run writes no record


def test_the_key_changes_with_a_patch_a_script_or_the_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    shutil.copytree(series_bisect.ROOT / "patches" / "llama.cpp", root / "patches" / "llama.cpp")
    monkeypatch.setattr(series_bisect, "ROOT", root)
    key = series_bisect.record_key()
    assert key == series_bisect.record_key()  # the same inputs, the same key
    patch = sorted((root / "patches" / "llama.cpp").glob("*.patch"))[-1]
    patch.write_text(patch.read_text() + " ")
    changed_patch = series_bisect.record_key()
    assert changed_patch != key
    script = tmp_path / "series_bisect.py"
    script.write_text(series_bisect.KEYED[0].read_text() + "\n# changed\n")
    monkeypatch.setattr(series_bisect, "KEYED", [script, *series_bisect.KEYED[1:]])
    changed_script = series_bisect.record_key()
    assert changed_script != changed_patch
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert series_bisect.record_key() != changed_script
