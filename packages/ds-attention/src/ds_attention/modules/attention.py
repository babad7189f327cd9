"""``Attention``: multi-head / grouped-query attention with LoRA-friendly projections."""

from __future__ import annotations

import torch
from torch import nn

from ds_attention.api import attention
from ds_attention.modules.cache import KVCache


def check_heads(dim: int, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or num_heads % kv:
        raise ValueError(
            f"num_kv_heads ({kv!r}) must be a positive divisor of num_heads ({num_heads})"
        )
    return dim // num_heads, kv


class Attention(nn.Module):
    """x (batch, seqlen, dim) -> (batch, seqlen, dim).

    Projections are named ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` so LoRA tuners
    (PEFT, ds-lora) find them. ``causal`` and ``window`` follow :func:`attention`; pass
    a :class:`KVCache` as ``cache`` to decode incrementally (new queries are aligned to
    the end of the cached keys).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = False,
        causal: bool = True,
        window: int | tuple[int | None, int | None] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.head_dim, self.num_kv_heads = check_heads(dim, num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.causal, self.window, self.backend = causal, window, backend
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def project(self, x: torch.Tensor):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _qkv(self, x: torch.Tensor, cache: KVCache | None):
        """``project(x)`` with ``cache``'s earlier keys and values in front of k and v."""
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seqlen, dim), got shape {tuple(x.shape)}")
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.update(k, v)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, cache)
        out = attention(q, k, v, causal=self.causal, window=self.window, backend=self.backend)
        return self.o_proj(out.flatten(2))
