"""numa-llama: llama.cpp on multi-socket CPU servers.

This distribution provides ``llama_cpp`` built with the GGML_CPU_NUMA patch
series, so applications keep writing ``Llama(model, numa="migrate")``, and
``numa_llama`` to ask what that build is and did.

Importing ``numa_llama`` checks that the ``llama_cpp`` Python loads is that
build; a stock llama-cpp-python (or a stock library through
``LLAMA_CPP_LIB_PATH``) raises :class:`StockLlamaCppError` saying how to fix it.
"""

from __future__ import annotations

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

require_patched_llama_cpp()

from numa_llama.api import locality, placement, stats, topology  # noqa: E402
