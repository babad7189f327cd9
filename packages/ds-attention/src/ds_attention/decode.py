"""``paged_decode_attention()``: one new token per sequence against a paged KV cache.

This is the layout ds-batching's block manager hands out and ds-serve decodes with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_attention.backends import interpreting, triton_available
from ds_attention.reference import paged_decode_reference
from ds_attention.sdpa import HAS_GQA
from ds_attention.validate import SUPPORTED_DTYPES, check_softmax_scale


def _check(q, k_cache, v_cache, block_table, context_lens) -> None:
    for name, t, nd in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            layout = (
                "(batch, heads, head_dim)"
                if nd == 3
                else "(num_blocks, block_size, kv_heads, head_dim)"
            )
            raise ValueError(f"{name} must be {layout}, got {got}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name}.dtype {t.dtype} unsupported; allowed: float16, bfloat16, float32"
            )
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on "
            "(num_blocks, block_size, kv_heads)"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {q.shape[2]}")
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of cache kv_heads ({kv_heads})")
    batch = q.shape[0]
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dim() != 2
        or block_table.shape[0] != batch
        or block_table.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"block_table must be an int32 tensor (batch={batch}, max_blocks), got "
            f"{getattr(block_table, 'shape', block_table)}"
        )
    if (
        not isinstance(context_lens, torch.Tensor)
        or context_lens.shape != (batch,)
        or context_lens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"context_lens must be an int tensor of shape ({batch},)")
    capacity = block_table.shape[1] * k_cache.shape[1]
    if batch and (int(context_lens.min()) < 0 or int(context_lens.max()) > capacity):
        raise ValueError(
            f"context_lens must lie in 0..max_blocks * block_size = {capacity}, "
            f"got {context_lens.tolist()}"
        )


def _triton_page_ok(page: int) -> bool:
    """The Triton kernel loads one page per tile: a power of two >= 16 (tl.dot's minimum)."""
    return page >= 16 and page & (page - 1) == 0


def _auto_backend(on_cuda: bool, page: int) -> str:
    """backend=None: Triton on CUDA, SDPA elsewhere; any page size must work by default,
    so one the kernel cannot take goes to SDPA instead of raising."""
    return "triton" if on_cuda and _triton_page_ok(page) and triton_available() else "sdpa"


def paged_decode_sdpa(q, k_cache, v_cache, block_table, context_lens, scale: float):
    """Gathers every sequence's pages into (batch, max_blocks * block_size) keys and runs
    one batched SDPA with a key-padding mask: the CPU default, no Python loop."""
    heads = q.shape[1]
    table = block_table.long()
    # The gather copies every live page once; that copy is most of the CPU time.
    k = k_cache[table].flatten(1, 2)  # (batch, max_blocks * block_size, kv_heads, d_qk)
    v = v_cache[table].flatten(1, 2)
    lens = context_lens.to(q.device).long()
    live = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]
    # A sequence with no context opens key 0 and is zeroed afterwards (SDPA would NaN).
    first = torch.arange(k.shape[1], device=q.device)[None, :] == 0
    mask = live | ((lens[:, None] == 0) & first)
    groups = heads // k.shape[2]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    kwargs: dict = {"scale": scale}
    if groups > 1 and HAS_GQA:
        kwargs["enable_gqa"] = True  # repeating the gathered KV would cost more than SDPA
    elif groups > 1:
        kt = kt.repeat_interleave(groups, dim=1)
        vt = vt.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q[:, :, None], kt, vt, attn_mask=mask[:, None, None], **kwargs
    )[:, :, 0]
    return out * (lens > 0)[:, None, None].to(out.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over its cached tokens.

    q: (batch, heads, d_qk); k_cache: (num_blocks, block_size, kv_heads, d_qk); v_cache:
    (num_blocks, block_size, kv_heads, d_v); block_table: (batch, max_blocks) int32, row
    ``b`` lists the cache blocks of sequence ``b`` in order; context_lens: (batch,) int32,
    how many cached tokens sequence ``b`` attends to (write the new token's k/v first).
    Returns (batch, heads, d_v). A sequence with context 0 gets zeros. Forward only.

    ``backend``: ``None`` uses the Triton kernel on CUDA when block_size is a power of two
    >= 16, and ``"sdpa"`` (gather the pages, one batched torch SDPA) otherwise (CPU, or a
    page size the kernel cannot take); ``"triton"`` (raises on such a page size),
    ``"sdpa"`` or ``"reference"`` (float32, one sequence at a time) forces one.
    """
    _check(q, k_cache, v_cache, block_table, context_lens)
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    page = k_cache.shape[1]
    if backend is None:
        backend = _auto_backend(q.is_cuda, page)
    if backend == "sdpa":
        return paged_decode_sdpa(q, k_cache, v_cache, block_table, context_lens, scale)
    if backend == "reference":
        return paged_decode_reference(
            q, k_cache, v_cache, block_table, context_lens, softmax_scale=scale
        )
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'sdpa', 'reference' or None, got {backend!r}")
    if not _triton_page_ok(page):
        raise ValueError(
            f"the Triton decode kernel needs a power-of-two block_size >= 16, got {page}; "
            "use backend=None or 'sdpa'"
        )
    if not q.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1"
        )
    from ds_attention.kernels.paged_decode import paged_decode_triton

    return paged_decode_triton(q, k_cache, v_cache, block_table, context_lens, scale)
