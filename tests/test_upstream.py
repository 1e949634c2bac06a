"""build/upstream.py: the pin in one place, the fetch verified, idempotent, and clear offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import upstream
from upstream import FetchError, Pin

ROOT = Path(__file__).resolve().parent.parent


def test_pin() -> None:
    pin = Pin.load()
    assert pin.version == "0.3.36"
    assert pin.sha256 == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
    assert pin.llama_cpp_commit == "0c1e57098"


def test_fetch_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    assert upstream.fetch(ROOT / "vendor") is False
    assert "nothing to do" in capsys.readouterr().out


def test_hash_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin = Pin.load()
    monkeypatch.setenv("NUMA_LLAMA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / pin.sdist).write_bytes(b"not the sdist")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        upstream.fetch(tmp_path / "vendor", pin)
    assert not (tmp_path / "vendor" / "llama.cpp").exists()
    assert (tmp_path / "cache" / (pin.sdist + ".rejected")).exists()


def test_offline_fails_with_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and nothing cached: one FetchError that says what to do."""
    monkeypatch.setenv("NUMA_LLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    pin = dataclasses.replace(Pin.load())
    with pytest.raises(FetchError) as e:
        upstream.fetch(tmp_path / "vendor", pin)
    assert "could not fetch llama-cpp-python==0.3.36" in str(e.value)
    assert str(tmp_path / "cache") in str(e.value)
