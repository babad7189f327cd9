"""torch's packed CPU matmuls: ``_weight_int4pack_mm_for_cpu`` (INT4, tinygemm-style
scale-and-zero layout) and ``_weight_int8pack_mm`` (INT8 per channel).

The INT4 op wants its own weight layout (blocks of 64 output channels, made by
``_convert_weight_to_int4pack_for_cpu``) and dequantizes as ``(q - 8) * s + z``; our
``(q - zero) * scale`` maps onto it with ``z = (8 - zero) * scale``. Constraints (torch
2.15): out_features % 16 == 0, group size in {32, 64, 128, 256}, float32 / bfloat16 /
float16 activations.
"""

from __future__ import annotations

import torch

from ds_quant.primitives import unpack_int4

_ops = torch.ops.aten
HAS_INT4_CPU = hasattr(_ops, "_weight_int4pack_mm_for_cpu") and hasattr(
    _ops, "_convert_weight_to_int4pack_for_cpu"
)
HAS_INT8_CPU = hasattr(_ops, "_weight_int8pack_mm")
INT4_CPU_GROUP_SIZES = (32, 64, 128, 256)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALIGNMENT = 64  # bytes; what torch's allocator gives every fresh CPU tensor


def int4_cpu_supported(x: torch.Tensor, out_features: int, group_size: int) -> bool:
    return (
        HAS_INT4_CPU
        and x.device.type == "cpu"
        and x.dtype in CPU_DTYPES
        and out_features % 16 == 0
        and group_size in INT4_CPU_GROUP_SIZES
    )


def int8_cpu_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    # torch 2.15's _weight_int8pack_mm segfaults (measured here) on a weight that is not
    # 64-byte aligned (a tensor read at an odd offset of a file) and, with half-precision
    # inputs, when in_features % 16 != 0: those take the reference path instead.
    return (
        HAS_INT8_CPU
        and x.device.type == "cpu"
        and x.dtype in CPU_DTYPES
        and q.device.type == "cpu"
        and aligned(q)
        and (x.dtype == torch.float32 or q.shape[-1] % 16 == 0)
    )


def prepack_int4_cpu(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our packed weight -> (the op's weight layout, scales_and_zeros (groups, out, 2))."""
    q = unpack_int4(packed).to(torch.int32).contiguous()
    weight = _ops._convert_weight_to_int4pack_for_cpu(q, 1)
    scale32 = scale.to(torch.float32)
    z = (8.0 - zero.to(torch.float32)) * scale32
    scales_and_zeros = torch.stack((scale32, z), dim=-1).transpose(0, 1).contiguous().to(dtype)
    return weight, scales_and_zeros


def w4a16_matmul_cpu(
    x: torch.Tensor,
    cpu_weight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x`` (..., in_features) -> (..., out_features) with the prepacked INT4 weight."""
    k_pad = scales_and_zeros.shape[0] * group_size
    x2 = x.reshape(-1, in_features)
    if k_pad != in_features:
        x2 = torch.nn.functional.pad(x2, (0, k_pad - in_features))
    y = _ops._weight_int4pack_mm_for_cpu(x2.contiguous(), cpu_weight, group_size, scales_and_zeros)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    return t.data_ptr() % alignment == 0


def int8_weight_matmul_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) @ (q * scale)^T with torch's INT8 weight-only CPU op.

    ``q`` must be 64-byte aligned (``int8_cpu_supported`` checks); ``x`` is copied to an
    aligned buffer when it is not (a view at an odd offset).
    """
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if not aligned(x2):
        x2 = x2.clone()
    y = _ops._weight_int8pack_mm(x2, q, scale.to(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])
