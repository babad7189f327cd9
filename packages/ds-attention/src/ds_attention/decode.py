"""``paged_decode_attention()``: one new token per sequence against a paged KV cache.

This is the layout ds-batching's block manager hands out; ds-model's serving runner
decodes through it (GQA over paged K/V, and MLA's absorbed form over the paged latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_attention.backends import interpreting, triton_available
from ds_attention.reference import paged_decode_reference
from ds_attention.validate import SUPPORTED_DTYPES, check_softmax_scale


def _check(
    q,
    k_cache,
    v_cache,
    block_table,
    context_lens,
    v_head_dim,
    read_lens: bool = True,
    context_range=None,
) -> tuple[int, int]:
    """Validates the arguments; returns the shortest and longest context ((0, 0) for an
    empty batch). ``read_lens=False`` (a compiled or captured step) leaves
    ``context_lens`` on the device and returns the bounds the table allows, (0, capacity).
    ``context_range``: the caller's host-side (shortest, longest), checked against the
    capacity in place of reading ``context_lens`` back."""
    tensors = [("q", q, 3), ("k_cache", k_cache, 4)]
    if v_cache is not None:
        tensors.append(("v_cache", v_cache, 4))
    for name, t, nd in tensors:
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
    if v_cache is None:
        d_qk = k_cache.shape[3]
        if isinstance(v_head_dim, bool) or not isinstance(v_head_dim, int):
            raise ValueError(
                f"v_cache=None (values are k_cache's leading channels) needs v_head_dim, an "
                f"int in 1..{d_qk}; got {v_head_dim!r}"
            )
        if not 0 < v_head_dim <= d_qk:
            raise ValueError(f"v_head_dim={v_head_dim} must lie in 1..{d_qk} (k_cache head_dim)")
        v_cache = k_cache
    elif v_head_dim is not None:
        raise ValueError(f"v_head_dim={v_head_dim!r} is only for v_cache=None; got a v_cache too")
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
    if batch == 0:
        return 0, 0
    capacity = block_table.shape[1] * k_cache.shape[1]
    if not read_lens:
        return 0, capacity
    if context_range is not None:
        return _check_context_range(context_range, capacity)
    lens = context_lens.tolist()  # one host copy: cheaper than two reductions
    shortest, longest = min(lens), max(lens)
    if shortest < 0 or longest > capacity:
        raise ValueError(
            f"context_lens must lie in 0..max_blocks * block_size = {capacity}, got {lens}"
        )
    return shortest, longest


def _check_context_range(context_range, capacity: int) -> tuple[int, int]:
    ok = type(context_range) is tuple and len(context_range) == 2
    if not ok or type(context_range[0]) is not int or type(context_range[1]) is not int:
        ok = False
    if not ok or not 0 <= context_range[0] <= context_range[1] <= capacity:
        raise ValueError(
            f"context_range must be a tuple of two ints (shortest, longest) with "
            f"0 <= shortest <= longest <= max_blocks * block_size = {capacity}, "
            f"got {context_range!r}"
        )
    return context_range


def _triton_page_ok(page: int) -> bool:
    """The Triton kernel loads one page per tile: a power of two >= 16 (tl.dot's minimum)."""
    return page >= 16 and page & (page - 1) == 0


def _auto_backend(on_cuda: bool, page: int) -> str:
    """backend=None: Triton on CUDA, the torch path elsewhere; any page size must work by
    default, so one the kernel cannot take goes to the torch path instead of raising."""
    return "triton" if on_cuda and _triton_page_ok(page) and triton_available() else "torch"


def _gather_pages(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``cache[blocks]`` for a flat (n,) int64 list of block ids -> (n, block_size, ...).
    A contiguous pool is copied in whole-block rows by ``index_select``, 2-5x faster on
    CPU than advanced indexing's per-element gather (0.16 against 0.8 ms for 8 x 960
    latent tokens, one thread on the EPYC-512 host, 2026-12-06)."""
    if cache.is_contiguous():
        return cache.view(cache.shape[0], -1).index_select(0, blocks).view(-1, *cache.shape[1:])
    return cache[blocks]


def paged_decode_torch(
    q, k_cache, v_cache, block_table, context_lens, scale: float, lens_range, v_head_dim=None
):
    """The block-table-aware torch path (the CPU default): each sequence's live pages,
    and only those (the table is cut at the longest context), are copied once; the
    keys are cut at the longest context, with a key-padding mask only when some
    sequence is shorter (a batch of equal contexts, one client, needs none). Float32 with a ``v_cache`` (MHA/GQA), outside
    ``torch.compile``: one SDPA call reads the copied pages through strides, query heads
    grouped over their kv head (``enable_gqa``), with no per-head copy of K/V. Otherwise
    the query heads of each kv head are the rows of one batched matmul over per-head
    copies (no grouped-query expansion of K/V), in float32 on the CPU whatever the input
    dtype; compiled llama serving steps ran slower with the SDPA call inside them
    (ds-serve's bench_vs_transformers.py, 32 clients); ``v_cache=None``: the values are the first ``v_head_dim``
    channels of the copied keys (MLA's shared latent), so the pool is read once.
    ``lens_range``: (shortest, longest) of ``context_lens``."""
    shortest, longest = lens_range
    batch, heads, d_qk = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    d_v = v_head_dim if v_cache is None else v_cache.shape[3]
    if batch == 0:
        return q.new_zeros(0, heads, d_v)
    pages = max(1, -(-longest // page))
    # Keys past the longest context are cut off rather than masked: a batch of equal
    # contexts (one client) needs no mask at all.
    span = max(1, longest)
    if block_table.shape[1] != pages:
        block_table = block_table[:, :pages]
    blocks = block_table.reshape(-1)
    if blocks.dtype != torch.long or blocks.device != q.device:
        blocks = blocks.to(device=q.device, dtype=torch.long)
    if v_cache is not None and q.dtype == torch.float32 and not torch.compiler.is_compiling():
        return _paged_decode_sdpa(q, k_cache, v_cache, blocks, context_lens, scale, span, shortest)
    groups = heads // kv_heads
    # On the CPU a 16-bit batched matmul goes through oneDNN, which builds a kernel for
    # each new shape and runs these one-query products 5-9x slower than float32 (29
    # against 3-4 us a call, (1, 4, 80) x (1, 80, 64), one thread, EPYC-512): the
    # gathered copy is made float32, and the result cast back.
    products = torch.float32 if q.is_cpu and q.dtype != torch.float32 else q.dtype
    # (batch * kv_heads, groups, d) query rows against (batch * kv_heads, span, d) keys:
    # views when kv_heads is 1 (MLA), one copy of the gathered pages otherwise. Each
    # call below that would be a no-op (a view to the same shape, a cast to the same
    # dtype) is skipped: this runs once per layer per decode step, where a few
    # microseconds a call are a visible share of an eager batch-1 step of a small model
    # (docs/ds-attention.md, "Paged decode").
    width = pages * page
    k = _gather_pages(k_cache, blocks)
    k = k.view(batch, width, d_qk) if kv_heads == 1 else k.view(batch, width, kv_heads, d_qk)
    if span < width:  # narrow rather than [] indexing: cheaper per call
        k = k.narrow(1, 0, span)
    if k.dtype != products:
        k = k.to(products)
    if kv_heads > 1:
        k = k.transpose(1, 2).reshape(batch * kv_heads, span, d_qk)
    if v_cache is None:
        v = k.narrow(2, 0, d_v)
    else:
        v = _gather_pages(v_cache, blocks).view(batch, width, kv_heads, d_v)
        v = v.narrow(1, 0, span).to(products)
        v = (v.transpose(1, 2) if kv_heads > 1 else v).reshape(batch * kv_heads, span, d_v)
    out_dtype = q.dtype
    if q.dtype != products:
        q = q.to(products)
    if kv_heads > 1:
        q = q.reshape(batch * kv_heads, groups, d_qk)
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # a fresh tensor: scaled in place
    if shortest < span:
        lens = context_lens.to(device=q.device, dtype=torch.long)
        hidden = torch.arange(span, device=q.device)[None, :] >= lens[:, None]
        scores = scores.view(batch, kv_heads, groups, span)
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        scores = scores.view(batch * kv_heads, groups, span)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    out = torch.bmm(probs, v)
    if kv_heads > 1:
        out = out.view(batch, heads, d_v)
    if shortest == 0:  # a sequence with no context attends to nothing: zeros, not NaN
        out = out.masked_fill((context_lens == 0).to(q.device)[:, None, None], 0.0)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _paged_decode_sdpa(q, k_cache, v_cache, blocks, context_lens, scale, span, shortest):
    """Float32 MHA/GQA rows of ``paged_decode_torch``: the gathered pages stay (batch,
    span, kv_heads, d) and SDPA reads them as (batch, kv_heads, span, d) through
    strides. Against per-head copies and batched matmuls this measured 1.1-2.2x faster
    per layer in float32 and 0.2-0.4x in bfloat16 (batch 32, 12/4 heads, contexts up to
    48-160, one thread), hence float32 only (docs/ds-attention.md, "Paged decode")."""
    batch, heads, d_qk = q.shape
    kv_heads, d_v = k_cache.shape[2], v_cache.shape[3]
    width = blocks.shape[0] // batch * k_cache.shape[1]
    k = _gather_pages(k_cache, blocks).view(batch, width, kv_heads, d_qk).narrow(1, 0, span)
    v = _gather_pages(v_cache, blocks).view(batch, width, kv_heads, d_v).narrow(1, 0, span)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    mask = None
    if shortest < span:
        # A row with no context keeps key 0 visible (SDPA would give NaN for a row with
        # nothing to see); the caller zeroes such rows.
        lens = context_lens.to(device=q.device, dtype=torch.long).clamp(min=1)
        mask = (torch.arange(span, device=q.device)[None, :] < lens[:, None])[:, None, None]
    out = F.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads
    )
    out = out[:, :, 0]
    if shortest == 0:  # a sequence with no context attends to nothing: zeros, not NaN
        out = out.masked_fill((context_lens == 0).to(q.device)[:, None, None], 0.0)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
    v_head_dim: int | None = None,
    context_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over its cached tokens, read in place
    through the block table.

    q: (batch, heads, d_qk); k_cache: (num_blocks, block_size, kv_heads, d_qk); v_cache:
    (num_blocks, block_size, kv_heads, d_v); block_table: (batch, max_blocks) int32, row
    ``b`` lists the cache blocks of sequence ``b`` in order; context_lens: (batch,) int32,
    how many cached tokens sequence ``b`` attends to (write the new token's k/v first).
    Returns (batch, heads, d_v). A sequence with context 0 gets zeros. Forward only.
    Inside ``torch.compile`` or a CUDA-graph capture ``context_lens`` stays on the device
    (no host read, no check of its values): the torch path then reads every page of
    ``block_table``, masked past each context, so padding the table costs reads.

    ``v_cache=None`` with ``v_head_dim=d_v``: the values are the first ``d_v`` channels
    of each key, as in MLA's absorbed decode (key = latent + rope key, value = latent,
    one kv head shared by every query head, like FlashMLA); the pool is read once.

    ``context_range``: ``(min(context_lens), max(context_lens))`` as Python ints, when
    the caller built ``context_lens`` from host values (a serving step calls this once
    per layer with the same lengths): checked against the table's capacity instead of
    reading ``context_lens`` back, a device sync on CUDA. Ignored while compiling or
    capturing. It is trusted, as flash-attn trusts ``max_seqlen_k``: a range that
    does not match ``context_lens`` attends over the wrong keys.

    ``backend``: ``None`` uses the Triton kernel on CUDA when block_size is a power of two
    >= 16, and ``"torch"`` (copy the live pages once, batched matmuls) otherwise (CPU, or
    a page size the kernel cannot take); ``"triton"`` (raises on such a page size),
    ``"torch"`` or ``"reference"`` (float32, one sequence at a time) forces one.
    """
    # A step being compiled or captured cannot read context_lens on the host: the torch
    # path then attends over the whole table width under the key-padding mask.
    static = torch.compiler.is_compiling() or (
        q.is_cuda and torch.cuda.is_current_stream_capturing()
    )
    lens_range = _check(
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        v_head_dim,
        read_lens=not static,
        context_range=context_range,
    )
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    page = k_cache.shape[1]
    if backend is None:
        backend = _auto_backend(q.is_cuda, page)
    if backend == "torch":
        return paged_decode_torch(
            q, k_cache, v_cache, block_table, context_lens, scale, lens_range, v_head_dim
        )
    if v_cache is None:
        v_cache = k_cache[..., :v_head_dim]
    if backend == "reference":
        return paged_decode_reference(
            q, k_cache, v_cache, block_table, context_lens, softmax_scale=scale
        )
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'torch', 'reference' or None, got {backend!r}")
    if not _triton_page_ok(page):
        raise ValueError(
            f"the Triton decode kernel needs a power-of-two block_size >= 16, got {page}; "
            "use backend=None or 'torch'"
        )
    if not q.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1"
        )
    from ds_attention.kernels.paged_decode import paged_decode_triton

    return paged_decode_triton(q, k_cache, v_cache, block_table, context_lens, scale)
