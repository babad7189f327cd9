"""``NativeSparseAttention``: compressed, selected and sliding branches, gated per head.

After DeepSeek's NSA (Yuan et al., 2025), simplified where noted in docs/ds-attention.md:

- compressed: every ``block_size`` keys (non-overlapping) are compressed by a learned
  linear map of the block (with a learned intra-block position embedding) into one key
  and one value; a query attends the compressed blocks that end at or before it.
- selected: the compressed attention probabilities, summed over the heads of a GQA group
  and over the rows of a query block, rank the key blocks; the top ``num_selected`` (plus
  the first block and the local block) go to the block-sparse kernel at full resolution.
- sliding: the last ``window`` keys through the kernel's window.

``out = sum_b sigmoid(gate_b(x)) * branch_b`` per head, then ``o_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_attention.api import attention
from ds_attention.modules.attention import Attention
from ds_attention.modules.cache import KVCache
from ds_attention.modules.selection import candidate_blocks, select_blocks


class NativeSparseAttention(Attention):
    """x (batch, seqlen, dim) -> (batch, seqlen, dim). ``block_size`` is both the
    compression and the selection block (a power of two >= 16)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        block_size: int = 32,
        num_selected: int = 4,
        window: int = 128,
        bias: bool = False,
        backend: str | None = None,
    ):
        super().__init__(dim, num_heads, num_kv_heads, bias=bias, causal=True, backend=backend)
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if num_selected < 1:
            raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.block_size, self.num_selected, self.sliding = block_size, num_selected, window
        d = self.head_dim
        self.k_compress = nn.Linear(block_size * d, d, bias=False)
        self.v_compress = nn.Linear(block_size * d, d, bias=False)
        self.block_pos = nn.Parameter(torch.zeros(block_size, d))
        self.gate = nn.Linear(dim, 3 * num_heads)
        with torch.no_grad():
            # Start as the average of the compressed block and mix the branches evenly.
            eye = torch.eye(d).repeat(1, block_size) / block_size
            self.k_compress.weight.copy_(eye)
            self.v_compress.weight.copy_(eye)
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    def compress(self, k: torch.Tensor, v: torch.Tensor):
        """(batch, seqlen_k, kv_heads, d) -> (batch, n_blocks, kv_heads, d), complete
        blocks only."""
        b, s, h, d = k.shape
        n = s // self.block_size

        def squash(x, proj):
            x = x[:, : n * self.block_size].view(b, n, self.block_size, h, d)
            x = (x + self.block_pos[None, None, :, None, :].to(x.dtype)).transpose(2, 3)
            return proj(x.reshape(b, n, h, self.block_size * d))

        return squash(k, self.k_compress), squash(v, self.v_compress)

    def compressed_branch(self, q, k_cmp, v_cmp, seqlen_k):
        """Explicit attention over compressed blocks (short: seqlen_k / block_size);
        returns the output and the probabilities (batch, heads, seqlen_q, n_blocks)."""
        groups = self.num_heads // self.num_kv_heads
        kc = k_cmp.repeat_interleave(groups, dim=2).float()
        vc = v_cmp.repeat_interleave(groups, dim=2).float()
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kc) * self.head_dim**-0.5
        pos = torch.arange(q.shape[1], device=q.device) + (seqlen_k - q.shape[1])
        block_end = (torch.arange(k_cmp.shape[1], device=q.device) + 1) * self.block_size - 1
        visible = block_end[None, :] <= pos[:, None]
        row_any = visible.any(-1, keepdim=True)
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~row_any, 0.0)
        probs = scores.softmax(-1) * row_any
        out = torch.einsum("bhqk,bkhd->bqhd", probs, vc).to(q.dtype)
        return out, probs

    def selection(self, probs: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
        """Bool layout (batch, heads, q_blocks, k_blocks) from compressed attention."""
        bs = self.block_size
        b, _, _, n_cmp = probs.shape
        nq, nk = -(-seqlen_q // bs), -(-seqlen_k // bs)
        groups = self.num_heads // self.num_kv_heads
        shared = probs.view(b, self.num_kv_heads, groups, seqlen_q, n_cmp).sum(2)
        pad = nq * bs - seqlen_q
        shared = torch.nn.functional.pad(shared, (0, nk - n_cmp, 0, pad))
        per_block = shared.view(b, self.num_kv_heads, nq, bs, nk).sum(3)
        scores = per_block.repeat_interleave(groups, dim=1)
        cand, local = candidate_blocks(seqlen_q, seqlen_k, bs, True, probs.device)
        return select_blocks(scores, cand, local, self.num_selected, 1)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, cache)
        sq, sk = q.shape[1], k.shape[1]
        k_cmp, v_cmp = self.compress(k, v)
        out_cmp, probs = self.compressed_branch(q, k_cmp, v_cmp, sk)
        with torch.no_grad():
            layout = self.selection(probs, sq, sk)
        out_slc = attention(
            q, k, v, causal=True, block_mask=layout, block_size=self.block_size,
            backend=self.backend,
        )  # fmt: skip
        out_win = attention(q, k, v, causal=True, window=self.sliding - 1, backend=self.backend)
        g = torch.sigmoid(self.gate(x)).view(*x.shape[:2], 3, self.num_heads, 1)
        out = g[:, :, 0] * out_cmp + g[:, :, 1] * out_slc + g[:, :, 2] * out_win
        return self.o_proj(out.flatten(2))
