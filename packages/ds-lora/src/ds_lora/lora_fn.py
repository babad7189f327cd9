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
    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling: float, p: float, keep):
        dropped = x if keep is None else x * keep * (1.0 / (1.0 - p))
        hidden = dropped @ weight_a.T
        ctx.save_for_backward(x, keep, hidden, weight_a, weight_b)
        ctx.scaling, ctx.p = scaling, p
        return (hidden @ weight_b.T) * scaling

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, hidden, weight_a, weight_b = ctx.saved_tensors
        grad = grad_out * ctx.scaling
        rank = weight_a.shape[0]
        grad_hidden = grad @ weight_b  # (..., r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, rank)
        if ctx.needs_input_grad[1]:
            dropped = x if keep is None else x * keep * (1.0 / (1.0 - ctx.p))
            grad_a = grad_hidden.reshape(-1, rank).T @ dropped.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden @ weight_a
            if keep is not None:
                grad_x = grad_x * keep * (1.0 / (1.0 - ctx.p))
        return grad_x, grad_a, grad_b, None, None, None


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
    in training mode."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    keep = keep_mask(x, p) if p > 0 else None
    return _LoraDelta.apply(x, weight_a, weight_b, scaling, p, keep)


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
