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


class _QuantizedBaseCall(torch.autograd.Function):
    """``layer(x)`` for a frozen quantized linear, with the input gradient taken through
    ``dequantize()``: ``dx = dy @ W`` (and ``db = sum(dy)`` for a trainable bias).

    Quantized kernels often have no derivative (torch's int4 CPU matmul has none), yet
    QLoRA needs ``dx`` to reach the adapters of earlier layers. This relies on the
    ``LinearLike`` contract, ``y = x @ W.T + b`` with ``W = dequantize()``, and saves no
    activations: the weight is dequantized again in the backward, as QLoRA does.
    x: (..., in_features) -> (..., out_features).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None):
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ ctx.layer.dequantize().to(grad_y.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def call_base(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run the wrapped layer; a quantized one goes through ``_QuantizedBaseCall`` when a
    gradient is wanted, so training never needs the quantized kernel's own derivative."""
    if not is_quantized(layer) or not torch.is_grad_enabled() or args or kwargs:
        return layer(x, *args, **kwargs)
    bias = getattr(layer, "bias", None)
    wants_bias_grad = isinstance(bias, torch.Tensor) and bias.requires_grad
    if not x.requires_grad and not wants_bias_grad:
        return layer(x)
    return _QuantizedBaseCall.apply(x, layer, bias if wants_bias_grad else None)
