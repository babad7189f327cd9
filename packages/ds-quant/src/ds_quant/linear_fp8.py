"""DeepSeek-V3 FP8 block linear: loads and runs ``weight`` + ``weight_scale_inv`` as
stored in DeepSeek-V3 checkpoints (buffer names match, so their state dicts load as is).

No CPU (or pre-Hopper GPU) has an FP8 matmul torch exposes for block scales, so
``forward`` dequantizes the weight to ``x.dtype`` per call and runs a float matmul.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_quant.config import Fp8BlockConfig
from ds_quant.fp8 import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from ds_quant.linear import QuantizedLinear


class Fp8BlockLinear(QuantizedLinear):
    """Buffers: ``weight`` float8_e4m3fn (out, in); ``weight_scale_inv`` float32
    (ceil(out / block[0]), ceil(in / block[1])). Real weight = weight * scale_inv per block."""

    config_type = Fp8BlockConfig
    weight: torch.Tensor
    weight_scale_inv: torch.Tensor

    @classmethod
    def _from_float(cls, linear: nn.Linear, config: Any) -> QuantizedLinear:
        w = linear.weight
        q, scale_inv = quantize_fp8_block(w, config.block)
        return cls.from_fp8(q, scale_inv, linear.bias, config.block, dtype=w.dtype)

    @classmethod
    def from_fp8(
        cls,
        weight: torch.Tensor,
        weight_scale_inv: torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: tuple[int, int] = (128, 128),
        dtype: torch.dtype = torch.bfloat16,
    ) -> Fp8BlockLinear:
        """Wrap a DeepSeek-V3 checkpoint's ``weight`` (float8_e4m3fn, (out, in)) and
        ``weight_scale_inv`` (float32 per block) without dequantizing them.
        ``dtype`` is what ``dequantize()`` returns by default."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise TypeError(
                f"weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} "
                f"{tuple(weight.shape)}"
            )
        config = Fp8BlockConfig(block=tuple(block_size))
        out_features, in_features = weight.shape
        expected = (-(-out_features // config.block[0]), -(-in_features // config.block[1]))
        if tuple(weight_scale_inv.shape) != expected:
            raise ValueError(
                f"weight_scale_inv must have shape {expected} for weight "
                f"{tuple(weight.shape)} and block_size {config.block}, "
                f"got {tuple(weight_scale_inv.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(in_features, out_features, bias, config, dtype)
        layer.register_buffer("weight", weight.detach())
        layer.register_buffer("weight_scale_inv", weight_scale_inv.detach().to(torch.float32))
        return layer

    def _allocate(self, device: torch.device | str | None) -> None:
        n, k = self.out_features, self.in_features
        br, bc = self.config.block
        self.register_buffer("weight", torch.empty(n, k, dtype=FP8_DTYPE, device=device))
        shape = (-(-n // br), -(-k // bc))
        self.register_buffer(
            "weight_scale_inv", torch.empty(shape, dtype=torch.float32, device=device)
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8_block(
            self.weight, self.weight_scale_inv, self.config.block, dtype or self.orig_dtype
        )

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))
