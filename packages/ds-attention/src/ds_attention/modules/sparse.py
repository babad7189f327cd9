"""``SparseAttention``: per query block, attend only the top ``sparse_ratio`` key blocks."""

from __future__ import annotations

import torch

from ds_attention.api import attention
from ds_attention.modules.attention import Attention
from ds_attention.modules.cache import KVCache
from ds_attention.modules.selection import candidate_blocks, pooled_block_scores, select_blocks


class SparseAttention(Attention):
    """x (batch, seqlen, dim) -> (batch, seqlen, dim); DeepSeek's published sparse attention class, made real.

    For each (batch, head, query block of ``block_size`` rows) the key blocks are ranked
    by a cheap estimate, mean-pooled queries against mean-pooled keys, and the top
    ``ceil(sparse_ratio * candidates)`` are kept, plus always the first block (an
    attention sink) and the ``local_blocks`` blocks ending at the query's own. The kept
    layout goes to the block-sparse kernel, which never touches the dropped blocks.
    ``sparse_ratio=1.0`` is dense attention. Selection is not differentiated; gradients
    flow through the attention over the selected blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sparse_ratio: float = 0.25,
        *,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        local_blocks: int = 1,
        causal: bool = True,
        bias: bool = False,
        backend: str | None = None,
    ):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, causal=causal, backend=backend)
        if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, (int, float)):
            raise TypeError(f"sparse_ratio must be a float in (0, 1], got {sparse_ratio!r}")
        if not 0 < sparse_ratio <= 1:
            raise ValueError(f"sparse_ratio must be in (0, 1], got {sparse_ratio}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1, got {local_blocks}")
        self.sparse_ratio = float(sparse_ratio)
        self.block_size, self.local_blocks = block_size, local_blocks

    def block_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The selected layout, bool (batch, heads, q_blocks, k_blocks)."""
        cand, local = candidate_blocks(
            q.shape[1], k.shape[1], self.block_size, self.causal, q.device
        )
        scores = pooled_block_scores(q, k, self.block_size)
        return select_blocks(scores, cand, local, self.sparse_ratio, self.local_blocks)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, cache)
        with torch.no_grad():
            layout = self.block_mask(q, k)
        out = attention(
            q, k, v, causal=self.causal, block_mask=layout, block_size=self.block_size,
            backend=self.backend,
        )  # fmt: skip
        return self.o_proj(out.flatten(2))
