"""The attention of the per-query patterns: ``dynamic_window``, ``block_sparse``, ``nsa``.

Each query's visible keys depend only on its own position, its own query vector and the
keys up to it, never on a later token, so a forward over a whole sequence and a decode
over a KV cache agree, and training sees what generation will. The selections are
ds-attention's (``select_blocks``, as ``SparseAttention`` and ``NativeSparseAttention``
use) with one query per row instead of one query block, which is exactly what those
modules compute when they decode one token over a cache.

Where a pattern is a window, ds-attention's ``attention`` runs it; a per-query
selection is a token-level mask, which ds-attention's kernels (one block layout per
query block) cannot express, so torch's SDPA runs it with the mask materialised.
Padded batches and packed sequences run one sequence at a time (host loop).

Tensors as ``ds_model.attend``: ``q`` (batch, seqlen_q, heads, d_qk), ``k`` (batch,
seqlen_k, kv_heads, d_qk), ``v`` (batch, seqlen_k, kv_heads, d_v), bottom-right aligned.
"""

from __future__ import annotations

import ds_attention
import torch
import torch.nn.functional as F
from ds_attention import dynamic_window, select_blocks
from torch import nn

from ds_model.attention_pattern import AttentionPattern
from ds_model.context import ForwardContext

__all__ = ["PatternAttention"]

# dynamic_window's cap: from position DYNAMIC_FULL - 1 on, every query sees 512 keys back.
_DYNAMIC_CAP = dynamic_window(1 << 30)
_DYNAMIC_FULL = 2 * _DYNAMIC_CAP


