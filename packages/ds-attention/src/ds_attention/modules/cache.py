"""A contiguous KV cache for incremental decoding, in the gpt-fast style.

Buffers (batch, max_length, kv_heads, head_dim) are allocated on the first update, to
the shape, dtype and device of the first keys; each ``update`` writes the new keys at
the current length and returns views of everything cached so far.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer cache. ``update(k, v)`` takes k (batch, new, kv_heads, d_qk) and v
    (batch, new, kv_heads, d_v) and returns the cached (batch, length, kv_heads, d)."""

    def __init__(self, max_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.max_length = max_length
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            b, _, h, _ = k.shape
            self.k = k.new_zeros(b, self.max_length, h, k.shape[-1])
            self.v = v.new_zeros(b, self.max_length, h, v.shape[-1])
        if k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:]:
            raise ValueError(
                f"k of shape {tuple(k.shape)} does not fit the cache "
                f"(batch, *, kv_heads, head_dim) = {tuple(self.k.shape)}"
            )
        new = k.shape[1]
        if self.length + new > self.max_length:
            raise ValueError(
                f"cache holds {self.length} of max_length {self.max_length} tokens; "
                f"cannot add {new} more"
            )
        end = self.length + new
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def reset(self) -> None:
        self.length = 0
