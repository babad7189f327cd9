"""The stable interface of ds-attention: one mask description, one backend protocol.

Tensor layout everywhere: ``(batch, seqlen, heads, head_dim)``, as in flash-attn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to, as one value.

    - ``causal``: query ``i`` sees keys ``j <= i`` (bottom-right aligned when the key
      sequence is longer than the query sequence, as with a KV cache).
    - ``window``: ``(left, right)``; query ``i`` sees keys ``i - left <= j <= i + right``;
      ``None`` on either side means unbounded on that side.
    - ``block_mask``: bool ``(batch, heads, q_blocks, k_blocks)``; a query block visits
      only the key blocks marked True. ``block_size`` is its edge in tokens.
    - ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 cumulative lengths of packed
      variable-length sequences (batch must then be 1).

    All constraints combine with AND.
    """

    causal: bool = True
    window: tuple[int | None, int | None] | None = None
    block_mask: torch.Tensor | None = None
    block_size: int = 64
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None


@runtime_checkable
class AttentionBackend(Protocol):
    """An attention implementation: the Triton kernels, torch SDPA and the reference."""

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask_spec: MaskSpec,
        cache: Any | None = None,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """``q``: (batch, seqlen_q, heads, d_qk); ``k``: (batch, seqlen_k, kv_heads, d_qk);
        ``v``: (batch, seqlen_k, kv_heads, d_v). Returns (batch, seqlen_q, heads, d_v)."""
        ...
