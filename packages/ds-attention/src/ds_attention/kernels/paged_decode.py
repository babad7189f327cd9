"""Decode attention against a paged KV cache (Triton): one new query token per sequence.

One program serves one (sequence, kv head) and all query heads of its group, so each
cached K/V page is read from memory once per group. It walks the sequence's pages in
block-table order with an online softmax. Layouts: q (batch, heads, d_qk); k_cache
(num_blocks, page_size, kv_heads, d_qk); v_cache (num_blocks, page_size, kv_heads, d_v);
block_table (batch, max_blocks) int32; context_lens (batch,) int32; out (batch, heads, d_v).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ds_attention.kernels.flash_fwd import _dot

LOG2E = 1.4426950408889634


@triton.jit
def paged_decode_kernel(
    Q,
    KC,
    VC,
    TABLE,
    LENS,
    Out,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kp,
    stride_kh,
    stride_vn,
    stride_vp,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    kv_heads,
    groups,
    d_qk,
    d_v,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0) // kv_heads
    h_kv = tl.program_id(0) % kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, PAGE)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads_ok = offs_g < groups
    q_ptr = Q + b.to(tl.int64) * stride_qb + (h_kv * groups + offs_g[:, None]) * stride_qh
    q = tl.load(q_ptr + offs_dqk[None, :], mask=heads_ok[:, None] & (offs_dqk[None, :] < d_qk),
                other=0.0)  # fmt: skip
    n = tl.load(LENS + b)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for i in range(0, tl.cdiv(n, PAGE)):
        page = tl.load(TABLE + b.to(tl.int64) * stride_tb + i).to(tl.int64)
        tok_ok = i * PAGE + offs_p < n
        kt = tl.load(
            KC + page * stride_kn + h_kv * stride_kh + offs_p[None, :] * stride_kp
            + offs_dqk[:, None],
            mask=tok_ok[None, :] & (offs_dqk[:, None] < d_qk),
            other=0.0,
        )  # fmt: skip
        v = tl.load(
            VC + page * stride_vn + h_kv * stride_vh + offs_p[:, None] * stride_vp
            + offs_dv[None, :],
            mask=tok_ok[:, None] & (offs_dv[None, :] < d_v),
            other=0.0,
        )  # fmt: skip
        s = _dot(q, kt, DOT_F32, PREC) * scale_log2
        # Every visited page holds at least one live token, so m_new is finite.
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, PREC)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = Out + b.to(tl.int64) * stride_ob + (h_kv * groups + offs_g[:, None]) * stride_oh
    tl.store(o_ptr + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=heads_ok[:, None] & (offs_dv[None, :] < d_v))  # fmt: skip


def paged_decode_triton(q, k_cache, v_cache, block_table, context_lens, scale: float):
    """Launches :func:`paged_decode_kernel`; inputs are assumed validated."""
    batch, heads, d_qk = q.shape
    page, kv_heads, d_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    groups = heads // kv_heads
    out = torch.empty(batch, heads, d_v, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    q = q.contiguous()
    table = block_table.to(torch.int32).contiguous()
    lens = context_lens.to(device=q.device, dtype=torch.int32).contiguous()
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    paged_decode_kernel[(batch * kv_heads,)](
        q, k_cache, v_cache, table, lens, out, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0), out.stride(0), out.stride(1),
        kv_heads, groups, d_qk, d_v,
        PAGE=page,
        BLOCK_G=max(16, triton.next_power_of_2(groups)),
        BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)),
        BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
        DOT_F32=interpreting and q.dtype == torch.bfloat16,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
    return out
