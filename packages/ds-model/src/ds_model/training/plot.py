"""A loss-curve PNG written with zlib alone (no matplotlib): the training loss as a
blue line, evaluation losses as red dots, on a light grid. The value range is stored
in the PNG's ``tEXt`` chunks (``y_min``, ``y_max``, ``x_max``) since there is no font."""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Sequence

__all__ = ["write_loss_png"]

_BG = (255, 255, 255)
_GRID = (225, 225, 225)
_AXIS = (80, 80, 80)
_TRAIN = (31, 119, 180)
_EVAL = (214, 39, 40)


def write_loss_png(
    path: str | os.PathLike[str],
    train: Sequence[tuple[float, float]],
    evals: Sequence[tuple[float, float]] = (),
    width: int = 640,
    height: int = 360,
) -> None:
    """Write ``(step, loss)`` points as a line plot to ``path`` (atomically)."""
    if width < 32 or height < 32:
        raise ValueError(f"width={width}, height={height}: expected >= 32 each")
    pixels = [bytearray(bytes(_BG) * width) for _ in range(height)]
    points = [(float(x), float(y)) for x, y in (*train, *evals) if y == y]  # drop NaN
    margin = 16
    x_lo, x_hi = 0.0, max([x for x, _ in points], default=1.0) or 1.0
    y_lo, y_hi = min([y for _, y in points], default=0.0), max([y for _, y in points], default=1.0)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = margin + round((x - x_lo) / (x_hi - x_lo) * (width - 2 * margin - 1))
        py = height - margin - 1 - round((y - y_lo) / (y_hi - y_lo) * (height - 2 * margin - 1))
        return px, py

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x : 3 * x + 3] = bytes(color)

    for k in range(1, 5):  # grid lines at quarters
        gy = margin + k * (height - 2 * margin) // 5
        gx = margin + k * (width - 2 * margin) // 5
        for x in range(margin, width - margin):
            put(x, gy, _GRID)
        for y in range(margin, height - margin):
            put(gx, y, _GRID)
    for x in range(margin, width - margin):
        put(x, height - margin - 1, _AXIS)
    for y in range(margin, height - margin):
        put(margin, y, _AXIS)
    line = [to_px(x, y) for x, y in train if y == y]
    for (x0, y0), (x1, y1) in itertools.pairwise(line):
        for x, y in _segment(x0, y0, x1, y1):
            put(x, y, _TRAIN)
            put(x, y + 1, _TRAIN)
    if len(line) == 1:
        put(*line[0], _TRAIN)
    for x, y in evals:
        if y == y:
            cx, cy = to_px(x, y)
            for dx in range(-2, 3):
                for dy in range(-2, 3):
                    put(cx + dx, cy + dy, _EVAL)
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    text = {"y_min": f"{y_lo:.6g}", "y_max": f"{y_hi:.6g}", "x_max": f"{x_hi:.6g}"}
    png = b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )
    for key, value in text.items():
        png += _chunk(b"tEXt", key.encode() + b"\x00" + value.encode())
    png += _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _segment(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """Bresenham's line from (x0, y0) to (x1, y1), both ends included."""
    out = []
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        out.append((x0, y0))
        if x0 == x1 and y0 == y1:
            return out
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy
