"""The stable interface of ds-quant: configs and quantized linear layers."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class QuantConfig(Protocol):
    """A small, immutable description of how to quantize a linear layer.

    ``quantize_(model, config)`` looks up the handler registered for the config's type.
    """

    @property
    def name(self) -> str:
        """Stable identifier written into checkpoint metadata (e.g. ``"int4_weight_only"``)."""
        ...


@runtime_checkable
class QuantizedLinearProtocol(Protocol):
    """What a quantized linear layer offers, so that others (ds-lora) can wrap it
    without importing ds-quant. ``x``: (..., in_features) -> (..., out_features)."""

    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor:
        """The weight as a float tensor of shape (out_features, in_features)."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
