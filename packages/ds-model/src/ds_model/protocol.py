"""The stable interface of ds-model: a causal LM, the serving step, and training.

The model composes the leaves through their own protocols: attention through
ds-attention's ``AttentionBackend``, quantized loading through ds-quant's
``QuantConfig``, adapters on anything ds-lora's ``LinearLike`` describes, and
compressed data-parallel gradients through ds-optim's ``GradientCompressor``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from ds_attention.protocol import AttentionBackend
from ds_lora.protocol import LinearLike
from ds_optim.protocol import GradientCompressor
from ds_quant.protocol import QuantConfig

__all__ = [
    "AttentionBackend",
    "CausalLM",
    "GradientCompressor",
    "LinearLike",
    "ModelRunnerProtocol",
    "QuantConfig",
]


@runtime_checkable
class CausalLM(Protocol):
    """``forward(input_ids)`` with ``input_ids`` (batch, seqlen) returns an object with
    ``.logits`` (batch, seqlen, vocab)."""

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any: ...

    def generate(self, prompt: Any, max_new_tokens: int = ..., **kwargs: Any) -> Any: ...

    def stream(self, prompt: Any, max_new_tokens: int = ..., **kwargs: Any) -> Iterator[Any]: ...


@runtime_checkable
class ModelRunnerProtocol(Protocol):
    """One mixed prefill/decode step on a paged KV cache, for a serving engine.

    The engine passes plain data (token ids, positions, block tables), never
    scheduler objects, so ds-model does not depend on ds-batching.
    """

    def step(
        self,
        token_ids: Sequence[Sequence[int]],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        **kwargs: Any,
    ) -> torch.Tensor:
        """Returns the last-position logits for each sequence, (num_seqs, vocab)."""
        ...
