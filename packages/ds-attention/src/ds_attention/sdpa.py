"""torch.nn.functional.scaled_dot_product_attention behind the MaskSpec: the CPU default.

A mask is passed only where the pattern needs one: dense non-causal attention and causal
attention whose bottom-right alignment equals SDPA's top-left one (``seqlen_q ==
seqlen_k``, or a single query row) go through SDPA's fused paths without any mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_attention.masks import dense_mask
from ds_attention.protocol import MaskSpec

# enable_gqa arrived in torch 2.5; parse the version rather than probing the builtin.
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    block_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    sq, sk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    groups = q.shape[2] // k.shape[2]
    kwargs: dict = {"scale": scale}
    if groups > 1:
        if _HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            kt = kt.repeat_interleave(groups, dim=1)
            vt = vt.repeat_interleave(groups, dim=1)
    if sk == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    simple = spec.window is None and block_mask is None
    if simple and (not spec.causal or sq == 1):
        out = F.scaled_dot_product_attention(qt, kt, vt, **kwargs)
        return out.transpose(1, 2)
    if simple and sq == sk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kwargs)
        return out.transpose(1, 2)
    mask = dense_mask(
        sq,
        sk,
        causal=spec.causal,
        window=spec.window,
        block_mask=block_mask,
        block_size=spec.block_size,
        device=q.device,
    )
    row_any = mask.any(dim=-1, keepdim=True)
    all_rows = bool(row_any.all())
    if not all_rows:
        # SDPA yields NaN for a row with no visible key; open key 0 there and zero the row.
        mask = mask.clone()
        mask[..., :1] |= ~row_any
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kwargs)
    if not all_rows:
        out = out * row_any.to(out.dtype)
    return out.transpose(1, 2)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, scale: float
) -> torch.Tensor:
    """q (batch, seqlen_q, heads, d_qk), k/v (batch, seqlen_k, kv_heads, d) -> out
    (batch, seqlen_q, heads, d_v). Packed batches (cu_seqlens) run one sequence at a time."""
    if spec.cu_seqlens_q is None:
        return _sdpa_one(q, k, v, spec, spec.block_mask, scale)
    cu_q = spec.cu_seqlens_q.tolist()
    cu_k = spec.cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if qs.stop == qs.start:
            continue
        bm = None
        if spec.block_mask is not None:
            bm = spec.block_mask[min(i, spec.block_mask.shape[0] - 1)][None]
            bm = bm[:, :, : -(-(qs.stop - qs.start) // spec.block_size)]
            bm = bm[..., : -(-(ks.stop - ks.start) // spec.block_size)]
        outs.append(_sdpa_one(q[:, qs], k[:, ks], v[:, ks], spec, bm, scale))
    if not outs:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return torch.cat(outs, dim=1)
