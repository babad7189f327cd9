"""Where the model's attention layers compute attention scores: through ds-attention,
except in the three shortcuts listed below.

- ``attend``: ds-attention's ``attention`` (dense, windowed, varlen) for every pass.
- ``paged_decode``: ds-attention's ``paged_decode_attention`` for the serving runner's
  decode rows, which read the paged pool in place through their block tables.

Shortcuts that run torch directly instead of ds-attention. Setting the model's
``attention_backend`` turns off the second and third (every call then goes through
ds-attention with that backend); the first has no ds-attention form at all:

1. ``attend(mask=...)``, a caller's arbitrary bool visibility mask
   (``DeepSeekModel.forward(mask=...)``; the fixed-shape decode step of
   ``ds_model.cuda_graph`` passes one, which MLA layers that absorb take to shortcut 3
   instead): torch SDPA with that mask.
   ds-attention expresses causal, window, block and varlen masks only, and such a mask
   need not be any of them.
2. ``attend(padding=...)`` with one query per row, on CPU, no window, no backend chosen
   (``_padded_decode`` below: ``generate``'s left-padded batch decode for MHA/GQA
   layers, and for MLA layers whose ``kv_b_proj`` is wrapped): one SDPA call over the
   cache as it lies, with the padding as a key mask. A single query sees every real
   key, so the varlen path's gather of the real keys per layer and step, and its
   per-call checks, buy nothing at this size.
3. MLA's single-token absorbed decode (``MLAttention._decode_one`` in ``ds_model.mla``:
   one new token per row, no window, no packing, no backend chosen; unpadded, padded,
   or under the fixed-shape step's visibility mask): four batched matmuls and a softmax
   over the cached latents. ds-attention's per-call validation costs more than the
   attention itself at decode sizes (docs/benchmarks.md, "Decode paths").

Tests compare each shortcut with the ds-attention path (``tests/test_fast_paths.py``,
``tests/test_cuda_graph.py``; for the second, a padded row against the row alone in
``tests/test_model.py``).

``attend``'s tensors: ``q``: (batch, seqlen_q, heads, d_qk); ``k``: (batch, seqlen_k, kv_heads, d_qk);
``v``: (batch, seqlen_k, kv_heads, d_v) -> (batch, seqlen_q, heads, d_v).

Causal attention is bottom-right aligned (query ``i`` of ``T`` new tokens sits at key
position ``S - T + i``), which is exactly what a KV cache needs; ``window`` is
ds-attention's ``(left, right)``. Three batch layouts:

- plain: every slot is a real token.
- ``cu_seqlens=(cu_q, cu_k)``: packed ragged sequences with batch 1 (the serving
  runner's prefill rows), as ds-attention's varlen API defines.
- ``padding``: a padded batch (``ds_model.unpad.Padding``). The real queries and keys
  are gathered into packed rows, run through the same varlen API (causal and window
  count real tokens within each row), and scattered back; padded query slots get zeros.
"""

from __future__ import annotations

import ds_attention
import torch
import torch.nn.functional as F

from ds_model.unpad import Padding

__all__ = ["attend", "paged_decode"]

