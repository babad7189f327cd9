"""Dequantize-then-matmul: the plain-torch ground truth every kernel is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_quant.primitives import dequantize_int4, dequantize_int8


def w4a16_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x`` (..., in_features) @ W^T -> (..., out_features), in ``x.dtype``.

    W is dequantized from ``packed`` (out, in_padded // 2) uint8 with ``scale`` /
    ``zero`` (out, groups) and cast to ``x.dtype`` before the matmul.
    """
    w = dequantize_int4(packed, scale, zero, group_size, in_features, dtype=x.dtype)
    return F.linear(x, w)


def int8_weight_matmul_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``x`` (..., in) @ (q * scale)^T -> (..., out) in ``x.dtype``; ``q`` int8 (out, in)."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype))
