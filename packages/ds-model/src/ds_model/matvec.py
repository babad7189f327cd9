"""One-row linear layers on the CPU: 16-bit float weights as multiply-and-sum in
compiled steps, and the few-row products ds-quant's decode kernels run.

A batch-1 decode step multiplies one row by every weight matrix, so its time is the
weights' bytes. torch's CPU matmul for a bfloat16 weight (oneDNN) reads them well below
the memory bandwidth at one row; written as ``(x * w).sum(-1)``, inductor compiles the
product into one vectorized loop that widens each weight element to float32 as it reads
it and accumulates in float32. Measured on the AVX-512 host (one thread, compiled
steps of 20-40 distinct layers, weights out of cache): bfloat16 (768..32000, 768..2048)
weights 1.2-2.1x faster than the matmul; whole compiled bf16 steps at batch 1 1.35-1.8x
faster (docs/benchmarks.md, "CPU decode by weight format"). Up to ``fp32_rows()`` (4)
rows by a float32 weight call ds-quant's ``fp32_gemv_cpu`` op instead (a per-row sum in
inductor's loop was no faster than MKL's matmul there), in the layout the weight has:
row-major, or input-major where ``ds_model.layout`` re-laid it for the matmul's sake
(``generate(compile=True)`` above batch 1, the serving runner's compiled steps); compiled
fp32 steps at batch 2 and 4 made 1.2-1.8x the tokens/s they made on MKL's matmul (110M V3
and 134M llama shapes). More rows, and the serving runner's graph of its larger buckets
(one row only there: see ``MatVecLinears``), keep the matmul. ds-quant's INT8 layers make the same choice for their int8 weights.

``MatVecLinears`` is a ``TorchFunctionMode`` entered inside the compiled step: it
rewrites ``F.linear`` while torch.compile traces and costs nothing at run time (eagerly,
a mode would add Python to every op, so eager steps do not enter it). Eager steps call
``linear`` instead where a layer is plain (``ds_model.mlp.project``): up to
``cpu_gemv.bf16_rows()`` CPU bfloat16 rows by a bfloat16 weight (4 with AVX512-BF16)
run ds-quant's ``bf16_gemv`` (float32 sums, one rounding to bfloat16), which reads the
weights 1.4-2.6x as fast as oneDNN's bfloat16 matmul at one row; up to
``cpu_gemv.fp32_rows()`` float32 rows run its ``fp32_gemv``, the same loop over float32
weights, 1.5-2.5x as fast as torch's float32 matmul (docs/benchmarks.md, "float32 and
bfloat16 layers through fp32_gemv / bf16_gemv").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ds_quant.kernels import cpu_gemv
from torch.overrides import TorchFunctionMode

__all__ = ["MatVecLinears", "linear", "matvec_linear", "one_static_row", "stored"]

MATVEC_DTYPES = (torch.bfloat16, torch.float16)


def matvec_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x`` (..., in), as a multiply and a sum
    in float32, returned in ``x.dtype``."""
    row = stored(x.reshape(1, weight.shape[1]).float())
    y = (row * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``, bias-free; eagerly, a few CPU bfloat16 or float32 rows by
    a weight of their dtype through ds-quant's decode kernels (see above). Traced code
    keeps ``F.linear``, which ``MatVecLinears`` rewrites."""
    if not torch.compiler.is_compiling():
        if weight.dtype is torch.float32:
            if cpu_gemv.fp32_takes(x, weight):
                return cpu_gemv.fp32_gemv(x, weight)
        elif weight.dtype is torch.bfloat16 and cpu_gemv.bf16_takes(x, weight):
            return cpu_gemv.bf16_gemv(x, weight)
    return F.linear(x, weight)


def stored(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, written so that inductor stores it once before its consumers. An
    ``as_strided`` view needs a buffer; without one inductor inlines ``t``'s producer (an
    RMSNorm's square root) into every weight row's loop of the product that reads it:
    2.5x slower, measured on int8 weights."""
    return torch.as_strided(t, t.shape, t.stride())


def one_static_row(x: torch.Tensor) -> bool:
    """Whether ``x`` (..., features) is one row by static sizes: a symbolic (dynamic)
    batch size must not be specialised on."""
    lead = x.shape[:-1]
    return all(type(size) is int for size in lead) and lead.numel() == 1


class MatVecLinears(TorchFunctionMode):
    """Routes ``F.linear`` of one CPU row by a row-major 16-bit float weight through
    ``matvec_linear``, and by a float32 weight, row-major or input-major, through
    ds-quant's ``fp32_gemv`` op where it is built; every other call runs as it is.

    ``few_rows=True``, for a step whose row count is known to be small (static sizes, as
    ``generate(compile=True)``'s step has, or a graph that only batches of at most
    ``cpu_gemv.fp32_rows()`` rows enter, as the serving runner's few-row buckets'): up
    to ``fp32_rows()`` float32 rows take the op. Otherwise one row only: while dynamo
    traces, a symbolic row count reads as an int, so a dynamic batch's graph would be
    guarded on the count (and a larger batch would recompile it)."""

    def __init__(self, few_rows: bool = False) -> None:
        super().__init__()
        self.few_rows = few_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.device.type == "cpu"
                and type(weight) in (torch.Tensor, torch.nn.Parameter)
                and weight.dim() == 2
            ):
                if weight.dtype in MATVEC_DTYPES and weight.stride(1) == 1 and one_static_row(x):
                    return matvec_linear(x, weight, bias)
                # The weight row-major or input-major (ds_model.layout): the op reads
                # either layout.
                if (self.few_rows or one_static_row(x)) and cpu_gemv.fp32_takes(x, weight):
                    y = torch.ops.ds_quant.fp32_gemv_cpu.default(x, weight)
                    return y if bias is None else y + bias
        return func(*args, **kwargs)
