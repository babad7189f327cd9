"""Explicit boolean masks: what the reference and the SDPA path materialise.

The kernels never build these; they compute the same predicate per tile. Query row ``i``
of a ``seqlen_q`` x ``seqlen_k`` problem sits at absolute position
``p = i + seqlen_k - seqlen_q`` (bottom-right alignment, as in flash-attn >= 2.1, so a
query block appended after a KV cache lines up with its own keys). Key ``j`` is visible
when every enabled rule allows it:

- causal: ``j <= p``
- window ``(left, right)``: ``p - left <= j <= p + right`` (``None`` = unbounded side)
- block_mask: ``block_mask[b, h, i // block_size, j // block_size]``
"""

from __future__ import annotations

import torch


def token_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window: tuple[int | None, int | None] | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Bool (seqlen_q, seqlen_k): True where a key is visible. ``None`` means all visible."""
    if not causal and window is None:
        return None
    pos = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        mask &= key <= pos
    if window is not None:
        left, right = window
        if left is not None:
            mask &= key >= pos - left
        if right is not None:
            mask &= key <= pos + right
    return mask


def expand_block_mask(
    block_mask: torch.Tensor, block_size: int, seqlen_q: int, seqlen_k: int
) -> torch.Tensor:
    """(B, H, q_blocks, k_blocks) -> (B, H, seqlen_q, seqlen_k) token-level bool mask."""
    full = block_mask.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return full[:, :, :seqlen_q, :seqlen_k]


def dense_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window: tuple[int | None, int | None] | None,
    block_mask: torch.Tensor | None,
    block_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The full visibility mask, broadcastable to (batch, heads, seqlen_q, seqlen_k)."""
    mask = token_mask(seqlen_q, seqlen_k, causal=causal, window=window, device=device)
    if mask is not None:
        mask = mask[None, None]
    if block_mask is not None:
        blocks = expand_block_mask(block_mask.to(device), block_size, seqlen_q, seqlen_k)
        mask = blocks if mask is None else mask & blocks
    return mask


def dynamic_window(seq_length: int) -> int:
    """DeepSeek's published adaptive window: ``min(512, seq_length // 2)``."""
    return min(512, seq_length // 2)


def dynamic_attention_mask(input_ids: torch.Tensor, max_length: int) -> torch.Tensor:
    """DeepSeek's published dynamic attention mask, as a bool tensor (batch, seq_length, seq_length).

    Causal AND a local window of ``w = min(512, seq_length // 2)``: query ``i`` sees keys
    ``max(0, i - w) <= j <= i``. Pass ``window=dynamic_window(seq_length)`` with
    ``causal=True`` to :func:`ds_attention.attention` for the same pattern without
    materialising this tensor. One edge differs on purpose: at ``seq_length == 1`` the
    published loop leaves the row empty (``w == 0``), so this function returns an all-False
    mask as the published loop does, while ``window=0`` lets the token see itself.

    ``input_ids``: (batch, seq_length) integer ids; only the shape and device are used.
    ``max_length``: the model's context limit; ``seq_length`` above it is a ValueError
    (the published function took the argument without using it).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise ValueError(f"input_ids must be a 2-D tensor (batch, seq_length), got {shape}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    batch, seq_length = input_ids.shape
    if seq_length > max_length:
        raise ValueError(f"input_ids has seq_length {seq_length} > max_length {max_length}")
    w = dynamic_window(seq_length)
    mask = token_mask(seq_length, seq_length, causal=True, window=(w, w), device=input_ids.device)
    if w == 0:
        mask = torch.zeros_like(mask)
    return mask.unsqueeze(0).expand(batch, -1, -1)
