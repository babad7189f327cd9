"""Top-k key-block selection: the block layouts SparseAttention and NSA hand the kernel
(``select_blocks`` is public, for models that select per query row themselves).

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
    """Keep, per (batch, head, query row), the best-scoring candidate key blocks: the
    top-k block selection of ``SparseAttention`` and ``NativeSparseAttention``.

    ``scores`` float (batch, heads, q_rows, k_blocks); a query row is a query block (as
    the modules use it) or a single query (per-token selection). ``candidates`` bool
    (q_rows, k_blocks): the key blocks each row may see at all. ``local`` integer
    (q_rows,): the key block holding each row's last position. ``keep``: a float
    fraction in (0, 1] of each row's candidates (rounded up) or an int count >= 1.
    Block 0 (a sink) and the ``local_blocks`` blocks ending at ``local`` are always
    kept, where they are candidates, and rank first within the budget. Returns a bool
    layout (batch, heads, q_rows, k_blocks), for ``attention(..., block_mask=...)``
    when rows are query blocks. Not differentiable (a selection).
    """
    _check_selection(scores, candidates, local, keep, local_blocks)
    nk = scores.shape[-1]
    n_cand = candidates.sum(-1)  # (q_rows,)
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


def _check_selection(scores, candidates, local, keep, local_blocks) -> None:
    def got(x) -> str:
        return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)

    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(
            f"scores must be a (batch, heads, q_rows, k_blocks) tensor, got {got(scores)}"
        )
    rows, blocks = scores.shape[-2:]
    if not (
        isinstance(candidates, torch.Tensor)
        and candidates.dtype == torch.bool
        and candidates.shape == (rows, blocks)
    ):
        raise ValueError(
            f"candidates must be a bool tensor of shape (q_rows, k_blocks) = ({rows}, {blocks}), "
            f"got {got(candidates)}"
        )
    if not (
        isinstance(local, torch.Tensor)
        and not local.dtype.is_floating_point
        and local.dtype != torch.bool
        and local.shape == (rows,)
    ):
        raise ValueError(f"local must be an integer tensor of shape ({rows},), got {got(local)}")
    fraction = isinstance(keep, float) and 0 < keep <= 1
    count = isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1
    if not (fraction or count):
        raise ValueError(f"keep must be a float in (0, 1] or an int >= 1, got {keep!r}")
    if isinstance(local_blocks, bool) or not isinstance(local_blocks, int) or local_blocks < 0:
        raise ValueError(f"local_blocks must be an int >= 0, got {local_blocks!r}")


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
