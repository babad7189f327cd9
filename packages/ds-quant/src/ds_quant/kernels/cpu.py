"""torch's packed CPU matmuls: ``_weight_int4pack_mm_for_cpu`` (INT4, tinygemm-style
scale-and-zero layout) and ``_weight_int8pack_mm`` (INT8 per channel).

The INT4 op wants its own weight layout (blocks of 64 output channels, made by
``_convert_weight_to_int4pack_for_cpu``) and dequantizes as ``(q - 8) * s + z``; our
``(q - zero) * scale`` maps onto it with ``z = (8 - zero) * scale``. Constraints (torch
2.15): out_features % 16 == 0, group size in {32, 64, 128, 256}, float32 / bfloat16 /
float16 activations.

Both ops are vectorized for bfloat16 activations only: at batch 1 on the AVX-512 host
(one thread) a (1536, 512) INT8 matmul took 0.72 ms with float32 activations and 0.05 ms
with bfloat16, INT4 1.8 ms and 0.07 ms; float16 was as slow as float32. So the CPU path
always runs them in bfloat16 (``COMPUTE_DTYPE``): float32 / float16 activations are
rounded to bfloat16 on the way in (the ops accumulate in float32) and the result is
cast back to the input's dtype. That is W8A16 / W4A16 with bf16 as the "A16", a finer
activation rounding than llama.cpp's, which quantizes activations to 8 bits for its
quantized dot products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_quant.primitives import unpack_int4

_ops = torch.ops.aten
HAS_INT4_CPU = hasattr(_ops, "_weight_int4pack_mm_for_cpu") and hasattr(
    _ops, "_convert_weight_to_int4pack_for_cpu"
)
HAS_INT8_CPU = hasattr(_ops, "_weight_int8pack_mm")
INT4_CPU_GROUP_SIZES = (32, 64, 128, 256)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPUTE_DTYPE = torch.bfloat16
ALIGNMENT = 64  # bytes; what torch's allocator gives every fresh CPU tensor


# The fewest real values a partial last group may hold for the op to take it.
MIN_PARTIAL_GROUP = min(INT4_CPU_GROUP_SIZES)


def int4_cpu_supported(x: torch.Tensor, out_features: int, group_size: int) -> bool:
    # A partial last group (in_features not a multiple of the group size; the input is
    # zero-padded to the whole group) goes to the op when it holds at least 32 real
    # values, as MLA's 192-wide q_b_proj input does in groups of 128: the op's bfloat16
    # scale and zero then cost what they cost on a whole group of 32. Fewer values take
    # the reference path, since there they lose the precision a group of a few values
    # needs (measured: 1.7% mean relative error at in_features=1 and 1.3% at 33 with
    # groups of 32, against 0.2-0.3% on whole groups).
    partial = x.shape[-1] % group_size
    return (
        HAS_INT4_CPU
        and x.device.type == "cpu"
        and x.dtype in CPU_DTYPES
        and out_features % 16 == 0
        and group_size in INT4_CPU_GROUP_SIZES
        and (partial == 0 or partial >= MIN_PARTIAL_GROUP)
    )


def int8_cpu_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    # torch 2.15's _weight_int8pack_mm segfaults (measured here) on a weight that is not
    # 64-byte aligned (a tensor read at an odd offset of a file) and, with the bfloat16
    # activations it runs here, when in_features % 16 != 0: those take the reference path.
    return (
        HAS_INT8_CPU
        and x.device.type == "cpu"
        and x.dtype in CPU_DTYPES
        and q.device.type == "cpu"
        and aligned(q)
        and q.shape[-1] % 16 == 0
    )


def prepack_int4_cpu(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    dtype: torch.dtype = COMPUTE_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our packed weight -> (the op's weight layout, scales_and_zeros (groups, out, 2)
    in ``dtype``, the activations' dtype the op will see)."""
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
    """``x`` (..., in_features) -> (..., out_features) in ``x.dtype`` with the prepacked
    INT4 weight, computed with activations in ``scales_and_zeros.dtype``."""
    k_pad = scales_and_zeros.shape[0] * group_size
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    # ``to`` returns a non-contiguous input as it is when the dtype already matches.
    x2 = x2.to(scales_and_zeros.dtype).contiguous()
    if k_pad != in_features:
        x2 = torch.nn.functional.pad(x2, (0, k_pad - in_features))
    y = _ops._weight_int4pack_mm_for_cpu(x2, cpu_weight, group_size, scales_and_zeros)
    if x.dtype != y.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    return t.data_ptr() % alignment == 0


