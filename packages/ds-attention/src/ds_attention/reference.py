"""Plain-torch attention with explicit masks: the ground truth for every kernel.

Layout: q (batch, seqlen_q, heads, d_qk), k (batch, seqlen_k, kv_heads, d_qk),
v (batch, seqlen_k, kv_heads, d_v) -> out (batch, seqlen_q, heads, d_v);
lse (batch, heads, seqlen_q) in float32. Rows that see no key give zeros and lse = -inf.
"""

from __future__ import annotations

import torch

from ds_attention.masks import dense_mask
from ds_attention.protocol import MaskSpec


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    block_mask: torch.Tensor | None,
    scale: float,
    upcast: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    mask = dense_mask(
        q.shape[1],
        k.shape[1],
        causal=spec.causal,
        window=spec.window,
        block_mask=block_mask,
        block_size=spec.block_size,
        device=q.device,
    )
    if mask is None:
        row_any = torch.ones(1, 1, q.shape[1], 1, dtype=torch.bool, device=q.device)
    else:
        row_any = mask.any(dim=-1, keepdim=True)
        # Fully masked rows get finite scores (then zero weight) so no NaN reaches the grads.
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~row_any, 0.0)
    lse = torch.logsumexp(scores.float(), dim=-1)
    lse = lse.masked_fill(~row_any[..., 0], float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~row_any, 0.0).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.to(out_dtype), lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``. ``upcast=True`` computes in float32 (the ground truth);
    ``upcast=False`` computes in the input dtype (the baseline of the flash-attn 2x rule).

    Inputs are assumed valid (see :func:`ds_attention.validate.make_mask_spec`).
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if spec.cu_seqlens_q is None:
        return _dense(q, k, v, spec, spec.block_mask, scale, upcast)
    cu_q = spec.cu_seqlens_q.tolist()
    cu_k = spec.cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        bm = None
        if spec.block_mask is not None:
            bm = spec.block_mask[min(i, spec.block_mask.shape[0] - 1)][None]
            nq = -(-(qs.stop - qs.start) // spec.block_size)
            nk = -(-(ks.stop - ks.start) // spec.block_size)
            bm = bm[:, :, :nq, :nk]
        o, lse = _dense(q[:, qs], k[:, ks], v[:, ks], spec, bm, scale, upcast)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """One new query token per sequence against a paged KV cache, in float32.

    q: (batch, heads, d_qk); k_cache: (num_blocks, block_size, kv_heads, d_qk);
    v_cache: (num_blocks, block_size, kv_heads, d_v); block_table: (batch, max_blocks)
    int32, the cache blocks of each sequence in order; context_lens: (batch,) number of
    cached tokens each query attends to (the new token's own k/v already written).
    Returns (batch, heads, d_v) in q's dtype; a sequence with context 0 gets zeros.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    block_size = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        if n == 0:
            outs.append(q.new_zeros(q.shape[1], v_cache.shape[-1]))
            continue
        blocks = block_table[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float()  # (n, kv_heads, d)
        v = v_cache[blocks].flatten(0, 1)[:n].float()
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float() * scale, k)
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype))
    return torch.stack(outs)
