"""``import llama_cpp`` finds numa-llama's patched bindings, whatever else is installed.

numa-llama and stock llama-cpp-python both provide ``llama_cpp``. Two distributions that install the same files
overwrite each other, and uninstalling either deletes files the other still lists: a stock ``llama_cpp`` that
imports silently, or a half-deleted one. So numa-llama installs no file under ``llama_cpp/``. Its patched
bindings live in ``_numa_llama_bindings/llama_cpp/``, and ``numa_llama.pth`` runs this module (installed as the
top-level ``_numa_llama_finder``) when Python starts, which puts a finder first on ``sys.meta_path``: it answers
``llama_cpp`` with the patched package, and its submodules follow from the package's ``__path__``. A stock
llama-cpp-python installed before or after (an application that requires it, say) stays whole and is shadowed;
uninstalling it leaves numa-llama's intact; uninstalling numa-llama removes the finder with it, and leaves the
stock one as pip installed it. ``python -S`` (no site packages, so no ``.pth``) is the one way around it.

It imports only the standard library, and does nothing but insert the finder: every Python start runs it.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

PACKAGE = "llama_cpp"
HOME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_numa_llama_bindings", PACKAGE)


class PatchedBindingsFinder(importlib.abc.MetaPathFinder):
    """Finds ``llama_cpp`` in numa-llama's own directory, before any other ``llama_cpp`` on sys.path."""

    def __init__(self, home: str = HOME) -> None:
        self.home = home

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE:
            return None
        init = os.path.join(self.home, "__init__.py")
        if not os.path.isfile(init):
            return None  # numa-llama is being uninstalled, or this copy is broken: Python looks further
        return importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[self.home])


def install(home: str = HOME) -> None:
    if not any(isinstance(f, PatchedBindingsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PatchedBindingsFinder(home))


install()
