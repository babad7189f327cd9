"""Top-k key-block selection: the block layouts SparseAttention and NSA hand the kernel.

Blocks are indexed over positions: query row ``i`` of ``seqlen_q`` sits at position
``i + seqlen_k - seqlen_q``; query block ``qb`` covers rows ``qb*B .. qb*B + B - 1``
and key block ``kb`` covers keys ``kb*B .. kb*B + B - 1``.
"""

from __future__ import annotations

import math

import torch


def candidate_blocks(seqlen_q: int, seqlen_k: int, block: int, causal: bool, device):
    """Bool (q_blocks, k_blocks): key blocks a query block may see at all, and the
    local block index (the key block holding each query block's last position)."""
    nq, nk = -(-seqlen_q // block), -(-seqlen_k // block)
    last_row = torch.clamp(torch.arange(nq, device=device) * block + block - 1, max=seqlen_q - 1)
    last_pos = last_row + (seqlen_k - seqlen_q)
    local = torch.clamp(last_pos // block, min=0)
    kb = torch.arange(nk, device=device)
    if causal:
        cand = kb[None, :] <= local[:, None]
    else:
        cand = torch.ones(nq, nk, dtype=torch.bool, device=device)
    return cand, local


def select_blocks(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    local: torch.Tensor,
    keep: float | int,
    local_blocks: int,
) -> torch.Tensor:
    """Keep, per (batch, head, query block), the best-scoring candidate key blocks.

    ``scores`` (batch, heads, q_blocks, k_blocks); ``keep`` a fraction in (0, 1] of the
    candidates (rounded up) or an int count. Block 0 and the ``local_blocks`` blocks
    ending at ``local`` are always kept. Returns a bool layout of the same shape.
    """
    nk = scores.shape[-1]
    n_cand = candidates.sum(-1)  # (q_blocks,)
    if isinstance(keep, float):
        n_keep = torch.ceil(n_cand.float() * keep).long()
    else:
        n_keep = torch.clamp(n_cand, max=keep)
    scores = scores.float().masked_fill(~candidates, float("-inf"))
    kb = torch.arange(nk, device=scores.device)
    forced = (kb[None, :] == 0) | (
        (kb[None, :] <= local[:, None]) & (kb[None, :] > local[:, None] - local_blocks)
    )
    forced &= candidates
    # Forced blocks rank first, then by score; ranks below n_keep are kept.
    ranked = scores.masked_fill(forced, float("inf"))
    order = ranked.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, kb.expand_as(order).contiguous())
    keep_mask = rank < n_keep[:, None]
    return (keep_mask | forced) & candidates


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """A cheap block-score estimate: mean-pooled queries of each query block dotted with
    mean-pooled keys of each key block. q (batch, seqlen_q, heads, d), k (batch, seqlen_k,
    kv_heads, d) -> (batch, heads, q_blocks, k_blocks)."""

    def pool(x):
        b, s, h, d = x.shape
        pad = (-s) % block
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
        counts = torch.nn.functional.pad(x.new_ones(s), (0, pad)).view(-1, block).sum(-1)
        return x.view(b, -1, block, h, d).sum(2) / counts.clamp(min=1)[None, :, None, None]

    qp, kp = pool(q.detach()), pool(k.detach())
    groups = q.shape[2] // k.shape[2]
    kp = kp.repeat_interleave(groups, dim=2)
    return torch.einsum("bqhd,bkhd->bhqk", qp, kp) / math.sqrt(q.shape[-1])
