"""Multi-head / grouped-query attention for the llama family (DeepSeek-LLM, Coder v1)."""

from __future__ import annotations

import torch
from torch import nn

from ds_model.attend import attend, paged_decode
from ds_model.cache import PagedWriter
from ds_model.config import ModelConfig
from ds_model.context import ForwardContext
from ds_model.mlp import project
from ds_model.patterns import PatternAttention
from ds_model.rope import apply_rotary

__all__ = ["Attention"]


class Attention(nn.Module):
    """``x``: (batch, seqlen, hidden) -> (batch, seqlen, hidden). Caches key and value,
    (kv_heads, head_dim) each per token."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.softmax_scale = config.softmax_scale
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.pattern = None  # a per-query attention pattern, else ds-attention's call
        if config.attention.masked:
            self.pattern = PatternAttention(
                config.attention,
                hidden_size=hidden,
                num_heads=self.num_heads,
                d_qk=self.head_dim,
                d_v=self.head_dim,
            )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = project(self.q_proj, x).view(b, t, self.num_heads, self.head_dim)
        k = project(self.k_proj, x).view(b, t, self.num_kv_heads, self.head_dim)
        v = project(self.v_proj, x).view(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, ctx.cos, ctx.sin, interleaved=False)
        k = apply_rotary(k, ctx.cos, ctx.sin, interleaved=False)
        if isinstance(ctx.cache, PagedWriter):
            out = self._paged(q, k, v, ctx)
            return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim))
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, [k, v])
        if ctx.cu_seqlens is not None:  # packed tokens arrive as (tokens, 1, ...) rows
            q = q.reshape(1, b * t, *q.shape[2:])
        if self.pattern is not None:
            out = self.pattern(q, k, v, x, ctx, self.softmax_scale)
            return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim))
        out = attend(
            q,
            k,
            v,
            softmax_scale=self.softmax_scale,
            mask=ctx.mask,
            padding=ctx.padding,
            cu_seqlens=ctx.cu_seqlens,
            window=ctx.window,
            backend=ctx.backend,
        )
        return project(self.o_proj, out.reshape(b, t, self.num_heads * self.head_dim))

    def _paged(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """A serving step over the paged pool; rows are packed new tokens (N, 1, ...).
        Decode rows attend over the paged K/V in place (ds-attention's paged decode, the
        query heads of each kv head as one group); prefill rows attend over their
        gathered context. -> (N, 1, heads, head_dim)."""
        if self.pattern is not None:
            raise ValueError(
                f"attention kind={self.pattern.pattern.kind!r} cannot run over a paged cache"
            )
        cache: PagedWriter = ctx.cache
        cache.write(self.layer_idx, [k, v])
        n, rows = cache.num_decode, q.shape[0]
        outs = []
        if n:
            k_pages, v_pages = cache.pages(self.layer_idx)
            out = paged_decode(
                q[:n].reshape(n, self.num_heads, self.head_dim).to(k_pages.dtype),
                k_pages,
                v_pages,
                cache.block_tables,
                cache.context_lens,
                softmax_scale=self.softmax_scale,
                context_range=cache.context_range,
                backend=ctx.backend,
            )
            outs.append(out.to(q.dtype).unsqueeze(1))
        if n < rows:
            k_ctx, v_ctx = cache.context(self.layer_idx)
            out = attend(
                q[n:].reshape(1, rows - n, self.num_heads, self.head_dim),
                k_ctx,
                v_ctx,
                softmax_scale=self.softmax_scale,
                cu_seqlens=cache.prefill_cu_seqlens,
                window=ctx.window,
                backend=ctx.backend,
            )
            outs.append(out.reshape(rows - n, 1, self.num_heads, self.head_dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
