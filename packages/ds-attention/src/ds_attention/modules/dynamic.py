"""``DynamicAttention``: DeepSeek's published gated attention, ``g * attn(x) + (1 - g) * x``."""

from __future__ import annotations

import torch
from torch import nn

from ds_attention.api import attention
from ds_attention.masks import dynamic_window
from ds_attention.modules.attention import Attention
from ds_attention.modules.cache import KVCache


class DynamicAttention(nn.Module):
    """x (batch, seqlen, dim) -> (batch, seqlen, dim), with ``g = sigmoid(gate(x))``
    per channel mixing attention output and the input (the published form).

    The published form wrapped ``nn.MultiheadAttention`` without a mask; here the inner attention
    is :class:`Attention` and is causal by default (``causal=False`` gives the published
    bidirectional form). ``window="dynamic"`` applies the published dynamic mask
    (``min(512, seqlen // 2)`` keys back) through the kernel's window, never
    materialising it; an int or (left, right) is a fixed window.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        causal: bool = True,
        window: int | str | tuple[int | None, int | None] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(window, str) and window != "dynamic":
            raise ValueError(f"window must be None, an int, a pair or 'dynamic', got {window!r}")
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())
        self.attn = Attention(dim, heads, causal=causal, backend=backend)
        self.window = window

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seqlen, dim), got shape {tuple(x.shape)}")
        q, k, v = self.attn.project(x)
        if cache is not None:
            k, v = cache.update(k, v)
        window = dynamic_window(k.shape[1]) if self.window == "dynamic" else self.window
        out = attention(q, k, v, causal=self.attn.causal, window=window, backend=self.attn.backend)
        attn_out = self.attn.o_proj(out.flatten(2))
        g = self.gate(x)
        return g * attn_out + (1 - g) * x
