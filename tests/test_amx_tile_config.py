"""Patch 0001: the config ggml's AMX kernels give ldtilecfg holds its tiles' rows and columns, as compiled.

No AMX machine is needed: what faulted was the compiler's output. GCC's _tile_loadconfig() declares an 8-byte
memory operand, so with the config on the stack the stores of rows[] and colsb[] were dead and dropped, and
ldtilecfg configured no tile (SIGILL at the first tilezero). This compiles the patched tree's amx/mmq.cpp with
the sapphirerapids variant's flags and this machine's compiler (through ccache), and reads the bytes ldtilecfg
loads from the object's relocations and sections.
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


def _section_bytes(obj: Path, section: str) -> bytes:
    """A section's contents, from objdump's hex dump."""
    dump = subprocess.run(["objdump", "-s", "-j", section, str(obj)], capture_output=True, text=True, check=True)
    out = bytearray()
    for line in dump.stdout.splitlines():
        m = re.match(r"^ ([0-9a-f]{4,}) ((?:[0-9a-f]{2,8} ){1,4})", line + " ")
        if m:
            assert int(m.group(1), 16) == len(out), line
            out += bytes.fromhex("".join(m.group(2).split()))
    return bytes(out)


def _symbols(obj: Path) -> dict[str, tuple[str, int]]:
    """name -> (section, offset) of the object's defined symbols."""
    table = subprocess.run(["objdump", "-t", str(obj)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in table.splitlines():
        m = re.match(r"^([0-9a-f]{16}) .{7} (\S+)\s+[0-9a-f]+\s+(\S+)$", line)
        if m and m.group(2) != "*UND*":
            syms[m.group(3)] = (m.group(2), int(m.group(1), 16))
    return syms


def ldtilecfg_configs(obj: Path) -> list[tuple[str, bytes | None]]:
    """Each ldtilecfg in the object: its operand, and the 64 bytes it loads when that is static storage.

    A RIP-relative operand carries a PC32 relocation whose addend is the target's offset minus 4 (the
    displacement is the instruction's last 4 bytes); a stack operand has none, and no bytes to read.
    """
    dis = subprocess.run(["objdump", "-dr", "--no-show-raw-insn", str(obj)], capture_output=True, text=True)
    assert dis.returncode == 0, dis.stderr[-2000:]
    lines = dis.stdout.splitlines()
    syms = _symbols(obj)
    found: list[tuple[str, bytes | None]] = []
    for i, line in enumerate(lines):
        m = re.search(r"\sldtilecfg\s+(\S+)", line)
        if not m:
            continue
        operand = m.group(1)
        rel = re.search(r"R_X86_64_PC32\s+(\S+?)([+-]0x[0-9a-f]+)?$", lines[i + 1]) if i + 1 < len(lines) else None
        if "(%rip)" not in operand or rel is None:
            found.append((operand, None))
            continue
        target, addend = rel.group(1), int(rel.group(2) or "0", 16) + 4
        section, base = syms.get(target, (target, 0))
        data = _section_bytes(obj, section)
        assert len(data) >= base + addend + 64, f"ldtilecfg's target {target}{addend:+#x} is not in {obj.name}"
        found.append((f"{target}{addend:+#x} in {section}", data[base + addend : base + addend + 64]))
    return found


def test_ldtilecfg_loads_a_config_with_every_tile(tmp_path: Path) -> None:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH")
    spr = next(v for v in native.x86_variants(ROOT / "vendor" / "llama.cpp") if v.name == "sapphirerapids")
    flags = [f for feat in spr.features for f in native.FEATURE_FLAGS[feat]]
    # an object, not assembly: ccache keeps objects (paths relative to the checkout, so a fresh clone hits too)
    out = tmp_path / "mmq.o"  # ccache does not hash the output's name
    ggml = GGML.relative_to(ROOT)
    cmd = [*(["ccache"] if shutil.which("ccache") else []), cxx, "-std=c++17", "-O3", "-DNDEBUG", *flags]
    cmd += [f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", f"-I{ggml / 'src' / 'ggml-cpu'}"]
    cmd += ["-c", "-o", str(out), str(ggml / "src" / "ggml-cpu" / "amx" / "mmq.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = ldtilecfg_configs(out)
    assert configs, "mmq.cpp compiled with AMX flags has no ldtilecfg: were its kernels compiled?"
    for where, cfg in configs:
        # a stack slot (0xc0(%rsp)) is what the unpatched tree gave: the compiler decides what it holds
        assert cfg is not None, f"ldtilecfg reads {where}, not static storage"
        assert cfg[0] == 1, f"palette {cfg[0]} at {where}"
        colsb = list(struct.unpack_from("<8H", cfg, 16))
        rows = list(cfg[48:56])
        assert (rows, colsb) == (EXPECT_ROWS, EXPECT_COLSB), (where, rows, colsb)
