"""The decoder: embeddings, N x (attention + MLP/MoE), final norm, LM head.

Module names follow the Hugging Face checkpoints (``model.layers.{i}.self_attn.q_proj``
...), so state-dict keys map one to one and LoRA / quantization target them by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_model.attention import Attention
from ds_model.config import ModelConfig
from ds_model.context import ForwardContext
from ds_model.mla import MLAttention
from ds_model.mlp import MLP, project
from ds_model.moe import MoE
from ds_model.norm import RMSNorm
from ds_model.rope import rope_tables
from ds_model.unpad import Padding

__all__ = ["CausalLMOutput", "DecoderLayer", "DeepSeekForCausalLM", "DeepSeekModel"]


@dataclass
class CausalLMOutput:
    """``logits``: (batch, seqlen, vocab); ``loss``: scalar when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        attn_cls = MLAttention if config.is_mla else Attention
        self.self_attn = attn_cls(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The "gated" pattern: g * attn(h) + (1 - g) * h with g = sigmoid(attn_gate(h)),
        # ds-attention's DynamicAttention around the layer's own attention.
        self.attn_gate = None
        if config.attention.kind == "gated":
            self.attn_gate = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attn(h, ctx)
        if self.attn_gate is not None:
            g = torch.sigmoid(self.attn_gate(h))
            attn = g * attn + (1 - g) * h
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepSeekModel(nn.Module):
    """The decoder stack without the LM head: ids (batch, seqlen) -> hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if _on_meta():
            # On meta, Embedding's own normal_ init pulls in torch._dynamo (seconds).
            weight = torch.empty(config.vocab_size, config.hidden_size)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Real tables even in a meta build (tensor math on meta imports torch._dynamo).
        with torch.device("cpu"):
            cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self) -> None:
        """Put the fp32 rotary tables on the embedding's device (after a meta build)."""
        device = self.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() must not round the rotary tables: they follow the device only.
        cos, sin = self.rope_cos, self.rope_sin
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        key_valid: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Any = None,
        history: bool = False,
    ) -> torch.Tensor:
        """``input_ids``, ``positions``: (batch, seqlen) -> (batch, seqlen, hidden).

        At most one of: ``key_valid`` (batch, past + seqlen) bool, True for real tokens
        (a padded batch: attention runs varlen over the real tokens; padding slots get
        finite, meaningless hidden states); ``cu_seqlens`` (cu_q, cu_k) for packed sequences in one row;
        ``mask`` (batch, 1, seqlen, past + seqlen) bool, an arbitrary visibility mask
        with causality and any window folded in (torch SDPA, no ds-attention backend)."""
        if (key_valid is not None) + (mask is not None) + (cu_seqlens is not None) > 1:
            raise ValueError("pass at most one of key_valid, mask and cu_seqlens")
        padding = None
        if key_valid is not None:
            if key_valid.dim() != 2 or key_valid.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"key_valid must be (batch, past + seqlen) with batch "
                    f"{input_ids.shape[0]}, got shape {tuple(key_valid.shape)}"
                )
            padding = Padding.from_key_valid(key_valid.bool(), input_ids.shape[1])
        ctx = self.forward_context(
            positions,
            mask=mask,
            padding=padding,
            cu_seqlens=cu_seqlens,
            cache=cache,
            history=history,
        )
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)

    def forward_context(
        self,
        positions: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        padding: Padding | None = None,
        cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Any = None,
        history: bool = False,
    ) -> ForwardContext:
        """What every layer of a pass over tokens at ``positions`` (batch, seqlen) shares
        (rotary tables, attention layout, cache writer): for code that runs a subset of
        the layers itself, as a pipeline stage does."""
        return ForwardContext(
            cos=self.rope_cos[positions].unsqueeze(2),
            sin=self.rope_sin[positions].unsqueeze(2),
            mask=mask,
            padding=padding,
            cu_seqlens=cu_seqlens,
            window=_window(self.config),
            cache=cache,
            history=history,
            backend=self.config.attention_backend,
        )


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _window(config: ModelConfig) -> tuple[int, int] | None:
    return None if config.sliding_window is None else (config.sliding_window - 1, 0)


class DeepSeekForCausalLM(nn.Module):
    """A DeepSeek LLM/Coder (llama), V2 or V3 causal language model.

    ``forward(input_ids, attention_mask=None, position_ids=None, labels=None)`` returns
    ``CausalLMOutput``; ``generate`` and ``stream`` decode with a KV cache.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepSeekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.tokenizer: Any = None
        # generation_config.json's defaults for generate (read by from_pretrained).
        self.generation_config: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> DeepSeekForCausalLM:
        """Random normal(0, std) weights, ones for norms, zeros for biases (a fresh model)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cache: Any = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """``input_ids`` (batch, seqlen) int64. ``attention_mask`` (batch, past + seqlen),
        1 for real tokens and 0 for padding (left or right); positions then count real
        tokens only. ``labels`` (batch, seqlen): next-token cross-entropy on the shifted
        labels, ``-100`` ignored. ``cache``: a ``StaticKVCache`` to read and extend.
        ``logits_to_keep=n`` computes logits for the last n positions only."""
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            raise TypeError(
                f"forward() got unexpected arguments: {unknown}; accepted: input_ids, "
                "attention_mask, position_ids, labels, cache, logits_to_keep"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}"
            )
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + t > self.config.max_position_embeddings and position_ids is None:
            raise ValueError(
                f"sequence length {start + t} exceeds the model's context "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        key_valid = None
        if attention_mask is not None:
            if attention_mask.shape != (b, start + t):
                raise ValueError(
                    f"attention_mask must be (batch, past + seqlen) = {(b, start + t)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            if not bool(attention_mask.all()):
                key_valid = attention_mask
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        writer = cache.writer(t) if cache is not None else None
        hidden = self.model(
            input_ids, position_ids, key_valid=key_valid, cache=writer, history=start > 0
        )
        if cache is not None:
            cache.length += t
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = project(self.lm_head, hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)

    def generate(self, prompt: Any, max_new_tokens: int | None = None, **kwargs: Any) -> Any:
        """See ``ds_model.generation.generate``."""
        from ds_model.generation import generate

        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(
        self, prompt: Any, max_new_tokens: int | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """See ``ds_model.generation.stream``."""
        from ds_model.generation import stream

        return stream(self, prompt, max_new_tokens, **kwargs)

    def save_pretrained(self, path: Any, **kwargs: Any) -> None:
        """See ``ds_model.loading.save_pretrained``."""
        from ds_model.loading import save_pretrained

        save_pretrained(self, path, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, i] predicts labels[:, i + 1]; -100 ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (batch, seqlen) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