# ds-model's attention_backend names ds-attention's general backends; its paged decode
# has the same Triton kernel and reference, and a torch path in place of SDPA.
_PAGED_BACKENDS = {None: None, "sdpa": "torch", "triton": "triton", "reference": "reference"}


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor | None,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float,
    v_head_dim: int | None = None,
    backend: str | None = None,
    context_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One query token per sequence over the paged pool, read in place through the block
    table: ds-attention's ``paged_decode_attention``. ``q``: (batch, heads, d_qk);
    ``k_pages``/``v_pages``: (num_blocks, block_size, kv_heads, d) -> (batch, heads, d_v).
    ``v_pages=None``: values are the first ``v_head_dim`` channels of the keys (MLA).
    ``context_range``: the step's (shortest, longest) context on the host, so no layer
    reads ``context_lens`` back."""
    return ds_attention.paged_decode_attention(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        softmax_scale=softmax_scale,
        backend=_PAGED_BACKENDS[backend],
        v_head_dim=v_head_dim,
        context_range=context_range,
    )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    mask: torch.Tensor | None = None,
    padding: Padding | None = None,
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
    window: tuple[int | None, int | None] | None = None,
    causal: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    if (mask is not None) + (padding is not None) + (cu_seqlens is not None) > 1:
        raise ValueError("pass at most one of mask, padding and cu_seqlens")
    if padding is not None:
        if padding.total_q == 0:  # every query is padding: nothing to attend
            return q.new_zeros(*q.shape[:3], v.shape[-1])
        if q.shape[1] == 1 and window is None and backend is None and q.is_cpu:
            return _padded_decode(q, k, v, padding.key_valid, softmax_scale)
        out = ds_attention.attention(
            padding.unpad_q(q),
            padding.unpad_k(k),
            padding.unpad_k(v),
            causal=causal,
            window=window,
            cu_seqlens=padding.cu_seqlens,
            softmax_scale=softmax_scale,
            backend=backend,
        )
        return padding.pad_q(out)
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
    # An arbitrary bool (batch, 1, seqlen_q, seqlen_k) visibility mask from a caller of
    # DeepSeekModel.forward(mask=...). It need not be "real tokens, causal, window", so
    # it has no varlen form and ds-attention (causal / window / block / varlen masks
    # only) cannot express it: torch's SDPA runs it, with causality and any window
    # already folded in by the caller (``window`` is ignored here).
    if q.shape[1] == 1 and q.is_cpu and _products_beat_sdpa(q.dtype):
        return _one_query_float32(q, k, v, mask, softmax_scale)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=softmax_scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def _products_beat_sdpa(dtype: torch.dtype) -> bool:
    # One query on CPU (one thread, AVX-512 host, 12 heads of 64 over 256 keys): bf16 /
    # fp16 SDPA 3.2 ms against 0.5 ms for the products, eager or compiled; float32 SDPA
    # 90 us against 60 us compiled (1.1-1.8x at batch 8), but 71 against 90 us eagerly
    # (0.17x at batch 8), so float32 takes the products only where a compiled step fuses
    # them.
    if dtype in (torch.bfloat16, torch.float16):
        return True
    return dtype == torch.float32 and torch.compiler.is_compiling()


def _one_query_float32(q, k, v, mask: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """One query per row over a masked cache (the fixed-shape decode step) on CPU, as two
    float32 products (``_products_beat_sdpa`` says when); a compiled step fuses their
    casts, mask and softmax. ``q`` (batch, 1, heads, d),
    ``k`` / ``v`` (batch, keys, kv_heads, d), ``mask`` bool broadcastable to (batch, 1,
    1, keys); returns (batch, 1, heads, dv) in ``q.dtype``."""
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    # (batch, kv_heads, heads per kv head, d): a GQA group shares its key/value head.
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = qg @ k.permute(0, 2, 3, 1).float() * softmax_scale
    scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    out = scores.softmax(dim=-1) @ v.transpose(1, 2).float()
    return out.reshape(batch, 1, heads, v.shape[-1]).to(q.dtype)


def _padded_decode(q, k, v, key_valid: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """One new token per row of a padded batch, on CPU without a window: it sees every
    real key, so the padding is a key mask on one SDPA call over the cache as it lies,
    with no gather of the real keys (shortcut 2 of the module doc). ``key_valid``
    (batch, seqlen_k); the new token is the last slot. A row whose new token is padding
    gets zeros."""
    visible = key_valid.clone()
    visible[:, -1] = True  # no all-masked row (SDPA would give NaN); zeroed below
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=visible[:, None, None, :],
        scale=softmax_scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2) * key_valid[:, -1, None, None, None].to(out.dtype)