class PatternAttention(nn.Module):
    """One layer's attention under a per-query pattern; holds ``nsa``'s learned
    compression and branch gate (parameters ``k_compress``, ``v_compress``,
    ``k_block_pos``, ``v_block_pos``, ``gate``)."""

    def __init__(
        self,
        pattern: AttentionPattern,
        *,
        hidden_size: int,
        num_heads: int,
        d_qk: int,
        d_v: int,
    ) -> None:
        super().__init__()
        if not pattern.masked:
            raise ValueError(f"attention kind={pattern.kind!r} needs no PatternAttention")
        self.pattern, self.num_heads = pattern, num_heads
        if pattern.kind == "nsa":
            bs = pattern.block_size
            self.k_compress = nn.Linear(bs * d_qk, d_qk, bias=False)
            self.v_compress = nn.Linear(bs * d_v, d_v, bias=False)
            self.k_block_pos = nn.Parameter(torch.zeros(bs, d_qk))
            self.v_block_pos = nn.Parameter(torch.zeros(bs, d_v))
            self.gate = nn.Linear(hidden_size, 3 * num_heads)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        ctx: ForwardContext,
        softmax_scale: float,
    ) -> torch.Tensor:
        """``x``: the layer input under ``q``'s rows, (batch, seqlen_q, hidden)."""
        if ctx.mask is not None:
            raise ValueError(
                f"attention kind={self.pattern.kind!r} chooses each query's keys itself; "
                "a caller's mask cannot be combined with it"
            )
        gate = None
        if self.pattern.kind == "nsa":
            gate = torch.sigmoid(self.gate(x.reshape(*q.shape[:2], -1)))
            gate = gate.view(*q.shape[:2], 3, self.num_heads, 1).to(q.dtype)
        if ctx.padding is not None:
            return self._padded(q, k, v, gate, ctx.padding.key_valid, softmax_scale, ctx)
        if ctx.cu_seqlens is not None:
            return self._packed(q, k, v, gate, ctx.cu_seqlens, softmax_scale, ctx)
        return self._sequence(q, k, v, gate, softmax_scale, ctx.backend)

    def _padded(self, q, k, v, gate, key_valid, scale, ctx) -> torch.Tensor:
        """Each row's real tokens as one sequence: the real queries are the last real
        keys. Padded query slots get zeros."""
        t = q.shape[1]
        rows = []
        for b in range(q.shape[0]):
            real_k, real_q = key_valid[b], key_valid[b, -t:]
            row = q.new_zeros(t, q.shape[2], v.shape[-1])
            if bool(real_q.any()):
                g = gate[b : b + 1, real_q] if gate is not None else None
                out = self._sequence(
                    q[b : b + 1, real_q],
                    k[b : b + 1, real_k],
                    v[b : b + 1, real_k],
                    g,
                    scale,
                    ctx.backend,
                )
                row = row.index_put((real_q.nonzero()[:, 0],), out[0])
            rows.append(row)
        return torch.stack(rows)

    def _packed(self, q, k, v, gate, cu_seqlens, scale, ctx) -> torch.Tensor:
        cu_q, cu_k = (c.tolist() for c in cu_seqlens)
        outs = []
        for i in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            g = gate[:, qs] if gate is not None else None
            outs.append(self._sequence(q[:, qs], k[:, ks], v[:, ks], g, scale, ctx.backend))
        return torch.cat(outs, dim=1)

    def _sequence(self, q, k, v, gate, scale, backend) -> torch.Tensor:
        """Every row of the batch is one sequence of ``seqlen_k`` real keys."""
        if q.shape[1] == 0:
            return q.new_zeros(*q.shape[:3], v.shape[-1])
        kind = self.pattern.kind
        if kind == "dynamic_window":
            return self._dynamic(q, k, v, scale, backend)
        if kind == "block_sparse":
            return self._block_sparse(q, k, v, scale)
        return self._nsa(q, k, v, gate, scale, backend)

    def _dynamic(self, q, k, v, scale, backend) -> torch.Tensor:
        t, s = q.shape[1], k.shape[1]
        first = s - t  # position of query row 0
        split = min(t, max(0, _DYNAMIC_FULL - 1 - first))  # rows before the cap
        outs = []
        if split:
            p = torch.arange(first, first + split, device=q.device)
            keys = torch.arange(first + split, device=q.device)
            width = torch.clamp((p + 1) // 2, max=_DYNAMIC_CAP)
            visible = (keys[None] <= p[:, None]) & (keys[None] >= (p - width)[:, None])
            outs.append(
                _masked(q[:, :split], k[:, : first + split], v[:, : first + split], visible, scale)
            )
        if split < t:  # capped rows: an ordinary causal window, ds-attention's kernel
            outs.append(
                ds_attention.attention(
                    q[:, split:],
                    k,
                    v,
                    causal=True,
                    window=(_DYNAMIC_CAP, 0),
                    softmax_scale=scale,
                    backend=backend,
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _block_sparse(self, q, k, v, scale) -> torch.Tensor:
        bs = self.pattern.block_size
        with torch.no_grad():
            pooled = _block_means(k, bs)  # (batch, k_blocks, kv_heads, d)
            groups = q.shape[2] // k.shape[2]
            pooled = pooled.repeat_interleave(groups, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q.detach().float(), pooled)
            scores = scores / q.shape[-1] ** 0.5
            layout = _select(
                scores,
                q.shape[1],
                k.shape[1],
                bs,
                self.pattern.sparse_ratio,
                self.pattern.local_blocks,
            )
        return _masked(q, k, v, _token_mask(layout, bs, q.shape[1], k.shape[1]), scale)

    def _nsa(self, q, k, v, gate, scale, backend) -> torch.Tensor:
        bs, t, s = self.pattern.block_size, q.shape[1], k.shape[1]
        heads, kv_heads = q.shape[2], k.shape[2]
        groups = heads // kv_heads
        k_cmp = _compress(k, bs, self.k_block_pos, self.k_compress)
        v_cmp = _compress(v, bs, self.v_block_pos, self.v_compress)
        # Compressed branch: each query attends the complete blocks ending at or before it.
        kc = k_cmp.repeat_interleave(groups, dim=2).float()
        vc = v_cmp.repeat_interleave(groups, dim=2).float()
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kc) * scale
        pos = torch.arange(s - t, s, device=q.device)
        block_end = (torch.arange(k_cmp.shape[1], device=q.device) + 1) * bs - 1
        visible = block_end[None, :] <= pos[:, None]
        row_any = visible.any(-1, keepdim=True)
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~row_any, 0.0)
        probs = scores.softmax(-1) * row_any
        out_cmp = torch.einsum("bhqk,bkhd->bqhd", probs, vc).to(q.dtype)
        # Selected branch: the compressed probabilities, summed over a GQA group, rank
        # the key blocks per query; the top num_selected (plus block 0 and the local
        # block) are read at full resolution.
        with torch.no_grad():
            b, nk = q.shape[0], -(-s // bs)
            shared = probs.detach().view(b, kv_heads, groups, t, -1).sum(2)
            shared = F.pad(shared, (0, nk - shared.shape[-1])).repeat_interleave(groups, 1)
            layout = _select(shared, t, s, bs, self.pattern.num_selected, 1)
        out_slc = _masked(q, k, v, _token_mask(layout, bs, t, s), scale)
        out_win = ds_attention.attention(
            q,
            k,
            v,
            causal=True,
            window=(self.pattern.window - 1, 0),
            softmax_scale=scale,
            backend=backend,
        )
        return gate[:, :, 0] * out_cmp + gate[:, :, 1] * out_slc + gate[:, :, 2] * out_win


def _select(scores, seqlen_q: int, seqlen_k: int, block: int, keep, local_blocks: int):
    """Per query row (at position ``seqlen_k - seqlen_q + i``): the key blocks up to its
    own are candidates, its own is local. ``scores`` (batch, heads, seqlen_q, k_blocks)."""
    device = scores.device
    local = torch.arange(seqlen_k - seqlen_q, seqlen_k, device=device) // block
    candidates = torch.arange(scores.shape[-1], device=device)[None, :] <= local[:, None]
    return select_blocks(scores, candidates, local, keep, local_blocks)


def _token_mask(layout: torch.Tensor, block: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """A per-query block layout (batch, heads, seqlen_q, k_blocks) as a causal token mask
    (batch, heads, seqlen_q, seqlen_k)."""
    keys = layout.repeat_interleave(block, dim=-1)[..., :seqlen_k]
    pos = torch.arange(seqlen_k - seqlen_q, seqlen_k, device=layout.device)
    causal = torch.arange(seqlen_k, device=layout.device)[None, :] <= pos[:, None]
    return keys & causal


def _block_means(k: torch.Tensor, block: int) -> torch.Tensor:
    """(batch, seqlen, heads, d) -> (batch, ceil(seqlen / block), heads, d) float32 means
    over the keys each block holds (the last one may be partial)."""
    b, s, h, d = k.shape
    pad = (-s) % block
    x = F.pad(k.float(), (0, 0, 0, 0, 0, pad)).view(b, -1, block, h, d).sum(2)
    counts = F.pad(k.new_ones(s, dtype=torch.float32), (0, pad)).view(-1, block).sum(-1)
    return x / counts[None, :, None, None]


def _compress(x: torch.Tensor, block: int, block_pos: torch.Tensor, proj: nn.Linear):
    """Complete blocks of ``x`` (batch, seqlen, heads, d) -> (batch, blocks, heads, d)."""
    b, s, h, d = x.shape
    n = s // block
    x = x[:, : n * block].view(b, n, block, h, d)
    x = (x + block_pos[None, None, :, None, :].to(x.dtype)).transpose(2, 3)
    return proj(x.reshape(b, n, h, block * d))


def _masked(q, k, v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention under a bool mask broadcastable to (batch, heads, seqlen_q, seqlen_k);
    every row sees at least its own key."""
    d_v = v.shape[-1]
    if q.is_cpu:
        # torch's fused CPU attention takes an additive float mask and needs d_v == d_qk;
        # a bool mask or MLA's narrower values fall back to the math path. Measured at
        # 2048 tokens, 4 heads, d_qk 48 / d_v 32, forward + backward: 4.2 s as given,
        # 1.8 s with zero-padded values (columns sliced off) and a float mask (EPYC-512
        # host of docs/benchmarks.md, 2026-12-06).
        v = F.pad(v, (0, max(0, q.shape[-1] - d_v)))
        visible = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~visible, float("-inf")
        )
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=visible,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)[..., :d_v]
