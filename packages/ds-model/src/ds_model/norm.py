"""RMSNorm, computed in fp32 and cast back, as DeepSeek and transformers do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_model import lean_backward

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim. ``x``: (..., dim). ``lean_backward``
    (set by ``ds_model.lean_backward.enable``): train through ``lean_backward.rms_norm``."""

    lean_backward = False

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean_backward and lean_backward.applies(x, self.weight):
            return lean_backward.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op; the same arithmetic as below when no cast is needed.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
