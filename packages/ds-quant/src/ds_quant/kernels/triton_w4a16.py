"""Triton W4A16 dequant-matmul: ``y = x @ W^T`` with W unpacked from 4 bits in registers.

``x``: (M, K) float16 / bfloat16 / float32. ``packed``: (N, K_padded // 2) uint8, element
``2j`` in the low nibble of byte ``j``. ``scale`` / ``zero``: (N, K_padded // group_size)
float32 with ``W = (q - zero) * scale``. ``y``: (M, N) in ``x.dtype``, accumulated in
float32. The plain-torch reference is ``reference.w4a16_matmul_reference``.

Inputs of a few rows (decode) go to ``triton_gemv``'s split-K matrix-vector kernel.
Runs on a GPU, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is
imported (tests do this at small shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_quant.kernels.triton_gemv import gemv_fits, w4a16_gemv_triton


@triton.jit
def _w4a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_ym,
    stride_yn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wk_mask = k_ok[:, None] & n_ok[None, :]
        byte = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // 2) * stride_wk,
            mask=wk_mask,
            other=0,
        ).to(tl.int32)
        q = ((byte >> ((offs_k[:, None] % 2) * 4)) & 0xF).to(tl.float32)
        group = offs_k // GROUP_SIZE
        s_off = offs_n[None, :] * stride_sn + group[:, None] * stride_sg
        s = tl.load(s_ptr + s_off, mask=wk_mask, other=0.0)
        z = tl.load(z_ptr + s_off, mask=wk_mask, other=0.0)
        w = (q - z) * s  # (BLOCK_K, BLOCK_N) float32
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w, input_precision=PRECISION)
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        y,
        mask=m_ok[:, None] & n_ok[None, :],
    )


def w4a16_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x`` (..., in_features) -> (..., out_features) in ``x.dtype`` (see module doc)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    x2 = x.reshape(-1, in_features)
    m, n = x2.shape[0], packed.shape[0]
    if gemv_fits(m, group_size):  # decode: stream the weight, split along K
        y = w4a16_gemv_triton(x2, packed, scale, zero, group_size, in_features)
        return y.reshape(*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    scale = scale.to(torch.float32)
    zero = zero.to(torch.float32)
    if x.is_cuda:
        block_m = 16 if m <= 16 else 64
        block_n, block_k = 64, 64
    else:  # interpreter: small tiles keep numpy emulation quick
        block_m, block_n, block_k = 16, 32, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_kernel[grid](
        x2,
        packed,
        scale,
        zero,
        y,
        m,
        n,
        in_features,
        x2.stride(0),
        x2.stride(1),
        packed.stride(0),
        packed.stride(1),
        scale.stride(0),
        scale.stride(1),
        y.stride(0),
        y.stride(1),
        GROUP_SIZE=group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32",
        # The interpreter (CPU) mishandles half-precision dots; it gets float32 operands.
        UPCAST=not x.is_cuda,
    )
    return y.reshape(*x.shape[:-1], n)
