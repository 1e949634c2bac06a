"""What this build of llama_cpp is: the pin, the patches, the CPU backend it loaded."""

from __future__ import annotations

import ctypes
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

# a hook the series' CPU backend hands out by ggml_backend_reg_get_proc_address (the backend has no feature entry)
HOOK = "ggml_backend_cpu_numa_stats"


class StockLlamaCppError(ImportError):
    """The ``llama_cpp`` that Python loads is not numa-llama's patched build."""


@dataclass(frozen=True)
class BuildInfo:
    """The pinned upstream, the applied patches, and what the running library reports."""

    llama_cpp_python: str
    sdist_sha256: str
    llama_cpp_commit: str
    patches: dict[str, list[str]]
    cpu_variants_built: list[str]
    cpu_backend_loaded: str | None
    cpu_features: dict[str, str]
    cpu_numa_hooks: bool
    library_dir: str
    cmake_args: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _recorded() -> dict[str, Any]:
    """The record setup.py wrote at build time (numa_llama/_build_info.json)."""
    try:
        text = resources.files("numa_llama").joinpath("_build_info.json").read_text()
    except FileNotFoundError:
        raise StockLlamaCppError(
            "numa_llama/_build_info.json is missing: this numa_llama was not installed by numa-llama's "
            "setup.py (run `pip install .` in the numa-llama checkout)"
        ) from None
    return json.loads(text)


def _llama_cpp() -> ModuleType:
    import llama_cpp.llama_cpp as lib  # noqa: PLC0415 (loads the shared library)

    return lib


def system_features(lib: ModuleType | None = None) -> dict[str, dict[str, str]]:
    """Features per registered backend, from the loaded library's ``llama_print_system_info``."""
    lib = lib or _llama_cpp()
    text = lib.llama_print_system_info().decode()
    out: dict[str, dict[str, str]] = {}
    # "CPU : SSE3 = 1 | AVX = 1 | ... | " per backend
    for m in re.finditer(r"(\w[\w ]*?) : ((?:[\w.]+ = [^|]*\| ?)+)", text):
        feats = dict((k.strip(), v.strip()) for k, v in (kv.split("=", 1) for kv in m.group(2).split("|") if "=" in kv))
        out[m.group(1).strip()] = feats
    return out


def cpu_numa_hooks() -> bool:
    """Whether the CPU backend that llama_cpp registered hands out the series' hooks (GGML_CPU_NUMA=ON)."""
    # through libllama, whose libggml holds the registry that llama_cpp filled (a wheel's lib/ has no symlinks, so
    # libggml.so, which llama_cpp._ggml opens, is another copy of it, with an empty registry); a handle of its own
    # has function objects of its own, and llama_cpp's argtypes are left alone
    ggml = ctypes.CDLL(_llama_cpp()._lib._name)
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    reg = ggml.ggml_backend_reg_by_name(b"CPU")
    return bool(reg) and bool(ggml.ggml_backend_reg_get_proc_address(reg, HOOK.encode()))


def _loaded_cpu_backend() -> str | None:
    """The CPU-variant library this process mapped (the kernel's /proc/self/maps, not ours)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = sorted({Path(line.split()[-1]).name for line in maps.splitlines() if "libggml-cpu" in line})
    return ", ".join(found) or None


def require_patched_llama_cpp() -> None:
    """Raise :class:`StockLlamaCppError` unless ``llama_cpp`` is the GGML_CPU_NUMA build."""
    try:
        lib = _llama_cpp()
    except (ImportError, RuntimeError, OSError) as e:
        raise StockLlamaCppError(f"numa_llama cannot load llama_cpp: {e}") from e
    where = Path(lib.__file__ or ".").parent  # a llama_cpp without a file of its own is judged by its library
    libdir = os.environ.get("LLAMA_CPP_LIB_PATH") or str(where / "lib")
    problems = []
    if not hasattr(lib, "GGML_NUMA_STRATEGY_MIGRATE"):
        problems.append(f"its Python bindings ({where}) are stock llama-cpp-python")
    if not cpu_numa_hooks():
        problems.append(f"its library ({libdir}) has no CPU backend built with GGML_CPU_NUMA")
    if problems:
        hint = (
            "unset LLAMA_CPP_LIB_PATH, or point it at numa-llama's llama_cpp/lib"
            if "LLAMA_CPP_LIB_PATH" in os.environ
            else "pip uninstall -y llama-cpp-python numa-llama && pip install <numa-llama checkout>"
        )
        raise StockLlamaCppError(
            "numa_llama needs the llama_cpp built by numa-llama (GGML_CPU_NUMA), but the llama_cpp "
            f"Python loads is not it: {'; '.join(problems)}. Both distributions provide llama_cpp; "
            f"keep only numa-llama. Fix: {hint}"
        )


def build_info() -> BuildInfo:
    """The pin, the patches applied, the CPU variants built, and what the running library reports."""
    require_patched_llama_cpp()
    rec = _recorded()
    lib = _llama_cpp()
    pin = rec["pin"]
    return BuildInfo(
        llama_cpp_python=pin["llama_cpp_python"],
        sdist_sha256=pin["sdist_sha256"],
        llama_cpp_commit=pin["llama_cpp_commit"],
        patches=rec["patches"],
        cpu_variants_built=rec["cpu_variants"],
        cpu_backend_loaded=_loaded_cpu_backend(),
        cpu_features=system_features(lib).get("CPU", {}),
        cpu_numa_hooks=cpu_numa_hooks(),
        library_dir=os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(lib.__file__ or ".").parent / "lib"),
        cmake_args=rec["cmake_args"],
    )
