"""A small RGB canvas written as PNG with the standard library (zlib), for the CLI's pictures.

No plotting library: ``numa-llama plan --png`` and ``verify --png`` draw
rectangles of a few colours, which is all a page map or a bar chart needs.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# one colour per node (node id modulo the palette), and the colours of pages with no node
NODE_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
]
BOUNDARY = (200, 200, 200)  # a page the plan gives to no node (it straddles two slabs)
MISSING = (40, 40, 40)  # a page the kernel has no node for (not present)
BACKGROUND = (255, 255, 255)


def node_colour(node: int) -> tuple[int, int, int]:
    return NODE_COLOURS[node % len(NODE_COLOURS)] if node >= 0 else MISSING


class Canvas:
    def __init__(self, width: int, height: int, background: tuple[int, int, int] = BACKGROUND) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"canvas {width}x{height}")
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(background) * width) for _ in range(height)]

    def rect(self, x: int, y: int, w: int, h: int, colour: tuple[int, int, int]) -> None:
        x0, x1 = max(0, x), min(self.width, x + w)
        if x1 <= x0:
            return
        fill = bytes(colour) * (x1 - x0)
        for row in self.rows[max(0, y) : min(self.height, y + h)]:
            row[3 * x0 : 3 * x1] = fill

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        r, g, b = self.rows[y][3 * x : 3 * x + 3]
        return r, g, b

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)  # filter 0 (none) per scanline
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.png())


def read_png(data: bytes) -> Canvas:
    """Read back what Canvas.png writes (8-bit RGB, filter 0): for tests."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    canvas = Canvas(width, height)
    stride = 1 + 3 * width
    for y in range(height):
        canvas.rows[y] = bytearray(raw[y * stride + 1 : (y + 1) * stride])
    return canvas
