"""Activation-aware INT4 (AWQ-style): pick per-input-channel scales from calibration data.

Weights that meet large activations matter more. For each selected linear layer, with
``a`` the mean absolute input per channel over the calibration tokens, AWQ quantizes
``W * s`` with ``s = a ** alpha`` (normalised so max(s) * min(s) = 1) and divides the
input by ``s`` at run time; ``alpha`` is searched on a grid over [0, 1) to minimise
the layer's output error on the calibration inputs. ``alpha = 0`` is plain
round-to-nearest, so on the calibration data the result is never worse than RTN.

Differences from the AWQ paper (Lin et al., 2023), chosen for a generic ``nn.Module``:
the scale is not folded into the previous op (we do not know the graph), so the layer
keeps an ``input_scale`` vector and divides by it (one elementwise op per call); every
layer sees the float model's activations (one calibration pass), not the partially
quantized model's; there is no clipping search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_quant.config import Int4WeightOnlyConfig
from ds_quant.linear_int4 import Int4WeightOnlyLinear
from ds_quant.primitives import dequantize_int4, pack_int4, quantize_int4
from ds_quant.quantize import FilterFn, _replace, default_filter, quantize_

__all__ = ["ActivationStats", "calibrate", "search_awq_scale"]


class ActivationStats:
    """Running per-channel mean |x| and a capped sample of input rows of one layer."""

    def __init__(self, in_features: int, max_rows: int) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0
        self.max_rows = max_rows
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).cpu()
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]
        room = self.max_rows - self.kept
        if room > 0:
            self.rows.append(x[:room].clone())
            self.kept += min(room, x.shape[0])

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).to(torch.float32)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0, self.abs_sum.numel())


def search_awq_scale(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    mean_abs: torch.Tensor,
    config: Int4WeightOnlyConfig,
    n_grid: int = 20,
) -> tuple[torch.Tensor | None, float]:
    """The input scale (in,) that minimises ``||X W^T - (X/s) Q(W s)^T||`` on ``inputs``
    (rows, in) over ``s = mean_abs ** alpha``, alpha in {0, 1/n_grid, ...}; returns
    (None, 0.0) when plain round to nearest (alpha 0) is best, else (s, alpha)."""
    w = weight.detach().to(torch.float32).cpu()
    x = inputs.to(torch.float32)
    target = F.linear(x, w)
    gs, sym = config.group_size, config.symmetric
    best: tuple[float, torch.Tensor | None, float] = (float("inf"), None, 0.0)
    a = mean_abs.clamp(min=1e-8)
    for i in range(n_grid):
        alpha = i / n_grid
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        s = s.clamp(min=1e-4)
        q, scale, zero = quantize_int4(w * s, gs, sym)
        wq = dequantize_int4(pack_int4(q), scale, zero, gs, w.shape[1]) / s
        err = (F.linear(x, wq) - target).pow(2).mean().item()
        if err < best[0]:
            best = (err, None if i == 0 else s, alpha)
    return best[1], best[2]


def calibrate(
    model: nn.Module,
    config: Int4WeightOnlyConfig,
    calibration_batches: Iterable[Any],
    filter_fn: FilterFn | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    n_grid: int = 20,
    max_rows: int = 4096,
) -> nn.Module:
    """Quantize ``model`` in place to INT4 with AWQ-style scales and return it.

    ``calibration_batches``: an iterable of model inputs (e.g. (batch, seq) token-id
    tensors), each run as ``forward_fn(model, batch)`` (default ``model(batch)``) under
    ``torch.no_grad()``. Layers are selected as by ``quantize_`` (default: every
    ``nn.Linear``); layers that saw no calibration tokens are quantized by RTN.
    ``max_rows`` caps the input rows kept per layer for the scale search.
    """
    if not isinstance(config, Int4WeightOnlyConfig):
        raise TypeError(
            f"calibrate supports Int4WeightOnlyConfig, got {type(config).__name__}; use "
            "quantize_ for the other configs"
        )
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    filter_fn = filter_fn or default_filter
    # Validate the selection exactly as quantize_ would, on a throwaway pass.
    targets = {}
    for fqn, module in model.named_modules():
        if filter_fn(module, fqn):
            if not isinstance(module, nn.Linear):
                quantize_(model, config, filter_fn)  # raises the same clear error
            targets[fqn] = module
    if "" in targets:
        raise TypeError("calibrate needs a model containing linear layers, not a bare nn.Linear")
    stats = {fqn: ActivationStats(m.in_features, max_rows) for fqn, m in targets.items()}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, s=stats[fqn]: s.add(args[0]))
        for fqn, module in targets.items()
    ]
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in calibration_batches:
                if forward_fn is None:
                    model(batch)
                else:
                    forward_fn(model, batch)
                n_batches += 1
    finally:
        for hook in hooks:
            hook.remove()
    if n_batches == 0:
        raise ValueError("calibration_batches is empty: give at least one batch")
    for fqn, module in targets.items():
        st = stats[fqn]
        scale = None
        if st.count:
            scale, _alpha = search_awq_scale(
                module.weight, st.sample(), st.mean_abs(), config, n_grid
            )
        layer = Int4WeightOnlyLinear.from_weight(module.weight, module.bias, config, scale)
        _replace(model, fqn, layer)
    return model
