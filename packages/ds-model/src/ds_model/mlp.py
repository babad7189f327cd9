"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from ds_model import lean_backward
from ds_model.matvec import linear

__all__ = ["MLP", "plain_linear_weights", "project"]


class MLP(nn.Module):
    """SwiGLU MLP, ``x``: (..., hidden) -> (..., hidden). Names match the checkpoints
    (``gate_proj``/``up_proj``/``down_proj``) so LoRA and quantization can target them.

    Plain layers run as bare ``F.linear`` calls (skipping three module calls, a
    measurable share of a decode step); ``lean_backward`` (set by
    ``ds_model.lean_backward.enable``) trains them through ``lean_backward.swiglu``."""

    lean_backward = False

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = plain_linear_weights(self.gate_proj, self.up_proj, self.down_proj)
        if weights is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.lean_backward and lean_backward.applies(x, *weights):
            return lean_backward.swiglu(x, *weights)
        gate, up, down = weights
        return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def plain_linear_weights(*layers: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The weights of layers that are all plain bias-free ``nn.Linear`` modules with no
    hooks, which can then run as bare matrix multiplies without their module calls;
    ``None`` if any is wrapped, quantized or observed (LoRA, ds-quant layers,
    calibration or user hooks, global hooks), which must go through the modules."""
    for m in layers:
        if type(m) is not nn.Linear or m.bias is not None:
            return None
        if m._forward_hooks or m._forward_pre_hooks:
            return None
    if _global_hooks():
        return None
    return tuple(m.weight for m in layers)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain layer (``plain_linear_weights``) runs
    ``ds_model.matvec.linear``, whose eager form reads a bfloat16 or float32 weight with
    ds-quant's decode kernels at a few CPU rows."""
    # Runs for every projection of an eager decode step: the exact-type test first.
    if type(layer) is nn.Linear and plain_linear_weights(layer) is not None:
        return linear(x, layer.weight)
    return layer(x)


def _global_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)
