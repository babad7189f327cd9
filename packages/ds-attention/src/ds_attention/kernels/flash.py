"""Launchers and the autograd.Function around the Triton flash-attention kernels.

Layout: q (batch, seqlen_q, heads, d_qk), k (batch, seqlen_k, kv_heads, d_qk),
v (batch, seqlen_k, kv_heads, d_v); with cu_seqlens, batch is 1 and sequences are packed.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ds_attention.kernels.flash_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel
from ds_attention.kernels.flash_fwd import flash_fwd_kernel
from ds_attention.kernels.layout import block_lists, transposed_block_lists
from ds_attention.protocol import MaskSpec

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(
    d_qk: int, d_v: int, block_size: int | None, backward: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small tiles in the interpreter exercise
    the multi-tile paths at test shapes; on GPU, FA2-like 64-row tiles (32 for wide heads).
    The backward's two kernels share the pair: dk/dv tiles keys by BLOCK_N and walks query
    tiles of BLOCK_M, dq the other way round. A block layout caps both at its block_size.
    benchmarks/tune_tiles.py sweeps candidates on a GPU."""
    if _interpreting():
        tm = tn = 16
    elif max(d_qk, d_v) > 128 or backward:
        tm, tn = (64, 32) if max(d_qk, d_v) <= 128 else (32, 32)
    else:
        tm, tn = 64, 64
    if block_size is not None:
        tm, tn = min(tm, block_size), min(tn, block_size)
    # 3 stages is Triton's own default on NVIDIA; the interpreter ignores it.
    return tm, tn, 4 if max(d_qk, d_v) <= 64 else 8, 3


class _Problem:
    """Everything the three kernels share: sizes, window bounds, varlen and layouts."""

    def __init__(self, q, k, v, spec: MaskSpec):
        self.batch, self.seqlen_q, self.heads, self.d_qk = q.shape
        self.seqlen_k, self.kv_heads, self.d_v = k.shape[1], k.shape[2], v.shape[3]
        self.groups = self.heads // self.kv_heads
        self.varlen = spec.cu_seqlens_q is not None
        dev = q.device
        if self.varlen:
            self.cu_q = spec.cu_seqlens_q.to(device=dev, dtype=torch.int32).contiguous()
            self.cu_k = spec.cu_seqlens_k.to(device=dev, dtype=torch.int32).contiguous()
            self.nseq = self.cu_q.numel() - 1
            self.max_q = int((self.cu_q[1:] - self.cu_q[:-1]).max())
            self.max_k = int((self.cu_k[1:] - self.cu_k[:-1]).max())
        else:
            self.cu_q = self.cu_k = torch.zeros(1, dtype=torch.int32, device=dev)
            self.nseq, self.max_q, self.max_k = self.batch, self.seqlen_q, self.seqlen_k
        left, right = spec.window if spec.window is not None else (None, None)
        if spec.causal:
            right = 0 if right is None else min(right, 0)
        self.has_left, self.has_right = left is not None, right is not None
        self.left, self.right = left or 0, right or 0
        self.block_mask = spec.block_mask
        self.mask_block = spec.block_size if spec.block_mask is not None else 16
        self.tile_limit = spec.block_size if spec.block_mask is not None else None
        self.dqk_pad = max(16, triton.next_power_of_2(self.d_qk))
        self.dv_pad = max(16, triton.next_power_of_2(self.d_v))
        self.dot_f32 = _interpreting() and q.dtype == torch.bfloat16
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def lists(self, transposed: bool, device):
        if self.block_mask is None:
            z = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device)
            return z, z[..., 0]
        make = transposed_block_lists if transposed else block_lists
        return make(self.block_mask.to(device), self.nseq, self.heads)

    def constexprs(self, block_m, block_n):
        return {
            "IS_VARLEN": self.varlen,
            "HAS_LEFT": self.has_left,
            "HAS_RIGHT": self.has_right,
            "HAS_BLOCKS": self.block_mask is not None,
            "MASK_BLOCK": self.mask_block,
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_DQK": self.dqk_pad,
            "BLOCK_DV": self.dv_pad,
            "DOT_F32": self.dot_f32,
            "PREC": self.prec,
        }