def int8_weight_matmul_cpu(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, unit: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` (..., in) @ (q * scale)^T -> (..., out) in ``x.dtype``, with torch's INT8
    weight-only CPU op computing in ``COMPUTE_DTYPE``.

    The op runs with unit scales (``unit``: ones (out,) in ``COMPUTE_DTYPE``, made once
    per layer; made here if not given), so each output is rounded to bfloat16 once, and
    the float32 per-channel ``scale`` is applied after: the op's own scaling rounds the
    scale and the scaled sum too (0.6% worst relative error measured, against 0.2%).
    ``q`` must be 64-byte aligned (``int8_cpu_supported`` checks); ``x`` is copied to an
    aligned buffer when it is not (a view at an odd offset).
    """
    if unit is None:
        unit = torch.ones(q.shape[0], dtype=COMPUTE_DTYPE)
    # Only the casts the op needs: at batch 1 each tensor op costs about as much as a
    # small layer's matmul.
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != COMPUTE_DTYPE:
        x2 = x2.to(COMPUTE_DTYPE, memory_format=torch.contiguous_format)  # fresh: aligned
    elif not (x2.is_contiguous() and aligned(x2)):
        x2 = x2.clone(memory_format=torch.contiguous_format)
    y = torch.mul(_ops._weight_int8pack_mm(x2, q, unit), scale)  # float32 (rows, out)
    if x.dtype != y.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


# Compiled code (``torch.compile``) cannot read ``data_ptr()``, so it cannot check the
# alignment ``_weight_int8pack_mm`` needs (an unaligned input segfaults it, measured
# with torch 2.15, and inside a compiled graph an input may be a view at any offset).
# Traced code therefore calls the op through ``ds_quant::int8pack_mm_cpu``, which checks
# at run time. It is a ``torch.library.Library`` op with a CPU kernel rather than a
# ``torch.library.custom_op``: one call costs about 5 us over the aten op's own, against
# 10 us for ``custom_op`` (a (64, 512) layer at batch 1 on the AVX-512 host).
_LIB = torch.library.Library("ds_quant", "FRAGMENT")
_LIB.define("int8pack_mm_cpu(Tensor x, Tensor q, Tensor unit) -> Tensor")


def int8pack_mm_cpu_reference(x: torch.Tensor, q: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``ds_quant::int8pack_mm_cpu``'s plain-torch ground truth: ``x`` (rows, in) @ ``q``
    (out, in) int8 ^T scaled by ``unit`` (out,), in ``x.dtype``."""
    return (F.linear(x.float(), q.float()) * unit.float()).to(x.dtype)


def _int8pack_mm_cpu(x: torch.Tensor, q: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    if not (aligned(q) and q.shape[-1] % 16 == 0):  # see int8_cpu_supported
        return int8pack_mm_cpu_reference(x, q, unit)
    if not (x.is_contiguous() and aligned(x)):
        x = x.clone(memory_format=torch.contiguous_format)
    return _ops._weight_int8pack_mm(x, q, unit)


def _int8pack_mm_cpu_fake(x: torch.Tensor, q: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 2 and q.dim() == 2, lambda: "x and q must be 2-D")
    torch._check(x.shape[1] == q.shape[1], lambda: "x and q must have the same in_features")
    torch._check(q.dtype == torch.int8, lambda: f"q must be int8, got {q.dtype}")
    return x.new_empty(x.shape[0], q.shape[0])


if HAS_INT8_CPU:
    _LIB.impl("int8pack_mm_cpu", _int8pack_mm_cpu, "CPU")
    torch.library.register_fake("ds_quant::int8pack_mm_cpu", _int8pack_mm_cpu_fake, lib=_LIB)


def int8_weight_matmul_traced(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, unit: torch.Tensor | None = None
) -> torch.Tensor:
    """``int8_weight_matmul_cpu`` for code ``torch.compile`` traces: the same math, with
    the op behind ``ds_quant::int8pack_mm_cpu`` and the casts and scaling left in the
    graph, where they fuse with the step's neighbouring element-wise ops (``unit``: the
    op's ones, made in the graph when not given). One row (a batch-1 decode step) takes
    ``int8_weight_matvec_traced`` instead."""
    if _one_static_row(x):
        return int8_weight_matvec_traced(x, q, scale)
    if unit is None:
        unit = torch.ones(q.shape[0], dtype=COMPUTE_DTYPE, device=x.device)
    x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
    y = torch.ops.ds_quant.int8pack_mm_cpu(x2, q, unit) * scale
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def _one_static_row(x: torch.Tensor) -> bool:
    """Whether ``x`` holds one row, its sizes static: a symbolic (dynamic) batch size
    must not be specialised on."""
    lead = x.shape[:-1]
    return all(type(size) is int for size in lead) and lead.numel() == 1


def int8_weight_matvec_traced(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """One row ``x`` (..., in) @ (q * scale)^T for compiled code, written as a multiply
    and a sum over the int8 weight: inductor compiles it into one vectorized loop that
    widens each weight byte to float32 as it reads it, with no float copy of the weight.
    Activations stay float32 (no bfloat16 rounding, unlike the packed op). Measured on
    the AVX-512 host, one thread, weights out of cache: 10-14 GB/s of int8 weight against
    6-9 GB/s for ``_weight_int8pack_mm`` at one row, for (768..32000, 768..2048) weights;
    at 8 rows the packed op is faster (it reads the weight once for all rows), so only
    one row takes this form. Eagerly it would materialize ``q.float()``: traced code only."""
    row = realized(x.reshape(1, q.shape[1]).float())
    y = (row * q.float()).sum(-1) * scale
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def realized(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, read from memory by compiled code: inductor inlines an element-wise
    producer into the reduction that reads it, so a one-row product fed by an RMSNorm
    recomputed the norm's scaling (a square root) for every weight row: 5.5 GB/s of int8
    weight against 13.6 with the input stored first ((2048, 512), one thread, AVX-512
    host). An ``as_strided`` view needs a buffer, so inductor stores the input once."""
    return torch.as_strided(x, x.shape, x.stride())
