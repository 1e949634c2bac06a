"""numa-llama: a drop-in llama_cpp built with the GGML_CPU_NUMA patch series.

``pip install .`` (or ``python setup.py build``):

1. fetches and verifies the pinned llama-cpp-python sdist into ``vendor/``
   (``build/upstream.py``; a no-op when it is there);
2. applies both patch series (``build/series.py``; a no-op when applied);
3. compiles the patched llama.cpp once, through the bindings' own CMake project,
   in the persistent build directory ``_build/cmake`` (``build/compile.py``);
   an unchanged rebuild only asks ninja, which finds nothing to do; then runs
   each CPU variant's own kernels and ships only those that pass
   (``build/package.py``);
4. packages ``llama_cpp`` (the patched bindings) with the libraries in
   ``llama_cpp/lib``, and ``numa_llama``. The bindings are installed as
   ``_numa_llama_bindings/llama_cpp``, not ``llama_cpp/``, and ``numa_llama.pth``
   makes ``import llama_cpp`` find them first (``numa_llama/_finder.py``): so
   numa-llama and a stock llama-cpp-python never own the same file.

Environment: ``CMAKE_ARGS`` (appended to ours, as llama-cpp-python does),
``NUMA_LLAMA_CPU_VARIANTS`` (which ggml CPU variants to build), ``NUMA_LLAMA_BUILD_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "build"))

import compile as native  # noqa: E402
import package  # noqa: E402
import sync  # noqa: E402
from upstream import Pin  # noqa: E402

BINDINGS = "vendor/llama-cpp-python"
HIDDEN = "_numa_llama_bindings"  # where the patched llama_cpp is installed (numa_llama/_finder.py)
FINDER = "_numa_llama_finder"  # numa_llama/_finder.py, installed top-level: numa_llama.pth imports it


def log(msg: str) -> None:
    # pip hides a build's stdout unless -v; stderr reaches the terminal with -v too.
    print(msg, file=sys.stderr, flush=True)


AS_IS = os.environ.get("NUMA_LLAMA_BUILD_VENDOR_AS_IS") == "1"


def prepare() -> None:
    """fetch + apply, at build time only: metadata (``egg_info``, ``pip install --dry-run``) needs neither.

    NUMA_LLAMA_BUILD_VENDOR_AS_IS=1 builds the vendor trees as they are (for
    work in progress on the series); build_info() then lists their commits.
    """
    try:
        if AS_IS:
            sync.fetch(sync.VENDOR, Pin.load(), log=log)
            log("numa-llama: NUMA_LLAMA_BUILD_VENDOR_AS_IS=1: building vendor/ as it is, not the committed series")
            return
        sync.prepare(log=log)
    except Exception as e:  # FetchError, SeriesError: one clear message, no traceback
        log(f"numa-llama: cannot prepare the patched tree: {e}")
        raise SystemExit(1) from None


def prepare_build() -> None:
    """The build tools, then fetch + apply: what build_py and build_ext (``setup.py develop`` runs it alone) need."""
    missing = native.missing_tools()
    if missing:
        log(f"numa-llama: cannot build: {missing}")
        raise SystemExit(1)
    prepare()


class BuildNative(build_py):
    """build_py that first compiles the patched llama.cpp and ships its libraries."""

    def run(self) -> None:
        if getattr(self, "editable_mode", False):
            # an editable wheel leaves out what this command writes into build_lib: the bindings and libraries
            log("numa-llama: cannot build: editable installs are not supported (pip install . instead)")
            raise SystemExit(1)
        prepare_build()
        build_dir = Path(os.environ.get("NUMA_LLAMA_BUILD_DIR", ROOT / "_build" / "cmake"))
        log(f"numa-llama: [1/3] compiling the patched llama.cpp in {build_dir}")
        t0 = time.monotonic()
        try:
            result = package.build(ROOT / BINDINGS, build_dir, log=log)
            log(
                f"numa-llama: [2/3] compiled and verified in {time.monotonic() - t0:.0f} s (verification "
                f"{result.verify_seconds:.1f} s); checking the library loads here"
            )
            lib_stage = build_dir.parent / "lib"
            package.install_libs(result.libs, lib_stage)
            info_line = package.smoke_test(lib_stage)
        except native.BuildError as e:
            log(f"numa-llama: build failed: {e}")
            raise SystemExit(1) from None
        log(f"numa-llama: {info_line}")
        self._write_build_info(result)
        # _build/py persists between builds: a module deleted or renamed in the source must not live on there
        shutil.rmtree(Path(self.build_lib) / "numa_llama", ignore_errors=True)
        super().run()
        log("numa-llama: [3/3] packaging llama_cpp (patched) and numa_llama")
        build_lib = Path(self.build_lib)
        shutil.rmtree(build_lib / "llama_cpp", ignore_errors=True)  # what builds before this one put there
        self._copy_bindings(build_lib / HIDDEN)
        package.install_libs(result.libs, build_lib / HIDDEN / "llama_cpp" / "lib")
        shutil.copy2(ROOT / "numa_llama" / "_finder.py", build_lib / f"{FINDER}.py")
        # One line, exec'd by site.py at every start. Guarded: pip's build isolation processes this directory's
        # .pth files with nothing but it on sys.path (no standard library), where the import cannot succeed.
        guarded = f'import sys; exec("try:\\n import {FINDER}\\nexcept ImportError:\\n pass")\n'
        (build_lib / "numa_llama.pth").write_text(guarded)

    def _copy_bindings(self, dest: Path) -> None:
        """The patched bindings' Python files (vendor/ exists only once prepare() ran, so not a setup() package)."""
        src = ROOT / BINDINGS / "llama_cpp"
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "llama_cpp").mkdir(parents=True)
        # every package under llama_cpp/ (a directory with __init__.py), as upstream's wheel has them
        for init in sorted(src.rglob("__init__.py")):
            sub = init.parent.relative_to(src)
            (dest / "llama_cpp" / sub).mkdir(parents=True, exist_ok=True)
            for f in sorted(init.parent.iterdir()):
                if f.is_file() and (f.suffix == ".py" or f.name == "py.typed"):
                    shutil.copy2(f, dest / "llama_cpp" / sub / f.name)

    def _write_build_info(self, result: package.BuildResult) -> None:
        if AS_IS:
            series = {
                s.patch_dir.name: s.commits() + (["(uncommitted changes)"] if s.dirty() else [])
                for s in sync.all_series()
            }
        else:
            series = {s.patch_dir.name: [p.name for p in s.patches()] for s in sync.all_series()}
        info = {
            "pin": Pin.load().as_dict(),
            "patches": series,
            "cpu_variants": result.variants,
            # what the build machine's own run of each variant's kernels gave (build/cpu_check.c)
            "cpu_variants_verified": {n: {"ok": v.ok, "how": v.how} for n, v in result.verdicts.items()},
            "cmake_args": result.cmake_args,
        }
        (ROOT / "numa_llama" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")


class BuildExt(build_ext):
    """build_ext (the cffi module), and a copy of it beside the sources, as _build_info.json is.

    Then ``numa_llama`` imported from the checkout (``python -m numa_llama``
    run in it puts it first on sys.path) works as the installed one does.
    """

    def run(self) -> None:
        prepare_build()  # a no-op after build_py; needed when build_ext runs alone (its header is in vendor/)
        log("numa-llama: compiling numa_llama._native (cffi, API mode, against the series' ggml-cpu-numa.h)")
        super().run()
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            if not self.inplace and built.exists():
                # a new file renamed over the old one, never the old one rewritten: a process that has the module
                # loaded (a test run that builds a wheel of this checkout) keeps its mapping of the old inode
                dest = ROOT / Path(*ext.name.split(".")[:-1]) / built.name
                tmp = dest.with_name(dest.name + ".tmp")
                shutil.copy2(built, tmp)
                os.replace(tmp, dest)


class BinaryDistribution(Distribution):
    """The wheel carries native libraries: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


(ROOT / "_build").mkdir(exist_ok=True)  # setup.cfg: setuptools' scratch lives here

setup(
    distclass=BinaryDistribution,
    # The patched bindings are packaged by BuildNative (_copy_bindings), not listed here: they exist only after
    # prepare(), and metadata must not fetch or patch anything.
    packages=["numa_llama"],
    package_data={"numa_llama": ["_build_info.json", "py.typed"]},
    cmdclass={"build_py": BuildNative, "build_ext": BuildExt},
    # the kernel oracle and the series' C API (API mode: compiled against the patched ggml-cpu.h)
    cffi_modules=["numa_llama/_native_build.py:ffibuilder"],
)
