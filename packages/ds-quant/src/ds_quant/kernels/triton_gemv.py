"""Triton matrix-vector kernels for decode-sized inputs (a few rows): W4A16 and INT8
weight-only. At one row a matmul is a read of the weight, so these kernels are built to
stream it: each program reads a (BLOCK_N rows x one K-split) slab of packed weight once,
contiguous along K, with many programs in flight (split-K), and applies each group's
scale once per group rather than per element. The tiled ``tl.dot`` kernel
(``triton_w4a16``) keeps larger inputs.

Layouts as in ``triton_w4a16`` / ``reference``: ``x`` (M, K); W4A16 ``packed`` (N,
K_padded // 2) uint8 (element ``2j`` in the low nibble of byte ``j``) with ``scale`` /
``zero`` (N, groups), ``W = (q - zero) * scale``; INT8 ``q`` (N, K) int8 with ``scale``
(N,), ``W = q * scale``. Output (M, N) in ``x.dtype``. Products and sums are in float32;
the K-splits are added with float32 atomics into a zeroed buffer, so the order of the
final additions (and the last bits of the result) can differ from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_quant.kernels.select import GEMV_MAX_ROWS

# Output rows per program and target programs in flight (about 4 per SM of an H100).
BLOCK_N = 64
TARGET_PROGRAMS = 512


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    N, K, num_groups, groups_per_split,
    stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_b = tl.arange(0, CHUNK)  # bytes of a chunk; byte j holds elements 2j, 2j + 1
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g0 = pid_k * groups_per_split
    for g in range(g0, tl.minimum(g0 + groups_per_split, num_groups)):
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_k x_k q_k over the group
        xsum = tl.zeros((1,), dtype=tl.float32)  # sum_k x_k over the group
        for c in range(0, GROUP_SIZE // 2, CHUNK):
            byte = g * (GROUP_SIZE // 2) + c + offs_b
            k_lo = 2 * byte
            x_lo = tl.load(x_ptr + row * stride_xm + k_lo, mask=k_lo < K, other=0.0)
            x_hi = tl.load(x_ptr + row * stride_xm + k_lo + 1, mask=k_lo + 1 < K, other=0.0)
            x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + byte[None, :],
                mask=n_ok[:, None] & (k_lo < K)[None, :],
                other=0,
            ).to(tl.int32)
            q_lo = (w & 0xF).to(tl.float32)
            q_hi = ((w >> 4) & 0xF).to(tl.float32)
            dot += tl.sum(q_lo * x_lo[None, :] + q_hi * x_hi[None, :], axis=1)
            xsum += tl.sum(x_lo + x_hi, axis=0)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        # sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k): scale once per group.
        acc += s * (dot - z * xsum)
    tl.atomic_add(y_ptr + row * stride_ym + offs_n, acc, mask=n_ok)


@triton.jit
def _int8_gemv_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr,
    N, K, num_chunks, chunks_per_split,
    stride_xm, stride_qn, stride_ym,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c0 = pid_k * chunks_per_split
    for c in range(c0, tl.minimum(c0 + chunks_per_split, num_chunks)):
        offs_k = c * CHUNK + tl.arange(0, CHUNK)
        k_ok = offs_k < K
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0,
        ).to(tl.float32)
        acc += tl.sum(q * x[None, :], axis=1)
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + row * stride_ym + offs_n, acc * s, mask=n_ok)


def gemv_fits(rows: int, group_size: int | None = None) -> bool:
    """Whether an input of ``rows`` rows (and W4A16 ``group_size``) takes these kernels:
    a few rows, and for W4A16 a power-of-two group of at least 32."""
    if not 1 <= rows <= GEMV_MAX_ROWS:
        return False
    return group_size is None or (group_size >= 32 and group_size & (group_size - 1) == 0)


def _split(n: int, units: int, block_n: int, programs: int) -> tuple[int, int]:
    """(splits, units per split) so that about ``programs`` programs run per row."""
    n_blocks = triton.cdiv(n, block_n)
    splits = max(1, min(units, triton.cdiv(programs, n_blocks)))
    per_split = triton.cdiv(units, splits)
    return triton.cdiv(units, per_split), per_split


def w4a16_gemv_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    in_features: int,
    block_n: int = BLOCK_N,
    programs: int = TARGET_PROGRAMS,
) -> torch.Tensor:
    """``x`` (M, in_features), M small -> (M, out_features) in ``x.dtype``. ``block_n``
    and ``programs`` (the split-K target) are tuning knobs (bench_gpu.py --sweep)."""
    m, n = x.shape[0], packed.shape[0]
    x = x.contiguous()
    groups = triton.cdiv(in_features, group_size)
    splits, per_split = _split(n, groups, block_n, programs)
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    chunk = min(group_size // 2, 64)
    grid = (triton.cdiv(n, block_n), splits, m)
    _w4a16_gemv_kernel[grid](
        x, packed, scale, zero, y, n, in_features, groups, per_split,
        x.stride(0), packed.stride(0), scale.stride(0), y.stride(0),
        GROUP_SIZE=group_size, CHUNK=chunk, BLOCK_N=block_n,
    )  # fmt: skip
    return y.to(x.dtype)


def int8_gemv_triton(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    block_n: int = BLOCK_N,
    programs: int = TARGET_PROGRAMS,
) -> torch.Tensor:
    """``x`` (M, in), M small; ``q`` (out, in) int8; ``scale`` (out,) -> (M, out)."""
    m, (n, k) = x.shape[0], q.shape
    x, q = x.contiguous(), q.contiguous()
    chunk = 128
    chunks = triton.cdiv(k, chunk)
    splits, per_split = _split(n, chunks, block_n, programs)
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), splits, m)
    _int8_gemv_kernel[grid](
        x, q, scale, y, n, k, chunks, per_split, x.stride(0), q.stride(0), y.stride(0),
        CHUNK=chunk, BLOCK_N=block_n,
    )  # fmt: skip
    return y.to(x.dtype)
