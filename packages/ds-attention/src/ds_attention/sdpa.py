"""torch.nn.functional.scaled_dot_product_attention behind the MaskSpec: the CPU default.

A mask is passed only where the pattern needs one: dense non-causal attention and causal
attention whose bottom-right alignment equals SDPA's top-left one (``seqlen_q ==
seqlen_k``, or a single query row) go through SDPA's fused paths without any mask.
Sliding windows and block-sparse layouts on long inputs run chunk by chunk: each chunk
of queries (256 rows; with a layout, one query block of at least 64 rows) calls SDPA on
only the keys some of its rows can see (a slice for a window, a gather of the visited
key blocks for a layout), so the work shrinks with the pattern as it does in the kernel,
instead of masking a full seqlen_q x seqlen_k product.

Packed (cu_seqlens) batches run one sequence at a time, except small ones without a
block layout (total queries x total keys <= ``PACKED_ONE_CALL_MAX``, e.g. a padded
batch-8 decode step): those run as one SDPA call with a block-diagonal mask, since a
Python loop of tiny calls costs more than the few masked-out products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_attention.masks import dense_mask
from ds_attention.protocol import MaskSpec

# enable_gqa arrived in torch 2.5; parse the version rather than probing the builtin.
HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_layout(q, k, v, scale: float):
    """(batch, seq, heads, dim) -> SDPA's (batch, heads, seq, dim), plus its kwargs;
    grouped-query heads through ``enable_gqa`` or, on old torch, repeated kv heads."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kwargs: dict = {"scale": scale}
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        if HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            kt = kt.repeat_interleave(groups, dim=1)
            vt = vt.repeat_interleave(groups, dim=1)
    return qt, kt, vt, kwargs


def _sdpa_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    block_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    sq, sk = q.shape[1], k.shape[1]
    qt, kt, vt, kwargs = _sdpa_layout(q, k, v, scale)
    if sk == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    simple = spec.window is None and block_mask is None
    if simple and (not spec.causal or sq == 1):
        out = F.scaled_dot_product_attention(qt, kt, vt, **kwargs)
        return out.transpose(1, 2)
    if simple and sq == sk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kwargs)
        return out.transpose(1, 2)
    if _worth_chunking(sq, sk, spec, block_mask):
        return _sdpa_chunked(q, k, v, spec, block_mask, scale, kwargs)
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


CHUNK = 256


def _bounds(spec: MaskSpec) -> tuple[int | None, int | None]:
    left, right = spec.window if spec.window is not None else (None, None)
    if spec.causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _worth_chunking(sq: int, sk: int, spec: MaskSpec, block_mask) -> bool:
    left, right = _bounds(spec)
    if block_mask is not None:
        return sq >= 2 * max(CHUNK, spec.block_size)
    if left is None or right is None:
        return False
    return sq >= 2 * CHUNK and left + right + CHUNK < sk // 2


