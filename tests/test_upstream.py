"""build/upstream.py: the pin in one place, the fetch verified, idempotent, and clear offline."""

from __future__ import annotations

import dataclasses
import tarfile
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
    monkeypatch.setenv("PIP_RETRIES", "1")  # with none, pip does not say why the index failed
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    pin = dataclasses.replace(Pin.load())
    with pytest.raises(FetchError) as e:
        upstream.fetch(tmp_path / "vendor", pin)
    assert "could not fetch llama-cpp-python==0.3.36" in str(e.value)
    assert str(tmp_path / "cache") in str(e.value)
    # the cause, not pip's last line ("No matching distribution found")
    assert "the package index could not be reached" in str(e.value), str(e.value)
    assert "\n" not in str(e.value), "one line"


def test_pip_failure_names_the_cause_not_the_last_line() -> None:
    offline = (
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(\"...: Failed to "
        "establish a new connection: [Errno 111] Connection refused\")': /simple/llama-cpp-python/\n"
        "ERROR: Could not find a version that satisfies the requirement llama-cpp-python==0.3.36\n"
        "ERROR: No matching distribution found for llama-cpp-python==0.3.36\n"
    )
    assert upstream.pip_failure(offline).startswith("the package index could not be reached (NewConnectionError)")
    gone = (
        "Looking in indexes: x\nERROR: Could not find a version that satisfies llama-cpp-python==0.3.36\n"
        "ERROR: No matching distribution found"
    )
    assert upstream.pip_failure(gone) == "ERROR: Could not find a version that satisfies llama-cpp-python==0.3.36"
    assert upstream.pip_failure("Collecting x\nerror: subprocess-exited-with-error") == (
        "error: subprocess-exited-with-error"
    )
    assert upstream.pip_failure("") == "(pip printed nothing)"


def test_index_sdist_is_hash_checked_before_any_of_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index that serves another llama_cpp_python-0.3.36.tar.gz: pip refuses it before its build backend runs.

    The impostor's backend writes a marker when imported, as pip's metadata step would import it; fetched without
    the pin's hash (--require-hashes), the marker appears (tested below with check=False).
    """
    pin = Pin.load()
    src = tmp_path / "src" / "llama_cpp_python-0.3.36"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    )
    (src / "backend.py").write_text('import os\nopen(os.environ["IMPOSTOR_MARKER"], "w").write("ran")\n')
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n")
    links = tmp_path / "links"
    links.mkdir()
    with tarfile.open(links / pin.sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    marker = tmp_path / "RAN"
    for k, v in {
        "NUMA_LLAMA_CACHE": str(tmp_path / "cache"),
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(links),  # pip's own index options: what it fetches from is the user's to say
        "IMPOSTOR_MARKER": str(marker),
    }.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FetchError) as e:
        upstream.fetch(tmp_path / "vendor", pin)
    assert "does not have the sha256" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists(), "pip ran the impostor's build backend before checking its hash"
    assert not (tmp_path / "vendor").exists() and not list((tmp_path / "cache").glob("*.tar.gz"))
    # the control: the same index without the pin's hash, and pip does run it (so the marker can tell)
    with pytest.raises(FetchError):
        upstream.download(pin, tmp_path / "cache2", check=False)
    assert marker.exists()
