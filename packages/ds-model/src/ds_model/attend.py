"""The one place the model computes attention scores: through ds-attention.

``q``: (batch, seqlen_q, heads, d_qk); ``k``: (batch, seqlen_k, kv_heads, d_qk);
``v``: (batch, seqlen_k, kv_heads, d_v) -> (batch, seqlen_q, heads, d_v).

Packed ragged batches (the serving runner) pass ``cu_seqlens=(cu_q, cu_k)`` with
batch 1, as ds-attention's varlen API defines. Causal attention is bottom-right aligned (query ``i`` of ``T`` new tokens sits at key
position ``S - T + i``), which is exactly what a KV cache needs. Batches that carry
padding or several sequences of different lengths pass ``mask``, a bool
(batch, 1, seqlen_q, seqlen_k) tensor of visible keys, with causality and any
window already folded in (the caller knows each row's positions; ``window`` is then
ignored).
"""

from __future__ import annotations

import ds_attention
import torch
import torch.nn.functional as F

__all__ = ["attend"]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
    window: tuple[int | None, int | None] | None = None,
    causal: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    if mask is None:
        return ds_attention.attention(
            q,
            k,
            v,
            causal=causal,
            window=window,
            cu_seqlens=cu_seqlens,
            softmax_scale=softmax_scale,
            backend=backend,
        )
    # An explicit per-row mask (left padding, ragged runner batches): torch's SDPA with
    # a boolean mask, in (batch, heads, seqlen, dim) layout.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=softmax_scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)
