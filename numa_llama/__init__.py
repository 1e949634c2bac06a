"""numa-llama: llama.cpp on multi-socket CPU servers.

This distribution provides ``llama_cpp`` built with the GGML_CPU_NUMA patch
series, so applications keep writing ``Llama(model, numa="migrate")``, and
``numa_llama`` to ask what that build is and did.

The first use of what needs that build (:func:`topology`, :func:`placement`,
:func:`locality`, :func:`stats`, :func:`build_info`, every ``numa-llama``
subcommand) checks that the ``llama_cpp`` Python loads is it; a stock
llama-cpp-python (or a stock library through ``LLAMA_CPP_LIB_PATH``) raises
:class:`StockLlamaCppError` saying how to fix it. Importing the package itself
does not load ``llama_cpp``, so ``numa-llama --help`` and ``--version`` work
whatever ``llama_cpp`` is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from numa_llama._build import BuildInfo, StockLlamaCppError, build_info, require_patched_llama_cpp

__all__ = [
    "BuildInfo",
    "StockLlamaCppError",
    "build_info",
    "require_patched_llama_cpp",
    "__version__",
    "topology",
    "placement",
    "locality",
    "stats",
]
__version__ = "0.1.0"

_API = ("topology", "placement", "locality", "stats")


def __getattr__(name: str) -> Any:
    """The API of numa_llama.api, imported (and the llama_cpp it needs checked) on first use."""
    if name in _API:
        require_patched_llama_cpp()
        from numa_llama import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module 'numa_llama' has no attribute {name!r}")


if TYPE_CHECKING:
    from numa_llama.api import locality, placement, stats, topology
