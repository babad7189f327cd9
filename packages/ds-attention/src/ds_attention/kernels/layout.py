"""Block-sparse layouts as the kernels read them: per query block, the list of key blocks.

A bool ``block_mask`` (batch, heads, q_blocks, k_blocks) becomes ``idx`` (same shape,
int32, the visited key-block indices first, ascending) and ``cnt`` (batch, heads,
q_blocks) int32, how many of them are valid. The backward's dk/dv pass needs the
transpose, per key block the query blocks that visit it. Broadcast dims (size 1) keep
stride 0 after ``expand``, so a layout shared by all heads is stored once.
"""

from __future__ import annotations

import torch


def block_lists(block_mask: torch.Tensor, batch: int, heads: int):
    """(B|1, H|1, nq, nk) bool -> (idx, cnt) expanded to (batch, heads, ...)."""
    cnt = block_mask.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not visited" puts visited blocks first, in ascending order.
    idx = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    idx = idx.expand(batch, heads, -1, -1)
    cnt = cnt.expand(batch, heads, -1)
    if idx.stride(-1) != 1 or cnt.stride(-1) != 1:
        raise RuntimeError("block lists must be contiguous in their last dim")
    return idx, cnt


def transposed_block_lists(block_mask: torch.Tensor, batch: int, heads: int):
    """Per key block, the query blocks that visit it (for the dk/dv backward pass)."""
    return block_lists(block_mask.transpose(-1, -2).contiguous(), batch, heads)
