"""The base of every quantized linear layer and its ``weight`` semantics.

A ``QuantizedLinear`` replaces an ``nn.Linear`` in place. It keeps ``in_features``,
``out_features`` and ``bias`` (a float ``nn.Parameter`` or None, as nn.Linear has), and
maps ``x`` (..., in_features) -> (..., out_features) in ``x.dtype``.

``weight`` semantics: ``layer.weight`` is the *stored* quantized tensor, a buffer that
is never trained and is not a float weight (int8 (out, in), packed uint8
(out, in_padded // 2), or float8_e4m3fn (out, in)). Code that needs the float weight
(LoRA merging, inspection, export) calls ``dequantize()``, which returns a fresh
(out_features, in_features) tensor equal to what ``forward`` effectively multiplies by.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported float dtype {dtype}; allowed: {sorted(DTYPE_NAMES)}")
    return name


class _QuantizedMatmul(torch.autograd.Function):
    """``y = layer._matmul(x)`` with ``dy/dx = dequantize()``: the packed kernels have no
    derivative, and W8A8's rounding of ``x`` is passed straight through. This is what
    lets an adapter (LoRA) train on top of a frozen quantized layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class QuantizedLinear(nn.Module):
    """Common state of the quantized layers: shapes, bias, the recipe, the float dtype.

    Subclasses set ``config_type``, implement ``_matmul`` (x @ W^T without the bias),
    ``dequantize``, ``_from_float`` and ``_allocate`` (empty buffers for loading a
    checkpoint). The weight is frozen; gradients flow to ``x`` (through
    ``dequantize()``) and to ``bias``.
    """

    config_type: ClassVar[type]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        config: Any,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.config = config
        self.orig_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Any) -> QuantizedLinear:
        """Quantize ``linear`` (round to nearest) into a new layer of this class."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"{cls.__name__}.from_float needs an nn.Linear, got {type(linear).__name__}"
            )
        if linear.weight.device.type == "meta":
            raise ValueError("cannot quantize a Linear on the meta device: it has no values")
        return cls._from_float(linear, config)

    @classmethod
    def _from_float(cls, linear: nn.Linear, config: Any) -> QuantizedLinear:
        raise NotImplementedError

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        config: Any,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> QuantizedLinear:
        """A layer with uninitialised buffers of the right shapes, to load a checkpoint into."""
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        layer = cls(in_features, out_features, b, config, dtype)
        layer._allocate(device)
        return layer

    def _allocate(self, device: torch.device | str | None) -> None:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective float weight, (out_features, in_features), in ``dtype``
        (default: the dtype the float layer had)."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., in_features) -> (..., out_features) in ``x.dtype``."""
        if torch.is_grad_enabled() and x.requires_grad:
            y = _QuantizedMatmul.apply(x, self)
        else:
            y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def recipe(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this layer without the float weights."""
        return {
            "config": self.config.to_dict(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.orig_dtype),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, config={self.config}"
        )