def _sub_mask(rows, cols, sq, sk, spec: MaskSpec, block_mask):
    """The visibility predicate on a (rows x cols) sub-rectangle, (B|1, H|1, R, C)."""
    pos = rows[:, None] + (sk - sq)
    key = cols[None, :]
    mask = torch.ones(rows.numel(), cols.numel(), dtype=torch.bool, device=rows.device)
    left, right = _bounds(spec)
    if left is not None:
        mask &= key >= pos - left
    if right is not None:
        mask &= key <= pos + right
    mask = mask[None, None]
    if block_mask is not None:
        bs = spec.block_size
        mask = mask & block_mask[:, :, rows // bs][:, :, :, cols // bs]
    return mask


def _sdpa_chunked(q, k, v, spec: MaskSpec, block_mask, scale, kwargs):
    sq, sk = q.shape[1], k.shape[1]
    left, right = _bounds(spec)
    # One query block per chunk with a layout: the union of visited key blocks over
    # several query blocks would approach dense again.
    chunk = CHUNK if block_mask is None else max(spec.block_size, 64)
    dev = q.device
    if q.shape[2] != k.shape[2] and "enable_gqa" not in kwargs:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    outs = []
    for i0 in range(0, sq, chunk):
        i1 = min(i0 + chunk, sq)
        lo = 0 if left is None else max(0, i0 + sk - sq - left)
        hi = sk if right is None else min(sk, i1 - 1 + sk - sq + right + 1)
        cols = torch.arange(max(lo, 0), max(hi, lo), device=dev)
        if block_mask is not None and cols.numel():
            bs = spec.block_size
            visited = block_mask[:, :, i0 // bs : -(-i1 // bs)].any(dim=(0, 1, 2))
            cols = cols[visited[cols // bs]]
        rows = torch.arange(i0, i1, device=dev)
        if cols.numel() == 0:
            outs.append(q.new_zeros(q.shape[0], i1 - i0, q.shape[2], v.shape[-1]))
            continue
        contiguous = cols.numel() == int(cols[-1] - cols[0]) + 1
        if contiguous:
            kc, vc = k[:, int(cols[0]) : int(cols[-1]) + 1], v[:, int(cols[0]) : int(cols[-1]) + 1]
        else:
            kc, vc = k.index_select(1, cols), v.index_select(1, cols)
        mask = _sub_mask(rows, cols, sq, sk, spec, block_mask)
        row_any = mask.any(dim=-1, keepdim=True)
        all_rows = bool(row_any.all())
        if not all_rows:
            mask = mask.clone()
            mask[..., :1] |= ~row_any
        out = F.scaled_dot_product_attention(
            q[:, i0:i1].transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
            attn_mask=mask, **kwargs,
        )  # fmt: skip
        if not all_rows:
            out = out * row_any.to(out.dtype)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)


PACKED_ONE_CALL_MAX = 1 << 16


def _packed_mask(spec: MaskSpec, total_q: int, total_k: int, device) -> torch.Tensor:
    """(total_q, total_k) bool: the packed sequences' own causal / window patterns on the
    diagonal blocks, nothing across sequences."""
    cu_q = spec.cu_seqlens_q.to(device=device, dtype=torch.long)
    cu_k = spec.cu_seqlens_k.to(device=device, dtype=torch.long)
    len_q, len_k = cu_q.diff(), cu_k.diff()
    seqs = torch.arange(len(len_q), device=device)
    seq_q = seqs.repeat_interleave(len_q, output_size=total_q)
    seq_k = seqs.repeat_interleave(len_k, output_size=total_k)
    # Bottom-right alignment within each sequence: query i sits at len_k - len_q + i.
    pos_q = torch.arange(total_q, device=device) - cu_q[seq_q] + (len_k - len_q)[seq_q]
    pos_k = torch.arange(total_k, device=device) - cu_k[seq_k]
    pos_q, pos_k = pos_q[:, None], pos_k[None, :]
    mask = seq_q[:, None] == seq_k[None, :]
    left, right = _bounds(spec)
    if left is not None:
        mask &= pos_k >= pos_q - left
    if right is not None:
        mask &= pos_k <= pos_q + right
    return mask


def _sdpa_packed_one_call(q, k, v, spec: MaskSpec, scale: float) -> torch.Tensor:
    mask = _packed_mask(spec, q.shape[1], k.shape[1], q.device)
    qt, kt, vt, kwargs = _sdpa_layout(q, k, v, scale)
    row_any = mask.any(dim=-1, keepdim=True)
    all_rows = bool(row_any.all())
    if not all_rows:
        mask[..., :1] |= ~row_any  # SDPA gives NaN for a row with no visible key
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kwargs)
    if not all_rows:
        out = out * row_any.to(out.dtype)
    return out.transpose(1, 2)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, scale: float
) -> torch.Tensor:
    """q (batch, seqlen_q, heads, d_qk), k/v (batch, seqlen_k, kv_heads, d) -> out
    (batch, seqlen_q, heads, d_v). Packed batches (cu_seqlens): see the module docstring."""
    if spec.cu_seqlens_q is None:
        return _sdpa_one(q, k, v, spec, spec.block_mask, scale)
    one_call = spec.block_mask is None and q.shape[1] * k.shape[1] <= PACKED_ONE_CALL_MAX
    if one_call and len(spec.cu_seqlens_q) > 2 and k.shape[1] > 0:
        return _sdpa_packed_one_call(q, k, v, spec, scale)
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
