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


def rebuild_quantized(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new quantized layer of ``layer``'s class holding ``weight`` (out, in), made with
    ``type(layer).from_float(nn.Linear, layer.config)``: the fallback when the layer has no
    in-place ``requantize``.  The bias (if any) is carried over."""
    out_features, in_features = weight.shape
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    new = type(layer).from_float(linear, layer.config)
    new.train(layer.training)
    if bias is not None and isinstance(getattr(new, "bias", None), nn.Parameter):
        new.bias.requires_grad_(bias.requires_grad)
    return new
