"""Timing and table helpers shared by the benchmark scripts."""

from __future__ import annotations

import math
import platform
import statistics
import time

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads (torch {torch.__version__})"
    )


def median_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised on GPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def visible_pairs(mask: torch.Tensor | None, batch: int, heads: int, sq: int, sk: int) -> int:
    """(query, key) pairs actually attended: the useful work FLOPs are counted on."""
    if mask is None:
        return batch * heads * sq * sk
    # Broadcasting repeats every element the same number of times, so count the mask as
    # it is: expanding first materialises batch*heads*sq*sk (128 GiB at 32k) in the sum.
    full = torch.broadcast_shapes(mask.shape, (batch, heads, sq, sk))
    return int(mask.sum()) * (math.prod(full) // mask.numel())


def attention_flops(pairs: int, d_qk: int, d_v: int, backward: bool) -> float:
    """2 FLOPs per multiply-add in QK^T and PV; backward is 2.5x forward (flash-attn)."""
    fwd = 2.0 * pairs * (d_qk + d_v)
    return fwd * 3.5 if backward else fwd


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
