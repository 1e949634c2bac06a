"""Fetch, verify and unpack the pinned upstream (``build/pin.toml``).

The llama-cpp-python sdist carries both halves of what numa-llama patches:
its ``vendor/llama.cpp`` (the llama.cpp tree) and the ``llama_cpp`` Python
bindings. They are unpacked side by side under ``vendor/``::

    vendor/llama.cpp/            the llama.cpp tree    <- patches/llama.cpp
    vendor/llama-cpp-python/     the bindings          <- patches/llama-cpp-python
        vendor/llama.cpp -> ../../llama.cpp   (so the bindings' CMake project
                                               builds the patched tree)

Nothing here is committed; ``vendor/`` is ignored by git.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "build" / "pin.toml"
STAMP_NAME = ".numa-llama-fetched.json"


class FetchError(RuntimeError):
    """The pinned upstream could not be fetched or did not verify."""


@dataclass(frozen=True)
class Pin:
    version: str
    sdist: str
    sha256: str
    llama_cpp_commit: str
    llama_cpp_date: str

    @classmethod
    def load(cls, path: Path = PIN_FILE) -> Pin:
        data = tomllib.loads(path.read_text())
        lcp, lc = data["llama-cpp-python"], data["llama.cpp"]
        return cls(lcp["version"], lcp["sdist"], lcp["sha256"], lc["commit"], lc["date"])

    def as_dict(self) -> dict[str, str]:
        return {
            "llama_cpp_python": self.version,
            "sdist_sha256": self.sha256,
            "llama_cpp_commit": self.llama_cpp_commit,
            "llama_cpp_date": self.llama_cpp_date,
        }


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("NUMA_LLAMA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "numa-llama"


def verify(sdist: Path, pin: Pin) -> None:
    """Refuse an sdist whose sha256 is not the pinned one (it is moved aside, not used)."""
    got = sha256_of(sdist)
    if got != pin.sha256:
        bad = sdist.with_name(sdist.name + ".rejected")
        sdist.replace(bad)
        raise FetchError(
            f"{sdist.name}: sha256 mismatch: expected {pin.sha256} (build/pin.toml), got {got}. "
            f"Refusing to use it; moved it to {bad}. Run again to download it afresh."
        )


def _pip() -> list[str]:
    """This interpreter's pip; inside pip's isolated build environment, the pip on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    if not found:
        raise FetchError("cannot fetch the pinned sdist: no pip (run `python build/sync.py fetch` first)")
    return [found]


NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "timed out",
    "ProxyError",
    "SSLError",
)


def pip_failure(output: str) -> str:
    """The line of pip's output that says why it failed.

    pip's last ERROR line after an index it could not reach is "No matching distribution found", which hides
    the cause: a network failure (in its retry warnings) is named first, then pip's first ERROR line.
    """
    said = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in said:
        sign = next((s for s in NETWORK_SIGNS if s in ln), None)
        if sign is not None:
            return f"the package index could not be reached ({sign}): {ln[:300]}"
    errors = [ln for ln in said if ln.startswith("ERROR:")]
    if errors:
        return errors[0][:300]
    return said[-1][:300] if said else "(pip printed nothing)"


def download(pin: Pin, dest: Path, log=print, check: bool = True) -> Path:
    """Return the verified sdist in ``dest``, downloading it with pip if needed.

    ``check=False`` (a release not pinned yet, whose hash is what the caller wants to learn) trusts pip's own
    check of the index's hash instead of the pin's.
    """
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / pin.sdist
    if sdist.exists():
        if check:
            verify(sdist, pin)
        return sdist
    log(f"fetching llama-cpp-python=={pin.version} (sdist) with pip ...")
    # pip itself fetches it, so its configuration applies (pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS, proxies).
    # --require-hashes: pip checks the archive against the pin before it unpacks or prepares any of it.
    # --no-binary for this one package only: its build requirements may come as wheels, which keeps pip's
    # metadata step to seconds.
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "upstream.txt"
        pinned = f"llama-cpp-python=={pin.version}"
        req.write_text(f"{pinned} --hash=sha256:{pin.sha256}\n" if check else f"{pinned}\n")
        cmd = [
            *_pip(),
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-binary",
            "llama-cpp-python",
            *(["--require-hashes"] if check else []),
            "-r",
            str(req),
            "-d",
            str(dest),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "DO NOT MATCH THE HASHES" in proc.stdout + proc.stderr:
        raise FetchError(
            f"the package index's {pin.sdist} does not have the sha256 build/pin.toml names ({pin.sha256}): "
            "pip refused it before unpacking anything (--require-hashes)"
        )
    if proc.returncode != 0 or not sdist.exists():
        tail = pip_failure(proc.stdout + proc.stderr)
        raise FetchError(
            f"could not fetch llama-cpp-python=={pin.version} (sdist) from the package index, and {dest} does "
            f"not hold {pin.sdist}: put it there (or set NUMA_LLAMA_CACHE), or let pip reach an index "
            f"(PIP_INDEX_URL, pip.conf). pip said: {tail}"
        )
    if check:
        verify(sdist, pin)
    return sdist


def _stamp(vendor: Path) -> dict | None:
    try:
        return json.loads((vendor / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_fetched(vendor: Path, pin: Pin) -> bool:
    stamp = _stamp(vendor)
    return (
        stamp is not None
        and stamp.get("sha256") == pin.sha256
        and (vendor / "llama.cpp" / "CMakeLists.txt").exists()
        and (vendor / "llama-cpp-python" / "llama_cpp" / "llama.py").exists()
    )


def fetch(vendor: Path = ROOT / "vendor", pin: Pin | None = None, log=print) -> bool:
    """Make ``vendor/`` hold the pinned trees. Returns False if nothing was to do."""
    pin = pin or Pin.load()
    if is_fetched(vendor, pin):
        log(f"vendor/ already holds llama-cpp-python {pin.version} (llama.cpp {pin.llama_cpp_commit}): nothing to do")
        return False
    sdist = download(pin, cache_dir(), log=log)
    log(f"verified {sdist.name} sha256 {pin.sha256[:16]}...; unpacking into {vendor}")
    vendor.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vendor) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (top,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        # The sdist ships a stray .git directory and the submodule's '.git'
        # gitlink; neither is part of the tree, and build/ makes its own
        # repositories of these trees.
        for stray in (top / ".git", top / "vendor" / "llama.cpp" / ".git"):
            if stray.is_dir():
                shutil.rmtree(stray)
            elif stray.exists():
                stray.unlink()
        for name in ("llama.cpp", "llama-cpp-python"):
            if (vendor / name).exists():
                shutil.rmtree(vendor / name)
        (top / "vendor" / "llama.cpp").rename(vendor / "llama.cpp")
        top.rename(vendor / "llama-cpp-python")
    (vendor / "llama-cpp-python" / "vendor" / "llama.cpp").symlink_to(Path("..") / ".." / "llama.cpp")
    (vendor / STAMP_NAME).write_text(json.dumps({"sha256": pin.sha256, **pin.as_dict()}, indent=2) + "\n")
    return True
