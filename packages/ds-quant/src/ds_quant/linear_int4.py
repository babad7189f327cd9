"""W4A16 linear: 4-bit grouped weights, float activations.

Buffers (the checkpoint layout): ``weight`` uint8 (out, in_padded // 2), two 4-bit
values per byte (see ``primitives``); ``weight_scale`` and ``weight_zero`` float32
(out, in_padded // group_size) with W = (q - zero) * scale; optionally
``input_scale`` float32 (in,) from activation-aware calibration, in which case the
layer computes ``(x / input_scale) @ Wq^T`` and Wq approximates ``W * input_scale``.

``in_features`` not a multiple of ``group_size`` (MLA has such dims): handled, never
skipped. The weight is padded to the next multiple (the last group is partial), the
padding never meets a non-zero activation, and ``dequantize()`` crops it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ds_quant.config import Int4WeightOnlyConfig
from ds_quant.kernels.cpu import (
    COMPUTE_DTYPE,
    int4_cpu_supported,
    prepack_int4_cpu,
    w4a16_matmul_cpu,
)
from ds_quant.kernels.cpu_gemv import int4_gemv, int4_takes, prepare
from ds_quant.kernels.reference import w4a16_matmul_reference
from ds_quant.kernels.select import choose_w4a16_backend
from ds_quant.linear import QuantizedLinear
from ds_quant.primitives import dequantize_int4, pack_int4, padded_in_features, quantize_int4


class Int4WeightOnlyLinear(QuantizedLinear):
    """See the module doc. ``backend`` ("auto", "triton", "cpu_gemv", "cpu_packed",
    "reference") picks the kernel; "auto" decides per call from the input's device,
    dtype and rows (``kernels.select``)."""

    config_type = Int4WeightOnlyConfig
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = "auto"
        self.register_buffer("input_scale", None)
        # torch's CPU op wants its own weight layout, as large as the weight again: kept
        # out of the state dict (which holds the canonical tensors), rebuilt if the
        # buffers change (keyed on their versions) and dropped when the layer moves
        # (``_apply``). Where ds-quant's CPU kernel takes the layer's rows
        # (``kernels.cpu_gemv``; training inputs too, the forward running without
        # autograd), nothing runs the op unless ``backend="cpu_packed"`` forces it, and
        # the layout is built on that first call. Elsewhere it is built when the layer is
        # made by quantizing or loaded, not on a first call: a decode step that meets an
        # expert for the first time would otherwise pay the conversion (about 1 ms per
        # expert layer: measured in docs/benchmarks.md, "CPU decode by weight format").
        self._cpu_cache: tuple[Any, ...] | None = None
        self.register_load_state_dict_post_hook(_prepack_after_load)

    @classmethod
    def _from_float(cls, linear: nn.Linear, config: Any) -> QuantizedLinear:
        return cls.from_weight(linear.weight, linear.bias, config)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: Int4WeightOnlyConfig,
        input_scale: torch.Tensor | None = None,
    ) -> Int4WeightOnlyLinear:
        """Quantize a float (out, in) ``weight`` by round to nearest. With ``input_scale``
        (in,), quantize ``weight * input_scale`` and divide inputs by it at run time."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias, config, weight.dtype)
        w = weight.detach().to(torch.float32)
        if input_scale is not None:
            if tuple(input_scale.shape) != (in_features,):
                raise ValueError(
                    f"input_scale must have shape ({in_features},), got {tuple(input_scale.shape)}"
                )
            input_scale = input_scale.detach().to(torch.float32).to(w.device)
            w = w * input_scale
            layer.input_scale = input_scale
        q, scale, zero = quantize_int4(w, config.group_size, config.symmetric)
        layer.register_buffer("weight", pack_int4(q))
        layer.register_buffer("weight_scale", scale)
        layer.register_buffer("weight_zero", zero)
        layer.prepack()
        return layer

    def _allocate(self, device: torch.device | str | None) -> None:
        n = self.out_features
        k_pad = padded_in_features(self.in_features, self.config.group_size)
        groups = k_pad // self.config.group_size
        self.register_buffer("weight", torch.empty(n, k_pad // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale", torch.empty(n, groups, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "weight_zero", torch.empty(n, groups, dtype=torch.float32, device=device)
        )

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "input_scale": self.input_scale is not None}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize_int4(
            self.weight,
            self.weight_scale,
            self.weight_zero,
            self.config.group_size,
            self.in_features,
            torch.float32,
        )
        if self.input_scale is not None:
            w = w / self.input_scale.to(torch.float32)
        return w.to(dtype or self.orig_dtype)

    def prepack(self) -> None:
        """Build the CPU op's weight layout for the current buffers now, if they are on
        the CPU in a shape the op takes (``int4_cpu_supported``) and ds-quant's CPU
        kernel does not take the layer's rows (where it does, only a forced
        ``"cpu_packed"`` backend reads the layout). Quantizing and ``load_state_dict``
        call it; call it after replacing or re-laying ``weight``, ``weight_scale`` or
        ``weight_zero`` by hand, or the next call that needs the layout rebuilds it
        (about 1 ms per layer) inside whatever step makes it."""
        weight = self.weight
        if weight.device.type != "cpu" or weight.numel() == 0:
            return
        prepare(weight)  # the CPU kernel (kernels.cpu_gemv)
        if int4_takes(torch.empty(1, self.in_features), self.config.group_size):
            return
        probe = torch.empty(0, self.in_features)
        if int4_cpu_supported(probe, self.out_features, self.config.group_size):
            self._cpu_operands(COMPUTE_DTYPE)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._cpu_cache = None  # the buffers move or change dtype: the layout is stale
        return super()._apply(fn, recurse)

    def _cpu_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = (self.weight, self.weight_scale, self.weight_zero)
        # Inference tensors (made under inference_mode) have no version counter; they
        # cannot be changed in place outside it either.
        key = (dtype, *((t.data_ptr(), 0 if t.is_inference() else t._version) for t in buffers))
        if self._cpu_cache is None or self._cpu_cache[0] != key:
            packed = prepack_int4_cpu(self.weight, self.weight_scale, self.weight_zero, dtype)
            self._cpu_cache = (key, *packed)
        return self._cpu_cache[1], self._cpu_cache[2]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        gs = self.config.group_size
        backend = choose_w4a16_backend(x, self.out_features, gs, self.backend)
        if backend == "cpu_gemv":  # decode rows, on the stored packed weight
            return int4_gemv(
                x, self.weight, self.weight_scale, self.weight_zero, gs, self.in_features
            )
        if backend == "cpu_packed" and torch.compiler.is_compiling():
            # The layout cache is keyed on data_ptr(), which compiled code cannot read:
            # traced, the layout made at load is used as it is (a compiled step's guards
            # already pin the layer's buffers), the reference if there is none.
            if self._cpu_cache is None or self._cpu_cache[0][0] != COMPUTE_DTYPE:
                backend = "reference"
            else:
                _, cpu_weight, scales_and_zeros = self._cpu_cache
                return w4a16_matmul_cpu(x, cpu_weight, scales_and_zeros, gs, self.in_features)
        if backend == "cpu_packed":
            cpu_weight, scales_and_zeros = self._cpu_operands(COMPUTE_DTYPE)
            y = w4a16_matmul_cpu(x, cpu_weight, scales_and_zeros, gs, self.in_features)
        elif backend == "triton":
            from ds_quant.kernels.triton_w4a16 import w4a16_matmul_triton

            y = w4a16_matmul_triton(
                x, self.weight, self.weight_scale, self.weight_zero, gs, self.in_features
            )
        else:
            y = w4a16_matmul_reference(
                x, self.weight, self.weight_scale, self.weight_zero, gs, self.in_features
            )
        return y


def _prepack_after_load(layer: Int4WeightOnlyLinear, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the loaded buffers' CPU layout, made once here."""
    layer.prepack()