def _batch_stride(t: torch.Tensor, varlen: bool) -> int:
    return 0 if varlen else t.stride(0)


def _forward(q, k, v, pb: _Problem, scale: float):
    o = torch.empty(*q.shape[:3], pb.d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], pb.heads, q.shape[1], dtype=torch.float32, device=q.device)
    if q.shape[1] == 0:
        return o, lse
    idx, cnt = pb.lists(False, q.device)
    bm, bn, warps, stages = _tiles(pb.d_qk, pb.d_v, pb.tile_limit, False)
    grid = (triton.cdiv(pb.max_q, bm), pb.nseq * pb.heads)
    vs = pb.varlen
    flash_fwd_kernel[grid](
        q, k, v, o, lse, pb.cu_q, pb.cu_k, idx, cnt, scale * LOG2E,
        _batch_stride(q, vs), q.stride(1), q.stride(2),
        _batch_stride(k, vs), k.stride(1), k.stride(2),
        _batch_stride(v, vs), v.stride(1), v.stride(2),
        _batch_stride(o, vs), o.stride(1), o.stride(2),
        _batch_stride(lse, vs), lse.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        pb.seqlen_q, pb.seqlen_k, pb.heads, pb.groups, pb.d_qk, pb.d_v, pb.left, pb.right,
        num_warps=warps, num_stages=stages, **pb.constexprs(bm, bn),
    )  # fmt: skip
    return o, lse


def _backward(do, q, k, v, o, lse, pb: _Problem, scale: float):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.shape[1] == 0 or k.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    lse2 = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse * LOG2E)
    vs = pb.varlen
    bm, bn, warps, stages = _tiles(pb.d_qk, pb.d_v, pb.tile_limit, True)
    strides = (
        _batch_stride(q, vs), q.stride(1), q.stride(2),
        _batch_stride(k, vs), k.stride(1), k.stride(2),
        _batch_stride(v, vs), v.stride(1), v.stride(2),
        _batch_stride(do, vs), do.stride(1), do.stride(2),
        _batch_stride(lse2, vs), lse2.stride(1),
    )  # fmt: skip
    tidx, tcnt = pb.lists(True, q.device)
    flash_bwd_dkdv_kernel[(triton.cdiv(pb.max_k, bn), pb.nseq * pb.kv_heads)](
        q, k, v, do, lse2, delta, dk, dv, pb.cu_q, pb.cu_k, tidx, tcnt, scale, scale * LOG2E,
        *strides, tidx.stride(0), tidx.stride(1), tidx.stride(2), tcnt.stride(0), tcnt.stride(1),
        pb.seqlen_q, pb.seqlen_k, pb.kv_heads, pb.groups, pb.d_qk, pb.d_v, pb.left, pb.right,
        num_warps=warps, num_stages=stages, **pb.constexprs(bm, bn),
    )  # fmt: skip
    idx, cnt = pb.lists(False, q.device)
    flash_bwd_dq_kernel[(triton.cdiv(pb.max_q, bm), pb.nseq * pb.heads)](
        q, k, v, do, lse2, delta, dq, pb.cu_q, pb.cu_k, idx, cnt, scale, scale * LOG2E,
        *strides, idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        pb.seqlen_q, pb.seqlen_k, pb.heads, pb.groups, pb.d_qk, pb.d_v, pb.left, pb.right,
        num_warps=warps, num_stages=stages, **pb.constexprs(bm, bn),
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable wrapper: forward saves (q, k, v, out, lse); backward runs the
    dk/dv and dq kernels. Returns (out, lse); lse carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, spec: MaskSpec, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        pb = _Problem(q, k, v, spec)
        o, lse = _forward(q, k, v, pb, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.problem, ctx.scale = pb, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.problem, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, spec: MaskSpec, scale: float):
    """Returns (out, lse): out (batch, seqlen_q, heads, d_v), lse (batch, heads, seqlen_q)."""
    return FlashAttentionFunction.apply(q, k, v, spec, scale)
