"""DoRA (weight-decomposed LoRA, Liu et al. 2024): the adapted weight is
``m * (W + s B A) / ||W + s B A||_row``, a learned per-output-row magnitude ``m`` times the
direction of the LoRA-updated weight. The row norm is treated as a constant in the backward
pass (section 4.3 of the paper, as PEFT does), which saves memory and changes little.

Weights are ``(out_features, in_features)``; norms are over ``in_features`` (one per output).
"""

from __future__ import annotations

import torch
from torch import nn


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector ``weight``: (out_features,). Named as PEFT names it
    (``lora_magnitude_vector.<adapter>.weight``) so parameter names and files match."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def weight_row_norm(
    weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``||W + scaling * lora_weight||`` per output row. weight, lora_weight: (out, in) -> (out,)."""
    return torch.linalg.vector_norm(weight + scaling * lora_weight, dim=1)


def dora_delta(
    base_result: torch.Tensor,
    lora_result: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """What DoRA adds to the base layer's output.

    base_result: ``x @ W.T`` without bias, (..., out); lora_result: ``B(A(x))``, (..., out);
    magnitude, weight_norm: (out,). Returns ``(m/n - 1) * base_result + (m/n) * s * lora_result``,
    so that base + delta = ``(m/n) * (W + s B A) x`` (+ bias).
    """
    scale = magnitude / weight_norm.detach()
    return (scale - 1) * base_result + scale * (lora_result * scaling)
