"""Multi-head Latent Attention (DeepSeek V2/V3).

Keys and values are compressed into one ``kv_lora_rank`` latent per token plus a
``qk_rope_head_dim`` rope key shared by all heads; only those two are cached.

- naive path: expand the cached latents with ``kv_b_proj`` into per-head keys
  (nope + rope) and values, then attend. Cheapest for a prompt without history.
- absorbed path (decode): fold ``kv_b_proj``'s key half into the query and its value
  half into the output, so attention runs directly on the cached latents as
  multi-query attention with ``d_qk = kv_lora_rank + qk_rope_head_dim`` and
  ``d_v = kv_lora_rank``; nothing per-head is ever materialised for the history.

Both give the same result (tested); ``impl`` picks one: ``"auto"`` (naive for a pass
with no cached history, absorbed otherwise), ``"naive"`` or ``"absorb"``. Under the
serving runner's paged pool, decode rows always take the absorbed form over the pool in
place (ds-attention's paged decode with values = the latent); the runner gathers their
contexts instead only where ``can_absorb()`` is False for some layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ds_model.attend import attend, paged_decode
from ds_model.cache import PagedWriter
from ds_model.config import ModelConfig
from ds_model.context import ForwardContext
from ds_model.mlp import project
from ds_model.norm import RMSNorm
from ds_model.patterns import PatternAttention
from ds_model.rope import apply_rotary

__all__ = ["MLAttention"]

MLA_IMPLS = ("auto", "naive", "absorb")


class MLAttention(nn.Module):
    """``x``: (batch, seqlen, hidden) -> (batch, seqlen, hidden). Caches
    (kv_lora_rank + qk_rope_head_dim,) per token: the normalised latent, then the
    rotated rope key."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.softmax_scale = config.softmax_scale
        self.interleaved = config.interleaved_rope
        self.impl = "auto"
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)
        # A per-query attention pattern runs on the naive path's per-head keys.
        self.pattern = None
        if config.attention.masked:
            self.pattern = PatternAttention(
                config.attention,
                hidden_size=hidden,
                num_heads=self.num_heads,
                d_qk=self.qk_dim,
                d_v=self.v_dim,
            )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = project(self.q_proj, x)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, x)))
        q = q.view(b, t, self.num_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_a = project(self.kv_a_proj_with_mqa, x)
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], -1)
        # Rotate the query heads and the shared key together: one call instead of two.
        pe = apply_rotary(
            torch.cat((q_pe, k_pe.unsqueeze(2)), dim=2), ctx.cos, ctx.sin, self.interleaved
        )
        q_pe, k_pe = pe[:, :, : self.num_heads], pe[:, :, self.num_heads]
        # Under autocast the norm's float32 weight promotes its output; the cache and
        # kv_b_proj take the projection's dtype (kv_b_proj would cast it to that anyway).
        kv = torch.cat((self.kv_a_layernorm(latent).to(k_pe.dtype), k_pe), dim=-1)
        if isinstance(ctx.cache, PagedWriter):
            if self.pattern is not None:
                raise ValueError(
                    f"attention kind={self.pattern.pattern.kind!r} cannot run over a paged cache"
                )
            out = self._paged(q_nope, q_pe, kv, ctx)
            return project(self.o_proj, out.reshape(b, t, self.num_heads * self.v_dim))
        if ctx.cache is not None:
            (kv,) = ctx.cache.update(self.layer_idx, [kv])
        if ctx.cu_seqlens is not None:  # packed tokens arrive as (tokens, 1, ...) rows
            q_nope = q_nope.reshape(1, b * t, *q_nope.shape[2:])
            q_pe = q_pe.reshape(1, b * t, *q_pe.shape[2:])
        if self._absorb(ctx):
            out = self._absorbed(q_nope, q_pe, kv, ctx)
        else:
            out = self._naive(q_nope, q_pe, kv, ctx, x)
        return project(self.o_proj, out.reshape(b, t, self.num_heads * self.v_dim))

    def can_absorb(self) -> bool:
        """Whether the absorbed form may run: not forced naive, and ``kv_b_proj`` a plain
        linear (the absorbed path reads its weight; a wrapped projection, LoRA or
        quantized, keeps the naive path, which calls the module as it is), and no
        per-query attention pattern (it selects over the naive path's per-head keys)."""
        if self.impl not in MLA_IMPLS:
            raise ValueError(f"MLA impl={self.impl!r} is not one of {MLA_IMPLS}")
        plain = self.impl != "naive" and type(self.kv_b_proj) is nn.Linear
        return plain and self.pattern is None

    def _absorb(self, ctx: ForwardContext) -> bool:
        if not self.can_absorb():
            return False
        return self.impl == "absorb" or ctx.history

    def _paged(self, q_nope, q_pe, kv, ctx: ForwardContext) -> torch.Tensor:
        """A serving step over the paged pool; rows are packed new tokens (N, 1, ...).
        Decode rows run the absorbed form over the cached latent in place (ds-attention's
        paged decode, values = the latent); prefill rows attend over their gathered
        context as before. -> (N, 1, heads, v_dim)."""
        cache: PagedWriter = ctx.cache
        cache.write(self.layer_idx, [kv])
        n, rows = cache.num_decode, q_nope.shape[0]
        outs = []
        if n:
            outs.append(self._paged_decode(q_nope[:n], q_pe[:n], cache, ctx.backend))
        if n < rows:
            (context,) = cache.context(self.layer_idx)
            sub = dataclasses.replace(
                ctx, cu_seqlens=cache.prefill_cu_seqlens, history=cache.prefill_history
            )
            q_n = q_nope[n:].reshape(1, rows - n, self.num_heads, self.nope_dim)
            q_p = q_pe[n:].reshape(1, rows - n, self.num_heads, self.rope_dim)
            attend_ = self._absorbed if self._absorb(sub) else self._naive
            outs.append(attend_(q_n, q_p, context, sub).reshape(rows - n, 1, self.num_heads, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _paged_decode(self, q_nope, q_pe, cache: PagedWriter, backend) -> torch.Tensor:
        """``q_nope``/``q_pe``: (n, 1, heads, d) -> (n, 1, heads, v_dim). One kv head of
        (latent + rope key) shared by every query head, as FlashMLA decodes."""
        n, h = q_nope.shape[0], self.num_heads
        w = self.kv_b_proj.weight.view(h, self.nope_dim + self.v_dim, -1)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        # (h, n, nope) @ (h, nope, r) -> (h, n, r): the key half of kv_b_proj absorbed.
        q_latent = torch.bmm(q_nope.view(n, h, -1).transpose(0, 1), w_uk)
        q = torch.cat((q_latent.transpose(0, 1), q_pe.view(n, h, -1)), dim=-1)
        (pages,) = cache.pages(self.layer_idx)
        if q.dtype != pages.dtype:  # skipped casts: this runs per layer per decode step
            q = q.to(pages.dtype)
        out = paged_decode(
            q,
            pages.unsqueeze(2),
            None,
            cache.block_tables,
            cache.context_lens,
            softmax_scale=self.softmax_scale,
            context_range=cache.context_range,
            v_head_dim=self.kv_lora_rank,
            backend=backend,
        )  # (n, h, r)
        if out.dtype != w_uv.dtype:
            out = out.to(w_uv.dtype)
        # (h, n, r) @ (h, r, v) -> (h, n, v): the value half of kv_b_proj absorbed.
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2))
        return out.transpose(0, 1).unsqueeze(1)

    def _naive(self, q_nope, q_pe, kv, ctx: ForwardContext, x=None) -> torch.Tensor:
        b, s, _ = kv.shape
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if ctx.cu_seqlens is not None:
            # Packed: one row per context token (b is 1), so a LoRA adapter picked per
            # row (the runner's mixed batches) applies to each token's own sequence.
            latent = latent.reshape(b * s, self.kv_lora_rank)
        kv_heads = self.kv_b_proj(latent).view(b, s, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv_heads.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if self.pattern is not None:
            return self.pattern(q, k, v, x, ctx, self.softmax_scale)
        pad = self.qk_dim - self.v_dim
        if pad > 0 and ctx.mask is None and ctx.backend in (None, "sdpa") and _flash_pays(q):
            # torch's fused CPU attention needs d_v == d_qk, else SDPA falls back to the
            # math path (scores materialised, 2-3x slower at 512 tokens on the Intel
            # host, 2026-11-23). Zero columns in v give zero output columns, sliced off.
            v = torch.nn.functional.pad(v, (0, pad))
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
        return out[..., : self.v_dim]

    def _absorbed(self, q_nope, q_pe, kv, ctx: ForwardContext) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        # One new token per row with no window, packing or chosen backend skips
        # ds-attention (ds_model.attend, shortcut 3): eager decode is 6-10% slower
        # without it (measured in docs/benchmarks.md, "Decode paths").
        if _plain_decode(q_nope, ctx):
            key_valid = ctx.padding.key_valid if ctx.padding is not None else None
            return self._decode_one(q_nope, q_pe, kv, w_uk, w_uv, key_valid)
        if _masked_decode(q_nope, ctx):
            return self._decode_one(q_nope, q_pe, kv, w_uk, w_uv, visible=ctx.mask[:, 0, 0])
        q_latent = torch.matmul(q_nope.unsqueeze(-2), w_uk).squeeze(-2)  # (b, t, h, r)
        q = torch.cat((q_latent, q_pe), dim=-1)
        k = kv.unsqueeze(2)  # (batch, seqlen_k, 1, kv_lora_rank + rope_dim): MQA
        v = k[..., : self.kv_lora_rank]
        b, t, h, _ = q.shape
        if t == 1 and _unmasked(ctx) and ctx.window is None:
            # One new token sees every cached key, so its heads can be the query rows of
            # a single-head, non-causal call: no grouped-query expansion (2x faster on
            # the Intel host's CPU, 2026-11-23).
            out = attend(
                q.view(b, h, 1, -1),
                k,
                v,
                softmax_scale=self.softmax_scale,
                causal=False,
                backend=ctx.backend,
            )
            return torch.matmul(out.view(b, 1, h, 1, -1), w_uv.transpose(1, 2)).squeeze(-2)
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
        return torch.matmul(out.unsqueeze(-2), w_uv.transpose(1, 2)).squeeze(-2)  # (b, t, h, v)

    def _decode_one(
        self, q_nope, q_pe, kv, w_uk, w_uv, key_valid=None, visible=None
    ) -> torch.Tensor:
        """One new token per row attending to all ``s`` cached entries, in heads-major
        batched matmuls. ``q_nope``: (b, 1, h, nope), ``q_pe``: (b, 1, h, rope),
        ``kv``: (b, s, kv_lora_rank + rope) -> (b, 1, h, v_dim). ``key_valid`` (b, s)
        bool: a padded batch's real slots (its new token is the last); a row whose new
        token is padding gets zeros, as in the varlen path. ``visible`` (b, s) bool
        instead: exactly the slots each row sees, anywhere in the cache (a caller's
        single-query mask, as a CUDA-graph decode over the whole cache passes)."""
        b, h = q_nope.shape[0], self.num_heads
        # (h, b, nope) @ (h, nope, r) -> (h, b, r): the key half of kv_b_proj absorbed.
        q_latent = torch.bmm(q_nope.view(b, h, -1).transpose(0, 1), w_uk)
        q = torch.cat((q_latent.transpose(0, 1), q_pe.view(b, h, -1)), dim=-1)
        if kv.is_cpu and kv.dtype == torch.bfloat16:
            # CPU bfloat16 bmm goes through oneDNN, which builds a kernel for each new
            # shape (about 18 ms a call: docs/benchmarks.md, "CPU decode by weight
            # format"), and the cache is one longer at every step: the two products over
            # it run in float32.
            kv = kv.float()
        scores = torch.bmm(q.to(kv.dtype), kv.transpose(1, 2))  # (b, h, s)
        if key_valid is not None:
            # The last slot stays visible so no row is all -inf (NaN); zeroed below.
            visible = key_valid.clone()
            visible[:, -1] = True
        if visible is not None:
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = torch.softmax(scores * self.softmax_scale, dim=-1, dtype=torch.float32)
        if key_valid is not None:
            probs = probs * key_valid[:, -1:, None]
        out = torch.bmm(probs.to(kv.dtype), kv[..., : self.kv_lora_rank])  # (b, h, r)
        # (h, b, r) @ (h, r, v) -> (h, b, v): the value half of kv_b_proj absorbed.
        out = torch.bmm(out.transpose(0, 1).to(w_uv.dtype), w_uv.transpose(1, 2))
        return out.transpose(0, 1).unsqueeze(1)


def _flash_pays(q: torch.Tensor) -> bool:
    """Whether padding v for torch's fused CPU attention is the faster choice: always
    for inference and float32 training, but not when training in bf16/fp16, where the
    fused kernel's backward is 8x slower than the math path's (15 ms against 1.8 ms per
    layer training the shipped model's shape, batch 8 x 128)."""
    if not q.is_cpu:
        return False
    training = torch.is_grad_enabled() and q.requires_grad
    return not training or q.dtype == torch.float32


def _unmasked(ctx: ForwardContext) -> bool:
    """Every row's keys are all real: no padding, mask or packing."""
    return ctx.mask is None and ctx.padding is None and ctx.cu_seqlens is None


def _masked_decode(q_nope: torch.Tensor, ctx: ForwardContext) -> bool:
    """One token per row under a caller's (batch, 1, 1, seqlen_k) bool mask."""
    mask = ctx.mask
    return (
        q_nope.shape[1] == 1
        and mask is not None
        and mask.dtype == torch.bool
        and mask.shape[1:3] == (1, 1)
        and mask.shape[0] == q_nope.shape[0]
        and ctx.backend is None
    )


def _plain_decode(q_nope: torch.Tensor, ctx: ForwardContext) -> bool:
    """One token per row, no window: padding is a key mask the fast path applies itself."""
    plain_layout = ctx.mask is None and ctx.cu_seqlens is None
    return q_nope.shape[1] == 1 and plain_layout and ctx.window is None and ctx.backend is None
