"""INT8 layers: weight-only (W8A16) and dynamic W8A8, both per-output-channel weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_quant.config import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
from ds_quant.kernels.cpu import (
    COMPUTE_DTYPE,
    CPU_DTYPES,
    HAS_INT8_CPU,
    int8_cpu_supported,
    int8_weight_matmul_cpu,
    int8_weight_matmul_traced,
)
from ds_quant.kernels.cpu_gemv import int8_gemv, int8_takes, prepare
from ds_quant.kernels.reference import int8_weight_matmul_reference
from ds_quant.kernels.select import GEMV_MAX_ROWS, HAS_TRITON
from ds_quant.linear import QuantizedLinear
from ds_quant.primitives import (
    dequantize_int8,
    quantize_int8_per_channel,
    quantize_int8_per_token,
)


class _Int8Base(QuantizedLinear):
    """Buffers: ``weight`` int8 (out, in); ``weight_scale`` float32 (out,)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    @classmethod
    def _from_float(cls, linear: nn.Linear, config: Any) -> QuantizedLinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias, config, w.dtype)
        q, scale = quantize_int8_per_channel(w)
        layer.register_buffer("weight", q)
        layer.register_buffer("weight_scale", scale)
        return layer

    def _allocate(self, device: torch.device | str | None) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("weight", torch.empty(n, k, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(n, dtype=torch.float32, device=device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype or self.orig_dtype)


# "auto": the CPU kernel (``kernels.cpu_gemv``) for CPU rows where it is built, else
# torch's packed op (compiled one-row steps without the kernel: inductor's multiply-and-sum),
# triton's matrix-vector kernel for a few CUDA rows, else the reference; "cpu_gemv" and
# "cpu_packed" force the two CPU paths, "reference" dequantize-then-matmul.
INT8_BACKENDS = ("auto", "cpu_gemv", "cpu_packed", "reference")


class Int8WeightOnlyLinear(_Int8Base):
    """W8A16: activations stay float. On CPU, rows outside autograd run
    ``kernels.cpu_gemv``'s kernel on the stored int8 weight where it is built, others
    torch's ``_weight_int8pack_mm`` with bfloat16 activations (see ``kernels.cpu``).
    ``backend`` picks the kernel (``INT8_BACKENDS``); "reference" forces
    dequantize-then-matmul (the ground truth)."""

    config_type = Int8WeightOnlyConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = "auto"
        # The CPU op's unit scales (see ``int8_weight_matmul_cpu``): made once, kept out
        # of the state dict.
        self._cpu_unit: torch.Tensor | None = None

    @classmethod
    def _from_float(cls, linear: nn.Linear, config: Any) -> QuantizedLinear:
        layer = super()._from_float(linear, config)
        prepare(layer.weight)
        return layer

    def _allocate(self, device: torch.device | str | None) -> None:
        super()._allocate(device)
        prepare(self.weight)

    def _cpu_unit_scale(self) -> torch.Tensor:
        if self._cpu_unit is None or self._cpu_unit.shape[0] != self.out_features:
            self._cpu_unit = torch.ones(self.out_features, dtype=COMPUTE_DTYPE)
        return self._cpu_unit

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend not in INT8_BACKENDS:
            raise ValueError(f"backend must be one of {INT8_BACKENDS}, got {backend!r}")
        if backend == "reference":
            return int8_weight_matmul_reference(x, self.weight, self.weight_scale)
        if backend in ("auto", "cpu_gemv"):
            if int8_takes(x, self.weight):
                return int8_gemv(x, self.weight, self.weight_scale)
            if backend == "cpu_gemv":
                raise ValueError(
                    "backend 'cpu_gemv' needs CPU float rows outside autograd and a built "
                    "kernel (kernels.cpu_gemv.available()); got "
                    f"{tuple(x.shape)} on {x.device}"
                )
        if backend == "cpu_packed" and not (HAS_INT8_CPU and x.device.type == "cpu"):
            raise ValueError(
                f"backend 'cpu_packed' needs torch's packed INT8 op and a CPU input, got {x.device}"
            )
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            # The eager checks read data_ptr() (alignment), which breaks a compiled graph
            # at every layer: traced code calls the op through a custom op that checks
            # alignment itself (``kernels.cpu``).
            # No module state is set while tracing: the unit scales made here on the
            # first call would fail the guards of the graph that made them (one more
            # compile on the next call); the graph makes its own.
            if HAS_INT8_CPU and x.dtype in CPU_DTYPES and self.weight.device.type == "cpu":
                return int8_weight_matmul_traced(x, self.weight, self.weight_scale)
            return int8_weight_matmul_reference(x, self.weight, self.weight_scale)
        if int8_cpu_supported(x, self.weight):
            return int8_weight_matmul_cpu(x, self.weight, self.weight_scale, self._cpu_unit_scale())
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.is_cuda and HAS_TRITON and rows and rows <= GEMV_MAX_ROWS:
            # Decode on a GPU: stream the int8 weight once instead of dequantizing it.
            from ds_quant.kernels.triton_gemv import int8_gemv_triton

            y = int8_gemv_triton(x.reshape(rows, -1), self.weight, self.weight_scale)
            return y.reshape(*x.shape[:-1], -1)
        return int8_weight_matmul_reference(x, self.weight, self.weight_scale)


def _int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K) int8 ^T -> (M, N) int32 (exact)."""
    if hasattr(torch, "_int_mm") and xq.device.type in ("cpu", "cuda"):
        try:
            return torch._int_mm(xq, wq.t())
        except RuntimeError:  # shape limits of the CUDA path (e.g. M <= 16)
            pass
    # float64 holds every int32 accumulator exactly.
    return (xq.to(torch.float64) @ wq.to(torch.float64).t()).to(torch.int32)


class Int8DynamicActivationInt8WeightLinear(_Int8Base):
    """W8A8: each token is quantized to INT8 with its own scale at run time, then an
    exact int8 x int8 -> int32 matmul, rescaled by token scale x channel scale."""

    config_type = Int8DynamicActivationInt8WeightConfig

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_int8_per_token(x2)
        acc = _int8_matmul(xq.contiguous(), self.weight)
        y = acc.to(torch.float32) * x_scale * self.weight_scale.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same math in float32, without integer kernels (the kernel's ground truth)."""
        xq, x_scale = quantize_int8_per_token(x.reshape(-1, self.in_features))
        xd = xq.to(torch.float32) * x_scale
        y = F.linear(xd, dequantize_int8(self.weight, self.weight_scale, torch.float32))
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)
