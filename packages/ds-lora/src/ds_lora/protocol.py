"""The stable interface of ds-lora: what a layer must offer to carry an adapter."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearLike(Protocol):
    """Anything LoRA can wrap: ``nn.Linear`` and any quantized linear that offers
    ``dequantize()`` (ds-quant's ``QuantizedLinear`` does, without importing ds-lora).

    ``x``: (..., in_features) -> (..., out_features).
    """

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
