"""``attention()``: the one public entry point for every mask pattern and backend."""

from __future__ import annotations

import torch

from ds_attention.backends import get_backend
from ds_attention.validate import check_softmax_scale, make_mask_spec


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | tuple[int | None, int | None] | None = None,
    block_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    block_size: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with causal / window / block-sparse / varlen masks.

    Layout (flash-attn): ``q`` (batch, seqlen_q, heads, d_qk), ``k`` (batch, seqlen_k,
    kv_heads, d_qk), ``v`` (batch, seqlen_k, kv_heads, d_v); returns ``out`` (batch,
    seqlen_q, heads, d_v) in q's dtype, and with ``return_lse=True`` also ``lse``
    (batch, heads, seqlen_q) float32, the natural-log log-sum-exp of the scaled scores.
    ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention: query head
    ``h`` reads kv head ``h // (heads // kv_heads)``). ``d_v`` may differ from ``d_qk``
    (MLA: 192/128). dtypes: float16, bfloat16, float32; head dims 1..256.

    Which keys a query sees. Query row ``i`` sits at position ``p = i + seqlen_k -
    seqlen_q`` (bottom-right aligned, so queries appended after a KV cache line up);
    key ``j`` is visible when all enabled rules hold:

    - ``causal=True``: ``j <= p``.
    - ``window=(left, right)``: ``p - left <= j <= p + right``; ``None`` on a side means
      unbounded; an int ``w`` means ``(w, w)``. So ``causal=True, window=w`` gives the
      ``w + 1`` keys ``p - w .. p``; ``window=0`` with ``causal=False`` is the diagonal.
    - ``block_mask``: bool (batch or 1, heads or 1, ceil(seqlen_q / block_size),
      ceil(seqlen_k / block_size)); query block ``i // block_size`` visits key block
      ``j // block_size`` only where True. The Triton kernel skips key blocks that no
      rule lets a query block see, rather than computing and discarding them.
    - ``cu_seqlens``: packed variable-length batch; q/k/v have batch 1 and sequence ``s``
      occupies rows ``cu_seqlens[s]:cu_seqlens[s + 1]``. One int32 tensor (num_seqs + 1)
      when q and k share lengths, or a pair ``(cu_seqlens_q, cu_seqlens_k)``. Masks apply
      within each sequence (positions restart at 0); block_mask's batch dim is num_seqs.

    A query that sees no key gets a zero output row (and lse ``-inf``), never NaN.
    ``softmax_scale`` defaults to ``d_qk ** -0.5``.

    ``backend``: ``None`` picks ``"triton"`` for CUDA tensors and ``"sdpa"`` (torch's
    scaled_dot_product_attention) otherwise; ``"reference"`` is the explicit-mask float32
    ground truth. All three are differentiable.
    """
    spec = make_mask_spec(
        q,
        k,
        v,
        causal=causal,
        window=window,
        block_mask=block_mask,
        block_size=block_size,
        cu_seqlens=cu_seqlens,
    )
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    impl = get_backend(backend, q.device)
    out, lse = impl.run(q, k, v, spec, scale, return_lse)
    if return_lse:
        return out, lse
    return out
