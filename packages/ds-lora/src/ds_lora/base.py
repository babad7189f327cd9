"""How ds-lora reads a wrapped layer: float ``nn.Linear``-style or quantized (``dequantize()``)."""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(layer: nn.Module) -> bool:
    """A layer whose float weight must be obtained through ``dequantize()``."""
    return callable(getattr(layer, "dequantize", None))


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight (out_features, in_features) of a float or quantized linear."""
    if is_quantized(layer):
        return layer.dequantize()
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(
            f"{type(layer).__name__} has neither a float .weight nor dequantize(); LoRA can "
            "wrap it for training but cannot merge into it or use DoRA on it"
        )
    return weight


def device_of(layer: nn.Module) -> torch.device:
    for tensor in (*layer.parameters(), *layer.buffers()):
        return tensor.device
    return torch.device("cpu")
