"""The LoRA branch ``s * B(A(dropout(x)))`` as one autograd function that keeps less for
the backward than the composition of ``nn.Dropout`` and two ``nn.Linear``.

The composition saves the dropped-out input (a float tensor of ``x``'s size) for each
adapted layer. Layers that read the same input (q, k and v projections; gate and up)
each save their own copy. This function saves ``x`` itself, which those layers share,
plus a one-byte keep mask, and rebuilds the dropped-out input in the backward.

x: (..., in_features); weight_a: (r, in_features); weight_b: (out_features, r);
returns (..., out_features). ``lora_delta_reference`` is the plain composition.
"""

from __future__ import annotations

import torch
from torch import nn


class _LoraDelta(torch.autograd.Function):
    """Forward and backward both run in ``compute_dtype`` (autocast's dtype, or the inputs'
    dtype outside autocast) with autocast switched off, so the backward, which autograd
    runs outside autocast, sees the same dtypes as the forward. Gradients are returned in
    each input's own dtype, as autocast's differentiable casts would return them."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling: float, p: float, keep, compute_dtype):
        with torch.autocast(x.device.type, enabled=False):
            dropped = x if keep is None else x * keep * (1.0 / (1.0 - p))
            hidden = dropped.to(compute_dtype) @ weight_a.to(compute_dtype).T
            out = (hidden @ weight_b.to(compute_dtype).T) * scaling
        ctx.save_for_backward(x, keep, hidden, weight_a, weight_b)
        ctx.scaling, ctx.p, ctx.compute_dtype = scaling, p, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, hidden, weight_a, weight_b = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad = grad_out.to(dtype) * ctx.scaling
            rank = weight_a.shape[0]
            grad_hidden = grad @ weight_b.to(dtype)  # (..., r)
            if ctx.needs_input_grad[2]:
                grad_b = grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, rank)
                grad_b = grad_b.to(weight_b.dtype)
            if ctx.needs_input_grad[1]:
                dropped = x if keep is None else x * keep * (1.0 / (1.0 - ctx.p))
                dropped = dropped.to(dtype).reshape(-1, x.shape[-1])
                grad_a = (grad_hidden.reshape(-1, rank).T @ dropped).to(weight_a.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = grad_hidden @ weight_a.to(dtype)
                if keep is not None:
                    grad_x = grad_x * keep * (1.0 / (1.0 - ctx.p))
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA matmuls run in: autocast's dtype when autocast is on for ``x``'s
    device (float64 is left alone, as autocast leaves it), otherwise the adapter weight's
    dtype (the input is brought to the adapter, as in QLoRA's float32 adapters)."""
    device_type = x.device.type
    if (
        torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
        and all(t.is_floating_point() and t.dtype != torch.float64 for t in (x, weight))
    ):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep mask for ``x`` (True = kept), drawn from torch's global generator."""
    return torch.rand(x.shape, device=x.device) >= p


def lora_delta(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
) -> torch.Tensor:
    """``scaling * B(A(dropout(x)))``; dropout applies when ``dropout`` is an ``nn.Dropout``
    in training mode.

    Under ``torch.autocast`` the matmuls run in autocast's dtype (bf16 or fp16) and the
    result has that dtype, as ``nn.Linear`` would give; the gradients of ``x``, ``weight_a``
    and ``weight_b`` come back in their own dtypes. Outside autocast, the branch runs in
    ``weight_a``'s dtype."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    keep = keep_mask(x, p) if p > 0 else None
    dtype = compute_dtype(x, weight_a)
    return _LoraDelta.apply(x, weight_a, weight_b, scaling, p, keep, dtype)


def lora_delta_reference(
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
    keep: torch.Tensor | None,
    p: float,
) -> torch.Tensor:
    """The plain composition with a given keep mask: the ground truth for the tests."""
    dropped = x if keep is None else x * keep / (1.0 - p)
    return (dropped @ weight_a.T @ weight_b.T) * scaling
