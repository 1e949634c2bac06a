"""A real ggml CPU variant library whose matrix product faults: a copy of a built one with ``ud2`` written over
the first instruction of one of its functions (the ELF symbol table says where it is).

Not a stub: everything else in the library is the compiled ggml CPU backend, so it loads, registers, scores and
runs every other operation; only a product that reaches that function raises SIGILL, as the AMX kernels did.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

UD2 = b"\x0f\x0b"


def symbol_address(lib: Path, symbol: str) -> int:
    out = subprocess.run(["nm", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == symbol and parts[1] in "tT":
            return int(parts[0], 16)
    raise LookupError(f"{lib} defines no function {symbol}")


def file_offset(lib: Path, vaddr: int) -> int:
    """The file offset of a virtual address, from the ELF64 program headers (PT_LOAD)."""
    data = lib.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{lib} is not a little-endian ELF64 file")
    e_phoff, e_phentsize, e_phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 1 and p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise LookupError(f"{vaddr:#x} is in no loaded segment of {lib}")


def make_faulty(lib: Path, dest: Path, symbol: str) -> Path:
    """Copy ``lib`` to ``dest`` with ``ud2`` at the entry of ``symbol``; returns ``dest``."""
    shutil.copy2(lib, dest)
    off = file_offset(dest, symbol_address(dest, symbol))
    with dest.open("r+b") as f:
        f.seek(off)
        f.write(UD2)
    return dest
