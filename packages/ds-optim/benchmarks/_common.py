"""Shared helpers of the ds-optim benchmarks: machine line, medians, a tiny PNG plotter."""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import struct
import time
import zlib
from collections.abc import Callable, Sequence

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, {gpu}"
    )


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_line_plot_png(
    path: str,
    series: Sequence[tuple[Sequence[float], tuple[int, int, int]]],
    width: int = 640,
    height: int = 400,
    margin: int = 40,
) -> None:
    """Write ``series`` (values, rgb) as a line plot PNG, no dependencies beyond zlib.

    x: step index; y: linear from the minimum to the maximum over all series. Light
    grid lines at 10% of each axis; a legend swatch per series in the top right.
    """
    img = bytearray(b"\xff" * (width * height * 3))

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            img[i : i + 3] = bytes(rgb)

    def line(x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            put(x0, y0, rgb)
            put(x0, y0 + 1, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    lo = min(min(v) for v, _ in series)
    hi = max(max(v) for v, _ in series)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(v) for v, _ in series)
    pw, ph = width - 2 * margin, height - 2 * margin
    for k in range(11):
        gx = margin + k * pw // 10
        gy = margin + k * ph // 10
        line(gx, margin, gx, margin + ph, (225, 225, 225))
        line(margin, gy, margin + pw, gy, (225, 225, 225))
    line(margin, margin + ph, margin + pw, margin + ph, (0, 0, 0))
    line(margin, margin, margin, margin + ph, (0, 0, 0))
    for values, rgb in series:
        pts = [
            (margin + i * pw // max(n - 1, 1), margin + int((hi - v) / (hi - lo) * ph))
            for i, v in enumerate(values)
        ]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            line(x0, y0, x1, y1, rgb)
    for k, (_, rgb) in enumerate(series):
        for dy in range(10):
            line(
                width - margin - 30,
                margin + 8 + 16 * k + dy,
                width - margin - 10,
                margin + 8 + 16 * k + dy,
                rgb,
            )

    raw = b"".join(b"\x00" + bytes(img[y * width * 3 : (y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)
