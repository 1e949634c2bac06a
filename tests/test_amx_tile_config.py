"""Patch 0012: the config ggml's AMX kernels give ldtilecfg holds its tiles' rows and columns, as compiled.

No AMX machine is needed: what faulted was the compiler's output. GCC's _tile_loadconfig() declares an 8-byte
memory operand, so with the config on the stack the stores of rows[] and colsb[] were dead and dropped, and
ldtilecfg configured no tile (SIGILL at the first tilezero). This compiles the patched tree's amx/mmq.cpp with
the sapphirerapids variant's flags and this machine's compiler, and reads the bytes ldtilecfg loads.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import compile as native
import pytest
from conftest import ROOT

GGML = ROOT / "vendor" / "llama.cpp" / "ggml"
EXPECT_ROWS = [8, 8, 16, 16, 16, 16, 16, 16]
EXPECT_COLSB = [64, 64, 32, 32, 64, 64, 64, 64]


def _data_at(asm: str, label: str) -> bytes:
    """The bytes an assembler would emit after ``label:``, from GCC's data directives."""
    start = asm.index(f"\n{label}:\n") + len(label) + 3
    out = bytearray()
    for line in asm[start:].splitlines():
        m = re.match(r"\s*\.(byte|value|long|quad|zero|string)\s*(.*)$", line)
        if not m:
            if line.strip().startswith(".") or not line.strip():
                continue
            break
        kind, arg = m.groups()
        if kind == "zero":
            out += bytes(int(arg))
        elif kind == "string":
            out += arg.strip().strip('"').encode() + b"\0"
        else:
            fmt = {"byte": "<B", "value": "<H", "long": "<I", "quad": "<Q"}[kind]
            out += struct.pack(fmt, int(arg, 0))
        if len(out) >= 64:
            break
    return bytes(out[:64])


def test_ldtilecfg_loads_a_config_with_every_tile(tmp_path: Path) -> None:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH")
    spr = next(v for v in native.x86_variants(ROOT / "vendor" / "llama.cpp") if v.name == "sapphirerapids")
    flags = [f for feat in spr.features for f in native.FEATURE_FLAGS[feat]]
    out = tmp_path / "mmq.s"
    cmd = [cxx, "-std=c++17", "-O3", "-DNDEBUG", *flags, f"-I{GGML / 'include'}", f"-I{GGML / 'src'}"]
    cmd += [f"-I{GGML / 'src' / 'ggml-cpu'}", "-S", "-o", str(out), str(GGML / "src" / "ggml-cpu" / "amx" / "mmq.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    asm = out.read_text()
    operands = re.findall(r"^\s*ldtilecfg\s+(\S+)\s*$", asm, re.M)
    assert operands, "mmq.cpp compiled with AMX flags has no ldtilecfg: were its kernels compiled?"
    for op in operands:
        m = re.fullmatch(r"(\S+)\(%rip\)", op)
        # a stack slot (192(%rsp)) is what the unpatched tree gave: the compiler decides what it holds
        assert m, f"ldtilecfg reads {op}, not static storage"
        cfg = _data_at(asm, m.group(1))
        assert cfg[0] == 1, f"palette {cfg[0]}"
        colsb = list(struct.unpack_from("<8H", cfg, 16))
        rows = list(cfg[48:56])
        assert (rows, colsb) == (EXPECT_ROWS, EXPECT_COLSB), (rows, colsb)
