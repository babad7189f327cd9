"""RMSNorm, computed in fp32 and cast back, as DeepSeek and transformers do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ds_quant.kernels import cpu_gemv
from torch import nn

from ds_model import lean_backward

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim. ``x``: (..., dim). ``lean_backward``
    (set by ``ds_model.lean_backward.enable``): train through ``lean_backward.rms_norm``.
    ``cpu_kernel``: eager CPU rows run ds-quant's ``rms_norm`` where it takes them
    (``kernels.cpu_gemv.rms_norm_takes``: up to ``NORM_ROWS`` rows, x and weight both
    float32 or both bfloat16, no autograd, no autocast, not traced)."""

    lean_backward = False
    # Eager CPU rows of float32 or bfloat16 (x and weight alike, outside autograd) run
    # ds-quant's one-pass kernel: torch's norm is six ops, ~30 us a call inside an eager
    # decode step, and the built-in model's eager decode makes 1.10-1.13x the tokens/s
    # with the kernel (benchmarks/bench_norm.py sets this False to time torch's ops).
    cpu_kernel = True

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean_backward and lean_backward.applies(x, self.weight):
            return lean_backward.rms_norm(x, self.weight, self.eps)
        if self.cpu_kernel and cpu_gemv.rms_norm_takes(x, self.weight):
            return cpu_gemv.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op; the same arithmetic as below when no cast is needed.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
